"""The dispatcher: claims pending jobs (CLI or plain SQL INSERTs) and plans them into renders."""

from __future__ import annotations

import logging

from sqlalchemy import select

from pipeline.caps import Caps, load_caps
from pipeline.db import transaction
from pipeline.jobs import claim_pending_jobs, plan_job
from pipeline.models import Job, JobStatus
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


def dispatch_pending(svc: Services) -> list[int]:
    """Plan every pending job; returns the render ids to enqueue (after the commit)."""
    if not has_pending_jobs(svc):
        return []
    caps = current_caps(svc)  # network, so before any transaction holds locks
    render_ids: list[int] = []
    while True:
        with transaction(svc.sessions) as session:
            job_ids = claim_pending_jobs(session)
            for job_id in job_ids:
                render_ids.extend(plan_job(session, job_id, caps))
        if not job_ids:
            return render_ids
        log.info("planned jobs %s: %d renders", job_ids, len(render_ids))


def has_pending_jobs(svc: Services) -> bool:
    with svc.sessions() as session:
        query = select(Job.id).where(Job.status == JobStatus.PENDING).limit(1)
        return session.scalars(query).first() is not None
