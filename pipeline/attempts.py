"""Which of a render's calls count against IMAGEBATCH_MAX_ATTEMPTS.

A 429 says "not now", not "this render is bad": it costs the render no attempt (its
reservation is released: nothing was billed). So that a provider answering 429 forever cannot
keep a render going forever, the render ends after IMAGEBATCH_MAX_RATE_LIMITED 429s (both
counted since the last `retry JOB`, from `renders.retry_from`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select

from pipeline.models import Attempt

RATE_LIMITED = 429
_attempts = Attempt.__table__
# Read only when the plain count says the render is out of attempts: the common render
# never pays for it. By attempts.render_id (indexed), a handful of rows.
COUNT_RATE_LIMITED = (
    select(func.count()).select_from(_attempts)
    .where(_attempts.c.render_id == bindparam("render"),
           _attempts.c.number > bindparam("since"),
           _attempts.c.http_status == RATE_LIMITED)
)


def out_of_attempts(db: Any, render: Any, max_attempts: int, max_rate_limited: int
                    ) -> str | None:
    """Why the render may make no other call ("gave up after ..."), or None. `db` is a
    connection or session; `render` a renders row (or Render) whose attempts so far are
    settled or being settled in this transaction."""
    made = render.attempts - render.retry_from
    if made < max_attempts and made < max_rate_limited:
        return None  # neither limit can be reached yet, whatever the calls were
    rate_limited = int(db.execute(COUNT_RATE_LIMITED, {
        "render": render.id, "since": render.retry_from}).scalar_one())
    if made - rate_limited >= max_attempts:
        return f"gave up after {max_attempts} attempts"
    if rate_limited and rate_limited >= max_rate_limited:
        return (f"gave up after {rate_limited} answers of 429 (rate limited; "
                "IMAGEBATCH_MAX_RATE_LIMITED)")
    return None
