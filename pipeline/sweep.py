"""Bringing renders back: expired leases settled and put back in the SQL queue, lost queue
messages returned to it."""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import queries
from pipeline.attempts import out_of_attempts
from pipeline.db import transaction
from pipeline.exhaustion import end_marked_jobs
from pipeline.jobs import close_job_if_done, recount_open_renders
from pipeline.ledger import settle_abandoned_attempt
from pipeline.models import Job, JobStatus, RenderStatus, utcnow
from pipeline.queue import put_back_lost
from pipeline.render import end_render
from pipeline.settings import Settings

# The backstop recount reads every open render of a job; it runs on jobs whose counter says
# few are open (where a wrong count would keep a finished job open), never on a job with a
# million renders queued.
BACKSTOP_MAX_OPEN = 1000


def sweep(sessions: sessionmaker[Session], settings: Settings,
          leased_here: Collection[int] = frozenset()) -> list[int]:
    """The renders put back in the SQL queue. Safe to run from any number of places at once.

    Revived renders wait in SQL like any other (the feeders send them, each job its fair
    share), never straight to the broker: a `run` process sweeping another job's dead renders
    must not render them itself (it feeds only its own job). `leased_here`: the renders this
    process works on itself (a result waiting for the database to take it), never swept."""
    revived = [rid for rid in _expired_leases(sessions)
               if rid not in leased_here and _revive(sessions, rid, settings)]
    put_back_lost(sessions, settings.requeue_after, limit=5000)
    end_marked_jobs(sessions)
    return revived + _close_finished_jobs(sessions)


def _expired_leases(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        return queries.expired_leases(session.connection(), utcnow(), limit=5000)


def _revive(sessions: sessionmaker[Session], render_id: int, settings: Settings) -> bool:
    """A render whose lease ran out lost its worker: its open attempt is charged as unknown
    (the provider may have billed it), then it is queued again or, out of attempts, failed."""
    with transaction(sessions) as session:
        db = session.connection()
        render = queries.lock_render_and_item(db, render_id)
        now = utcnow()
        if (render is None or render.status != RenderStatus.RUNNING
                or (render.lease_until or now) > now):
            return False
        settle_abandoned_attempt(session, render)
        if out_of_attempts(render, settings.max_attempts):
            end_render(session, render, RenderStatus.FAILED,
                       render.error or f"gave up after {settings.max_attempts} attempts "
                       "(the last one lost its worker)", item_locked=True)
            return False
        queries.requeue_render(db, render.id)
        return True


def _close_finished_jobs(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        open_jobs = list(session.scalars(
            select(Job.id).where(
                Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.PAUSED]),
                Job.finished_at.is_(None),
                Job.plan_cursor.is_(None),
                Job.open_renders <= BACKSTOP_MAX_OPEN,
            )
        ))
    for job_id in open_jobs:
        with transaction(sessions) as session:
            # Recounted, not trusted: this is the backstop that closes a job whatever else
            # went wrong.
            close_job_if_done(session, job_id, recount_open_renders(session, job_id))
    return []
