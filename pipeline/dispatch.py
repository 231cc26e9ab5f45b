"""The dispatcher: plans jobs (CLI or plain SQL INSERTs) in chunks and fills the broker's window."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from pipeline.caps import Caps
from pipeline.caps import current_caps as caps_of
from pipeline.db import transaction
from pipeline.jobs import PLAN_CHUNK, fail_next_item, jobs_to_plan, plan_job
from pipeline.models import Job, JobStatus
from pipeline.queue import fill_window
from pipeline.runtime import Services

log = logging.getLogger("imagebatch.dispatch")


def current_caps(svc: Services, *, refresh: bool = False) -> dict[str, Caps]:
    """The caps, /models asked through this worker's client on its loop."""
    return caps_of(svc.settings, svc.sessions, lambda: svc.io.run(svc.upstream.list_models()),
                   refresh=refresh)


def plan_pending(svc: Services, only_job: int | None = None) -> int:
    """Plan every job with items left to plan (or only `only_job`: a `run` process plans its
    own job), a chunk per job in turn, each chunk its own transaction (renders of the first
    chunks run while the rest is planned). Returns how many items it planned."""
    if not has_jobs_to_plan(svc, only_job):
        return 0
    caps = current_caps(svc)  # network, so before any transaction holds locks
    total = 0
    while True:
        with svc.sessions() as session:
            job_ids = jobs_to_plan(session)
        if only_job is not None:
            job_ids = [job_id for job_id in job_ids if job_id == only_job]
        planned = 0
        for job_id in job_ids:
            planned += plan_chunk(svc, job_id, caps)
        if not planned:
            if total:
                log.info("planned %d items", total)
            return total
        total += planned


# The database being unavailable (locked, full, a lost connection): the next tick tries
# again. Any other error planning a chunk comes from its rows' data.
UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)


def plan_chunk(svc: Services, job_id: int, caps: dict[str, Caps]) -> int:
    """Plan the job's next chunk. A chunk that fails for its rows' data (a value the
    checks let through that SQL cannot hold) is planned again an item at a time, and each
    item that fails alone fails with the reason: one row can stop neither its job nor, by
    failing every tick, every job after it."""
    try:
        with transaction(svc.sessions) as session:
            return plan_job(session, job_id, caps)
    except UNAVAILABLE:
        raise
    except Exception as exc:  # whatever it is, it is this chunk's alone
        log.warning("job %d: a chunk could not be planned (%s); planning it an item at a "
                    "time", job_id, one_line(exc))
    done = 0
    for _ in range(PLAN_CHUNK):
        try:
            with transaction(svc.sessions) as session:
                took = plan_job(session, job_id, caps, chunk=1)
        except UNAVAILABLE:
            raise
        except Exception as exc:
            with transaction(svc.sessions) as session:
                took = fail_next_item(session, job_id, f"could not be planned: {one_line(exc)}")
        if not took:
            break
        done += took
    return done


def one_line(exc: BaseException) -> str:
    """The error's type and the first line of its message, without the SQL statement
    (SQLAlchemy appends it) or parameters (engines hide them)."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = (str(cause).strip().splitlines() or [""])[0][:200]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def dispatch_pending(svc: Services) -> list[int]:
    """Plan what is pending, then claim the renders the broker's window has room for;
    returns their ids, to send (after the commit)."""
    plan_pending(svc)
    return feed_window(svc)


def feed_window(svc: Services, only_job: int | None = None) -> list[int]:
    """Claim the renders the broker's window has room for: of every running job, or of
    `only_job` alone (a `run` or `resume` process renders its own job, nobody else's)."""
    settings = svc.settings
    return fill_window(svc.sessions, settings.broker_window, live_within=settings.lease_seconds,
                       only_job=only_job)


def has_jobs_to_plan(svc: Services, only_job: int | None = None) -> bool:
    with svc.sessions() as session:
        query = select(Job.id).where(
            (Job.status == JobStatus.PENDING) | Job.plan_cursor.is_not(None)).limit(1)
        if only_job is not None:
            query = query.where(Job.id == only_job)
        return session.scalars(query).first() is not None
