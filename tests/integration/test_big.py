"""Big jobs, at a size users run (200,000 lines): the file streamed in with its renders, SQL
jobs planned in chunks, the broker holding a window, status from one row, disk per line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from pipeline.caps import caps_by_model
from pipeline.db import transaction
from pipeline.dispatch import feed_window, has_jobs_to_plan
from pipeline.jobs import job_summary, plan_job
from pipeline.models import Job, JobItem, Render, RenderStatus
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


def test_a_big_file_is_written_with_its_renders_and_costs_the_broker_a_window(svc, tmp_path):
    """`submit` plans the file as it reads it: the job runs with every render waiting in
    SQL, and the broker gets twice the live workers' slots, not the job."""
    path = big_file(tmp_path / "big.jsonl")
    submitted = submit_file(svc.sessions, str(path), CAPS, team="t", budget_cents=10**9,
                            name="big", allow_invalid=True)
    job_id = submitted.job_id
    assert submitted.error_count == 1 and submitted.calls == LINES - 1 + 199
    assert not has_jobs_to_plan(svc)
    announce_worker(svc.sessions, "w1", 50)
    assert len(feed_window(svc)) == 100
    assert feed_window(svc) == []  # nothing started: the window stays full
    assert unsent_of(svc, job_id) == LINES - 1 + 199 - 100
    s = job_summary_of(svc, job_id)
    assert (s["status"], s["items_total"], s["items_failed"], s["items_succeeded"]) == (
        "running", LINES, 1, 0)
    with svc.sessions() as session:
        assert_status_counts(session, job_id)


def test_a_big_job_inserted_with_sql_is_planned_in_chunks(svc):
    """Another program's INSERTs: the dispatcher plans 2,000 items a transaction, the job
    runs from the first chunk, the invalid line fails with its reason, and the window is
    filled from the first chunk on."""
    job_id = insert_job_with_sql(svc, LINES)
    with transaction(svc.sessions) as session:
        assert plan_job(session, job_id, CAPS) == 2000
    announce_worker(svc.sessions, "w1", 50)
    assert len(feed_window(svc)) == 100
    assert job_summary_of(svc, job_id)["status"] == "running"
    planned = 2000
    while True:
        with transaction(svc.sessions) as session:
            took = plan_job(session, job_id, CAPS)
        if not took:
            break
        planned += took
        assert job_summary_of(svc, job_id)["finished_at"] is None
    assert planned == LINES and not has_jobs_to_plan(svc)
    assert feed_window(svc) == []
    with svc.sessions() as session:
        failed = session.scalars(select(JobItem.error).where(
            JobItem.job_id == job_id, JobItem.status == "failed")).all()
        assert_status_counts(session, job_id)
    assert unsent_of(svc, job_id) == LINES - 1 + 199 - 100
    assert len(failed) == 1 and "unknown model 'nope'" in failed[0]
    s = job_summary_of(svc, job_id)
    assert (s["items_total"], s["items_failed"], s["items_succeeded"]) == (LINES, 1, 0)


def insert_job_with_sql(svc, lines: int) -> int:
    """What another program writes: a pending job and its items, plain INSERTs."""
    with transaction(svc.sessions) as session:
        job_id = session.execute(insert(Job).values(team="t", budget_cents=10**9,
                                                    status="pending")).inserted_primary_key[0]
        rows = []
        for i in range(lines):
            n = 6 if i % 1000 == 0 else 1
            model = "nope" if i == lines // 2 else "flux-2-dev"
            rows.append({"job_id": job_id, "line": i + 1, "custom_id": f"c{i}",
                         "body": json.dumps({"model": model, "prompt": f"otter {i}", "n": n,
                                             "seed": i})})
        session.execute(insert(JobItem), rows)
    return job_id


def unsent_of(svc, job_id: int) -> int:
    with svc.sessions() as session:
        return session.scalar(select(func.count()).where(
            Render.job_id == job_id, Render.status == RenderStatus.QUEUED,
            Render.enqueued_at.is_(None)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_big_job_takes_under_a_kilobyte_a_line_on_disk(svc, tmp_path):
    """After submission (items and their renders), the embedded data dir (database and
    broker) holds at most 1 KB per line."""
    path = big_file(tmp_path / "big.jsonl")
    submit_file(svc.sessions, str(path), CAPS, team="t", budget_cents=10**9, name="big",
                allow_invalid=True)
    with svc.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    used = sum(f.stat().st_size for f in svc.settings.data_dir.rglob("*") if f.is_file())
    assert used / LINES <= 1024, f"{used / LINES:.0f} bytes per line"


def job_summary_of(svc, job_id: int) -> dict:
    with svc.sessions() as session:
        return job_summary(session, job_id)
