"""Big jobs, at a size users run (200,000 lines): the file streamed in, planned in chunks,
the broker holding a window, status from one row, and the disk spent per line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.caps import caps_by_model
from pipeline.db import transaction
from pipeline.dispatch import feed_window, has_jobs_to_plan
from pipeline.jobs import job_summary, plan_job
from pipeline.models import JobItem, Render, RenderStatus
from pipeline.queue import announce_worker
from pipeline.submission import submit_file
from tests.helpers import assert_status_counts

pytestmark = pytest.mark.big

LINES = 200_000
CAPS = caps_by_model([{"id": "flux-2-dev", "image_caps": {"max_n": 4,
                                                         "price_per_image_cents": 3}}])


def big_file(path: Path, lines: int = LINES) -> Path:
    with path.open("w") as out:
        for i in range(lines):
            n = 6 if i % 1000 == 0 else 1  # one line in a thousand is two calls
            model = "nope" if i == lines // 2 else "flux-2-dev"
            out.write(json.dumps({"custom_id": f"c{i}", "model": model, "prompt": f"otter {i}",
                                  "n": n, "seed": i}) + "\n")
    return path


def test_a_big_job_is_planned_in_chunks_and_costs_the_broker_a_window(svc, tmp_path):
    path = big_file(tmp_path / "big.jsonl")
    submitted = submit_file(svc.sessions, str(path), CAPS, team="t", budget_cents=10**9,
                            name="big", allow_invalid=True)
    job_id = submitted.job_id
    assert submitted.error_count == 1 and submitted.calls == LINES - 1 + 199
    with transaction(svc.sessions) as session:  # the first chunk: the job runs at once
        assert plan_job(session, job_id, CAPS) == 2000
    announce_worker(svc.sessions, "w1", 50)
    first = feed_window(svc)
    assert len(first) == 100  # twice the live slots, not the job
    assert job_summary_of(svc, job_id)["status"] == "running"
    planned = 2000
    while True:
        with transaction(svc.sessions) as session:
            took = plan_job(session, job_id, CAPS)
        if not took:
            break
        planned += took
        assert feed_window(svc) == []  # nothing started: the window stays full
    assert planned == LINES - 1 and not has_jobs_to_plan(svc)  # the invalid one failed at once
    with svc.sessions() as session:
        renders = session.scalar(select(func.count()).where(Render.job_id == job_id))
        unsent = session.scalar(select(func.count()).where(
            Render.job_id == job_id, Render.status == RenderStatus.QUEUED,
            Render.enqueued_at.is_(None)))
        failed = session.scalars(select(JobItem.error).where(
            JobItem.job_id == job_id, JobItem.status == "failed")).all()
        assert_status_counts(session, job_id)
    assert renders == LINES - 1 + 199 and unsent == renders - 100
    assert len(failed) == 1 and "unknown model 'nope'" in failed[0]
    s = job_summary_of(svc, job_id)
    assert (s["items_total"], s["items_failed"], s["items_succeeded"]) == (LINES, 1, 0)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_big_job_takes_under_a_kilobyte_a_line_on_disk(svc, tmp_path):
    """After submission and planning, the embedded data dir (database and broker) holds at
    most 1 KB per line."""
    path = big_file(tmp_path / "big.jsonl")
    job_id = submit_file(svc.sessions, str(path), CAPS, team="t", budget_cents=10**9,
                         name="big", allow_invalid=True).job_id
    while True:
        with transaction(svc.sessions) as session:
            if not plan_job(session, job_id, CAPS, chunk=20_000):
                break
    with svc.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    used = sum(f.stat().st_size for f in svc.settings.data_dir.rglob("*") if f.is_file())
    assert used / LINES <= 1024, f"{used / LINES:.0f} bytes per line"


def job_summary_of(svc, job_id: int) -> dict:
    with svc.sessions() as session:
        return job_summary(session, job_id)
