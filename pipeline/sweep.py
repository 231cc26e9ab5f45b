"""Bringing renders back: expired leases settled and re-queued, lost queue messages resent."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.jobs import close_job_if_done, recount_open_renders
from pipeline.models import Attempt, Job, JobStatus, Render, RenderStatus, utcnow
from pipeline.render import end_render, settle_abandoned_attempt
from pipeline.settings import Settings


def sweep(sessions: sessionmaker[Session], settings: Settings) -> list[int]:
    """Renders to enqueue again. Safe to run from any number of places at once."""
    revived = [rid for rid in _expired_leases(sessions) if _revive(sessions, rid, settings)]
    return revived + _stale_queued(sessions, settings) + _close_finished_jobs(sessions)


def _expired_leases(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        return list(session.scalars(
            select(Render.id).where(
                Render.status == RenderStatus.RUNNING, Render.lease_until < utcnow()
            ).limit(5000)
        ))


def _revive(sessions: sessionmaker[Session], render_id: int, settings: Settings) -> bool:
    """A render whose lease ran out lost its worker: its open attempt is charged as unknown
    (the provider may have billed it), then it is queued again or, out of attempts, failed."""
    with transaction(sessions) as session:
        render = session.get_one(Render, render_id, with_for_update=True)
        now = utcnow()
        if render.status != RenderStatus.RUNNING or (render.lease_until or now) > now:
            return False
        settle_abandoned_attempt(session, render)
        if render.attempts - render.retry_from >= settings.max_attempts:
            end_render(session, render, RenderStatus.FAILED,
                       render.error or f"gave up after {settings.max_attempts} attempts "
                       "(the last one lost its worker)")
            return False
        render.status = RenderStatus.QUEUED
        render.lease_until = None
        render.enqueued_at = now
        render.updated_at = now
        return True


def _stale_queued(sessions: sessionmaker[Session], settings: Settings) -> list[int]:
    """Queued renders no worker took for `requeue_after` seconds whose message may be lost
    (embedded brokers drop a killed worker's prefetched tasks; a Redis that restarts without
    persistence drops the queue). A duplicate is harmless, but a flood of them is not.

    While attempts keep starting, the queue is moving: first in, first out, so a render is
    taken as lost only when one enqueued after it (a higher id) has started. Renders merely
    waiting their turn in a long queue (a job of 100,000 renders takes longer than
    `requeue_after` to drain) are left alone. When no attempt has started for
    `requeue_after`, every render queued that long is sent again."""
    cutoff = utcnow() - timedelta(seconds=settings.requeue_after)
    with sessions() as session:
        stale = select(Render.id).where(Render.status == RenderStatus.QUEUED,
                                        Render.enqueued_at < cutoff)
        last_start = session.scalar(
            select(Attempt.started_at).order_by(Attempt.id.desc()).limit(1))
        if last_start is not None and last_start >= cutoff:
            furthest = session.scalar(select(func.max(Attempt.render_id)))
            stale = stale.where(Render.id < furthest)
        candidates = list(session.scalars(stale.order_by(Render.id).limit(5000)))
    claimed = []
    for render_id in candidates:
        with transaction(sessions) as session:
            # Conditional, so two sweepers never both resend one render.
            result = session.execute(
                update(Render)
                .where(Render.id == render_id, Render.status == RenderStatus.QUEUED,
                       Render.enqueued_at < cutoff)
                .values(enqueued_at=utcnow())
            )
            if result.rowcount == 1:
                claimed.append(render_id)
    return claimed


def _close_finished_jobs(sessions: sessionmaker[Session]) -> list[int]:
    with sessions() as session:
        open_jobs = list(session.scalars(
            select(Job.id).where(
                Job.status.in_([JobStatus.RUNNING, JobStatus.CANCELLED]),
                Job.finished_at.is_(None),
            )
        ))
    for job_id in open_jobs:
        with transaction(sessions) as session:
            # Recounted, not trusted: this is the backstop that closes a job whatever else
            # went wrong.
            close_job_if_done(session, job_id, recount_open_renders(session, job_id))
    return []
