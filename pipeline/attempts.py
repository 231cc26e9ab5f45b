"""The attempt limit, and 429s.

A render may make IMAGEBATCH_MAX_ATTEMPTS attempts, counted from `renders.retry_from` (a
`retry`, a `resume` or a pause starts the count again): `out_of_attempts` is that rule, for
the render that starts, the one that settles and the one the sweeper revives.

A 429 says "not now", not "this render is bad": it costs the render no attempt of its
IMAGEBATCH_MAX_ATTEMPTS (render.py takes it back through `renders.retry_from`, as a pause
does; its reservation is released, nothing was billed). So that a provider answering 429
forever cannot keep a render going forever, the render ends after IMAGEBATCH_MAX_RATE_LIMITED
429s in a row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from pipeline.models import Attempt

RATE_LIMITED = 429
_attempts = Attempt.__table__


def out_of_attempts(render: Any, max_attempts: int, *, forgiven: bool = False) -> bool:
    """Whether the render (a renders row or an ORM Render) has used every attempt it may
    make. `forgiven`: its latest attempt does not count (a 429, or a pause)."""
    return render.attempts - render.retry_from - int(forgiven) >= max_attempts


def rate_limited_too_long(db: Any, render_id: int, max_rate_limited: int) -> str | None:
    """Why the render gives up on 429s ("gave up after ..."), or None. Read only after a 429
    (the common render never pays for it): the render's last attempts, by its
    (render_id, number) index; the one being settled in this transaction included."""
    count = max(1, max_rate_limited)
    last = db.execute(
        select(_attempts.c.http_status).where(_attempts.c.render_id == render_id)
        .order_by(_attempts.c.number.desc()).limit(count)).scalars().all()
    if len(last) < count or any(status != RATE_LIMITED for status in last):
        return None
    return (f"gave up after {count} answers of 429 in a row (rate limited; "
            "IMAGEBATCH_MAX_RATE_LIMITED)")
