"""SQL is the queue: which queued renders get a broker message, and when a message is lost.

Renders wait in SQL with `enqueued_at` NULL. The broker carries a bounded window of them:
about what the live workers can run at once, times WINDOW_FACTOR (or
IMAGEBATCH_BROKER_WINDOW). `fill_window` claims the next unsent renders of the running jobs
(each job a fair share, then first come first served) by setting `enqueued_at`; the caller
sends one message per claimed render. A job of any size thus costs the broker a window, and a
lost message or a dead worker costs at most a window, which `put_back_lost` returns to SQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.models import (
    Attempt,
    Job,
    JobStatus,
    Render,
    RenderStatus,
    Worker,
    status_is,
    utcnow,
)

# Messages per render slot of the live workers: one running, one waiting to start.
WINDOW_FACTOR = 2
# The window when no worker has announced itself yet (a `dispatch` before any `worker`).
IDLE_WINDOW = 256

_renders, _jobs, _workers = Render.__table__, Job.__table__, Worker.__table__
QUEUED = RenderStatus.QUEUED.value

RUNNING_JOBS = (select(_jobs.c.id).where(_jobs.c.status == JobStatus.RUNNING.value)
                .order_by(_jobs.c.id))
SENT_NOT_STARTED = (
    select(func.count()).select_from(_renders)
    .where(_renders.c.job_id.in_(bindparam("jobs", expanding=True)),
           status_is(_renders.c.status, QUEUED), _renders.c.enqueued_at.is_not(None))
)
NEXT_UNSENT = (
    select(_renders.c.id)
    .where(_renders.c.job_id == bindparam("job"), status_is(_renders.c.status, QUEUED),
           _renders.c.enqueued_at.is_(None))
    # In the index's own order (the same as by id under these equalities): ordered by id
    # alone, PostgreSQL walked the primary key and filtered out every render already done
    # (33.6 ms a feed at 300,000 done, against 0.18 ms through ix_renders_job_queue).
    .order_by(_renders.c.job_id, _renders.c.status, _renders.c.enqueued_at, _renders.c.id)
    .limit(bindparam("take"))
)
# By id alone: the transaction that read them as unsent holds them (SQLite's write lock,
# PostgreSQL's row locks). A status condition here made SQLite walk every queued render of
# the status index (180 ms for 20 renders behind a 1,000,000-render job).
MARK_SENT = (update(_renders).where(_renders.c.id.in_(bindparam("ids", expanding=True)))
             .values(enqueued_at=bindparam("now")))


@dataclass(frozen=True)
class Window:
    """The broker's window: how many messages it may hold and how many it holds."""

    size: int
    sent: int

    @property
    def room(self) -> int:
        return max(0, self.size - self.sent)


def window_size(session: Session, override: int, *, now: datetime, live_within: float) -> int:
    """IMAGEBATCH_BROKER_WINDOW when set, else WINDOW_FACTOR x the live workers' slots."""
    if override:
        return override
    slots = live_slots(session, now=now, within=live_within)
    return WINDOW_FACTOR * slots if slots else IDLE_WINDOW


def fill_window(sessions: sessionmaker[Session], override: int, *, live_within: float,
                only_job: int | None = None) -> list[int]:
    """Claim the renders to send now (their `enqueued_at` set); the caller sends them. With
    `only_job`, that job's alone, its window counted alone (a process of its own)."""
    with transaction(sessions) as session:
        db = session.connection()
        running = RUNNING_JOBS if only_job is None else RUNNING_JOBS.where(
            _jobs.c.id == only_job)
        jobs = list(db.execute(running).scalars())
        if not jobs:
            return []
        now = utcnow()
        window = Window(window_size(session, override, now=now, live_within=live_within),
                        db.execute(SENT_NOT_STARTED, {"jobs": jobs}).scalar_one())
        ids = _next_unsent(session, jobs, window.room)
        for start in range(0, len(ids), 1000):
            db.execute(MARK_SENT, {"ids": ids[start:start + 1000], "now": now})
        return ids


def _next_unsent(session: Session, jobs: list[int], room: int) -> list[int]:
    """Up to `room` renders: a fair share from each running job first, so a small job is
    not stuck behind a million-line one, then whatever room is left, oldest job first."""
    if room <= 0:
        return []
    db = session.connection()
    query = NEXT_UNSENT
    if session.get_bind().dialect.name == "postgresql":
        # Two feeders at once take different renders instead of waiting on each other.
        query = query.with_for_update(skip_locked=True)
    share = max(1, math.ceil(room / len(jobs)))
    ids: list[int] = []
    taken: dict[int, int] = {}
    exhausted: set[int] = set()
    for round_share in (share, room):
        for job_id in jobs:
            take = min(round_share, room - len(ids))
            if take <= 0:
                return ids
            if job_id in exhausted:
                continue
            # Not yet marked sent: a second round reads past what the first one took.
            before = taken.get(job_id, 0)
            found = list(db.execute(query, {"job": job_id, "take": before + take}).scalars())
            if len(found) < before + take:
                exhausted.add(job_id)
            ids.extend(found[before:])
            taken[job_id] = len(found)
    return ids


# --- lost messages --------------------------------------------------------------------------

LATEST_START = (
    select(Attempt.__table__.c.started_at, _renders.c.enqueued_at)
    .join(_renders, _renders.c.id == Attempt.__table__.c.render_id)
    .order_by(Attempt.__table__.c.id.desc()).limit(1)
)


def put_back_lost(sessions: sessionmaker[Session], requeue_after: float, limit: int) -> int:
    """Renders whose message looks lost go back to waiting in SQL (`enqueued_at` NULL), for
    `fill_window` to send again. Returns how many.

    A message is taken as lost when its render was sent over `requeue_after` seconds ago,
    is still queued, and either a render sent after it has started (the broker hands out
    messages first in, first out, so whoever received it did not start it: a worker killed
    with prefetched messages) or no render has started for `requeue_after` at all (every
    message went down with its worker). A message merely held by a busy live worker may be
    sent twice; the copy that comes second finds the render started and does nothing."""
    now = utcnow()
    cutoff = now - timedelta(seconds=requeue_after)
    with sessions() as session:
        latest = session.execute(LATEST_START).one_or_none()
    if latest is not None and latest.started_at >= cutoff:
        if latest.enqueued_at is None:
            return 0
        cutoff = min(cutoff, latest.enqueued_at)
    with transaction(sessions) as session:
        lost = (select(_renders.c.id)
                .where(status_is(_renders.c.status, QUEUED), _renders.c.enqueued_at < cutoff,
                       _renders.c.job_id.in_(RUNNING_JOBS.scalar_subquery()))
                .limit(limit).scalar_subquery())
        result = session.execute(
            update(_renders).where(_renders.c.id.in_(lost), _renders.c.status == QUEUED)
            .values(enqueued_at=None))
        return result.rowcount


# --- live workers ---------------------------------------------------------------------------


def live_slots(session: Session, *, now: datetime, within: float) -> int:
    since = now - timedelta(seconds=within)
    return int(session.scalar(select(func.coalesce(func.sum(_workers.c.slots), 0))
                              .where(_workers.c.seen_at >= since)) or 0)


def announce_worker(sessions: sessionmaker[Session], name: str, slots: int) -> None:
    """This worker is alive with `slots` render slots (renewed with its leases)."""
    with transaction(sessions) as session:
        now = utcnow()
        changed = session.execute(update(_workers).where(_workers.c.name == name)
                                  .values(slots=slots, seen_at=now)).rowcount
        if not changed:
            session.execute(insert(_workers).values(name=name, slots=slots, seen_at=now))


def forget_worker(sessions: sessionmaker[Session], name: str) -> None:
    with transaction(sessions) as session:
        session.execute(delete(_workers).where(_workers.c.name == name))
