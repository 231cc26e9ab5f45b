"""A worker process killed with reservations not yet sent: those attempts are released by
the sweeper, only the sent ones are charged unknown (real worker processes, both
databases)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from fake_upstream.app import FakeServer
from pipeline.db import make_engine, session_factory
from pipeline.sweep import sweep
from tests.cluster import Cluster, check_books, open_attempts, s3_client, wait_until
from tests.conftest import make_settings
from tests.integration.test_send import FLUX


@pytest.fixture
def cluster(tmp_path: Path, database_url: str, redis_url: str, s3_endpoint: str,
            fake: FakeServer) -> Iterator[Cluster]:
    from tests.acceptance.test_faults import _redis_db_url

    s3 = s3_client(s3_endpoint)
    bucket = f"send-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    built = Cluster(tmp_path, database_url, _redis_db_url(redis_url), fake.base_url,
                    s3_endpoint, bucket)
    try:
        yield built
    finally:
        built.stop()
        print(built.logs())


def test_a_worker_killed_before_sending_its_reserved_renders_is_charged_only_for_sent_calls(
        cluster: Cluster, database_url: str, s3_endpoint: str, tmp_path: Path,
        fake: FakeServer) -> None:
    """One worker, one call slot, three renders ahead: the first call stalls at the fake
    (which bills it as soon as it takes it), three renders hold their reservations waiting
    for the slot. SIGKILL the worker. Once the leases have run out a sweep settles the four
    open attempts: the three never sent are released, the sent one is charged unknown, so
    the job's unknown cents equal what the fake billed, to the cent."""
    (worker,) = cluster.start_workers(1, IMAGEBATCH_CONCURRENCY="1",
                                      IMAGEBATCH_RENDERS_AHEAD="3",
                                      IMAGEBATCH_LEASE_SECONDS="3")
    lines = [{"custom_id": f"s{i}", **FLUX, "prompt": f"stall {i}", "fake": {"stall": True}}
             for i in range(4)]
    job_id = cluster.submit(lines, budget_cents=1000)
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        wait_until(lambda: fake.stats()["calls"] == 1 and len(open_attempts(engine, job_id)) == 4,
                   30, "one call sent and four renders reserved")
        time.sleep(0.3)  # anything more would have been sent by now: one slot, stalled
        assert fake.stats()["calls"] == 1
        worker.kill()
        killed_open = open_attempts(engine, job_id)
        assert len(killed_open) == 4

        settings = make_settings(tmp_path / "sweeper", fake.base_url, database_url=database_url,
                                 lease_seconds=3.0)
        sweeper = make_engine(database_url)
        try:
            sessions = session_factory(sweeper)
            time.sleep(3.5)  # every lease has run out
            revived = sweep(sessions, settings)
        finally:
            sweeper.dispose()
        assert len(revived) == 4
        books = check_books(engine, s3_client(s3_endpoint), cluster.bucket, cluster.prefix,
                            job_id, finished=False)
    finally:
        engine.dispose()
    stats = fake.stats()
    assert stats["calls"] == stats["billed_calls"] == 1
    assert {a.id for a in books.attempts} == killed_open
    assert books.outcomes() == {"released": 3, "unknown": 1}
    (unknown,) = books.with_outcome("unknown")
    assert "worker was lost during the call" in (unknown.error or "")
    assert all("before the call was sent" in (a.error or "")
               for a in books.with_outcome("released"))
    assert books.unknown == books.spent == stats["billed_cents"] == 3
    assert books.job["reserved_cents"] == 0
