"""Helpers for integration tests: submit job lines and render them through the pipeline."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import create_job, job_summary
from pipeline.ledger import job_ledger_totals
from pipeline.models import Attempt, Image, JobItem, LedgerEntry, Render
from pipeline.plan import parse_lines
from pipeline.render import run_render
from pipeline.runtime import Services


def submit(svc: Services, lines: list[dict[str, Any]], budget_cents: int = 10_000,
           team: str = "t") -> int:
    text = "\n".join(json.dumps(line) for line in lines)
    with transaction(svc.sessions) as session:
        return create_job(session, team=team, budget_cents=budget_cents,
                          entries=parse_lines(text))


def render_all(svc: Services, render_ids: list[int], concurrency: int = 8) -> list[str]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda rid: run_render(svc, rid), render_ids))


def run_job(svc: Services, lines: list[dict[str, Any]], budget_cents: int = 10_000,
            concurrency: int = 8) -> dict[str, Any]:
    job_id = submit(svc, lines, budget_cents)
    render_all(svc, dispatch_pending(svc), concurrency)
    return summary(svc, job_id)


def summary(svc: Services, job_id: int) -> dict[str, Any]:
    with svc.sessions() as session:
        return job_summary(session, job_id)


def assert_books_balance(svc: Services, job_id: int, *, within_cap: bool = True) -> None:
    """The job's counters equal the ledger's sums, every attempt is settled once, and every
    image row has its bytes in storage with the recorded sha256."""
    import hashlib

    with svc.sessions() as session:
        s = job_summary(session, job_id)
        totals = job_ledger_totals(session, job_id)
        assert (s["spent_cents"], s["reserved_cents"], s["unknown_cents"]) == (
            totals.spent_cents, totals.reserved_cents, totals.unknown_cents)
        if within_cap:  # not when a test lowered the cap below what was already spent
            assert s["spent_cents"] + s["reserved_cents"] <= s["budget_cents"]
        attempts = session.scalar(
            select(func.count()).select_from(Attempt).join(Render).where(Render.job_id == job_id))
        entries = session.scalar(
            select(func.count()).where(LedgerEntry.job_id == job_id))
        if s["finished_at"] is not None:
            assert s["reserved_cents"] == 0
            assert entries == 2 * attempts  # one reserve and one settlement per attempt
        assert_status_counts(session, job_id)
        for image in session.scalars(select(Image).where(Image.job_id == job_id)):
            data = svc.store.get(image.key)
            assert hashlib.sha256(data).hexdigest() == image.sha256
            assert len(data) == image.bytes


def assert_status_counts(session: Any, job_id: int) -> None:
    """What `status` shows (the job's counters) equals what its rows say."""
    s = job_summary(session, job_id)
    by_status = dict(session.execute(select(JobItem.status, func.count())
                                     .where(JobItem.job_id == job_id)
                                     .group_by(JobItem.status)).all())
    images = session.scalar(select(func.count()).where(Image.job_id == job_id))
    assert (s["items_total"], s["items_succeeded"], s["items_failed"], s["items_cancelled"],
            s["images"]) == (sum(by_status.values()), by_status.get("succeeded", 0),
                             by_status.get("failed", 0), by_status.get("cancelled", 0), images)


def wait_until_blocked(svc: Services, timeout: float = 10.0) -> None:
    """Until another session of this database waits for a row lock (PostgreSQL); SQLite's
    writers queue on one lock per process that cannot be watched, so a short pause."""
    if svc.engine.dialect.name != "postgresql":
        time.sleep(0.3)
        return
    watcher = sa.create_engine(svc.settings.database_url, poolclass=sa.pool.NullPool)
    give_up = time.monotonic() + timeout
    try:
        with watcher.connect() as connection:
            while time.monotonic() < give_up:
                waiting = connection.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")).scalar_one()
                connection.rollback()
                if waiting:
                    return
                time.sleep(0.02)
    finally:
        watcher.dispose()
    raise AssertionError(f"no other session waited for a row lock within {timeout} s")


def s3_environment(endpoint: str, secret: str) -> dict[str, str]:
    """boto3's settings for the moto server at `endpoint`, and nothing of this machine's own
    (no profile, config file, credentials file or instance metadata)."""
    return {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true"}


def use_s3(mp: Any, endpoint: str, secret: str) -> None:
    """Point boto3 in this process at the moto server (`mp`: a pytest MonkeyPatch)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION"):
        mp.delenv(name, raising=False)
    for name, value in s3_environment(endpoint, secret).items():
        mp.setenv(name, value)
