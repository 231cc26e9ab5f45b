"""The dispatcher: plans jobs (CLI or plain SQL INSERTs) in chunks and fills the broker's window."""

from __future__ import annotations

import logging

from sqlalchemy import select

from pipeline.caps import Caps, load_caps
from pipeline.db import transaction
from pipeline.jobs import jobs_to_plan, plan_job
from pipeline.models import Job, JobStatus
from pipeline.queue import fill_window
from pipeline.runtime import Services

log = logging.getLogger("imagebatch.dispatch")


def current_caps(svc: Services, *, refresh: bool = False) -> dict[str, Caps]:
    return load_caps(
        svc.sessions,
        svc.settings.api_base,
        lambda: svc.io.run(svc.upstream.list_models()),
        ttl_seconds=svc.settings.models_ttl,
        refresh=refresh,
    )


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
            with transaction(svc.sessions) as session:
                planned += plan_job(session, job_id, caps)
        if not planned:
            if total:
                log.info("planned %d items", total)
            return total
        total += planned


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
