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

from sqlalchemy.orm import Session, sessionmaker

from pipeline import queries
from pipeline.db import transaction
from pipeline.models import utcnow

# Messages per render slot of the live workers: one running, one waiting to start.
WINDOW_FACTOR = 2
# The window when no worker has announced itself yet (a `dispatch` before any `worker`).
IDLE_WINDOW = 256


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
        jobs = queries.running_jobs(db, only_job)
        if not jobs:
            return []
        now = utcnow()
        window = Window(window_size(session, override, now=now, live_within=live_within),
                        queries.sent_not_started(db, jobs))
        ids = _next_unsent(session, jobs, window.room)
        for start in range(0, len(ids), 1000):
            queries.mark_sent(db, ids[start:start + 1000], now)
        return ids


def _next_unsent(session: Session, jobs: list[int], room: int) -> list[int]:
    """Up to `room` renders: a fair share from each running job first, so a small job is
    not stuck behind a million-line one, then whatever room is left, oldest job first."""
    if room <= 0:
        return []
    db = session.connection()
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
            found = queries.next_unsent(db, job_id, before + take)
            if len(found) < before + take:
                exhausted.add(job_id)
            ids.extend(found[before:])
            taken[job_id] = len(found)
    return ids


# --- lost messages --------------------------------------------------------------------------

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
        latest = queries.latest_start(session.connection())
    if latest is not None and latest.started_at >= cutoff:
        if latest.enqueued_at is None:
            return 0
        cutoff = min(cutoff, latest.enqueued_at)
    with transaction(sessions) as session:
        return queries.unsend_lost(session.connection(), sent_before=cutoff, limit=limit)


# --- live workers ---------------------------------------------------------------------------


def live_slots(session: Session, *, now: datetime, within: float) -> int:
    return queries.live_slots(session.connection(), now - timedelta(seconds=within))


def announce_worker(sessions: sessionmaker[Session], name: str, slots: int) -> None:
    """This worker is alive with `slots` render slots (renewed with its leases)."""
    with transaction(sessions) as session:
        queries.announce_worker(session.connection(), name, slots, utcnow())


def forget_worker(sessions: sessionmaker[Session], name: str) -> None:
    with transaction(sessions) as session:
        queries.forget_worker(session.connection(), name)
