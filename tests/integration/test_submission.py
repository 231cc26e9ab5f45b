"""Submitting a job file, streamed: the line reader and per-line planning (no server), the
chunked writes on SQLite and PostgreSQL, and what `imagebatch submit` prints for bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

import pipeline.submission as submission
from pipeline.caps import Caps
from pipeline.db import make_engine, session_factory
from pipeline.models import Job, JobItem, Render
from pipeline.submission import (
    JobFileError,
    check_file,
    file_digest,
    submit_file,
)

CAPS = {
    "flux": Caps("flux", max_n=4, aspect_ratios=("1:1", "16:9"), price_per_image_cents=3),
    "gpt": Caps("gpt", max_n=10, price_per_image_cents=4),
}


def jsonl(*objs: object) -> bytes:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs).encode()


def write(tmp_path: Path, data: bytes, name: str = "jobs.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def flux(i: int, **extra: object) -> dict[str, object]:
    return {"custom_id": f"c{i}", "model": "flux", "prompt": f"otter {i}", **extra}


# --- reading and planning, no server -------------------------------------------------------


def test_check_file_keeps_the_first_100_errors_and_counts_them_all(tmp_path):
    lines = [flux(i, n=2) if i % 2 else {"model": "nope", "prompt": "x"} for i in range(1, 501)]
    path = write(tmp_path, jsonl(*lines))
    result = check_file(path, CAPS)
    assert (result.items, result.images, result.calls, result.max_cost_cents) == (
        250, 500, 250, 1500)
    assert result.error_count == 250 and len(result.errors) == 100
    assert [e.line for e in result.errors[:3]] == [2, 4, 6]
    assert result.job_id is None
    assert result.digest == file_digest(path) == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_unreadable_and_empty_files_are_one_line_errors(tmp_path):
    with pytest.raises(JobFileError, match="no such file"):
        check_file(str(tmp_path / "missing.jsonl"), CAPS)
    with pytest.raises(JobFileError, match="is a directory"):
        check_file(str(tmp_path), CAPS)
    with pytest.raises(JobFileError, match="no job lines"):
        check_file(write(tmp_path, b"\n  \r\n"), CAPS)


# --- writing, on SQLite and PostgreSQL -----------------------------------------------------


@pytest.fixture
def sessions(database_url):
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so a file of a few dozen lines is written in several transactions."""
    monkeypatch.setattr(submission, "CHUNK_ROWS", 7)


def counts(sessions) -> tuple[int, int]:
    with sessions() as session:
        return (session.scalar(select(func.count()).select_from(Job)),
                session.scalar(select(func.count()).select_from(JobItem)))


def submit(sessions, path: str, allow_invalid: bool = False):
    return submit_file(sessions, path, CAPS, team="data", budget_cents=500, name="jobs.jsonl",
                       allow_invalid=allow_invalid)


def test_a_file_is_written_in_chunks_as_a_running_job_with_its_renders(sessions, tmp_path,
                                                                      small_chunks):
    """Planned as it is read: items and their renders (waiting in SQL for the broker's
    window) in chunks, the job running once the last chunk is in, its counters set."""
    lines = [flux(i, metadata={"i": i}, n=5) for i in range(1, 31)]
    lines[3] = {"model": "gpt", "prompt": "caf\u00e9 \u2028", "custom_id": "g"}
    path = write(tmp_path, jsonl(*lines))
    result = submit(sessions, path)
    assert (result.items, result.error_count, result.calls) == (30, 0, 29 * 2 + 1)
    with sessions() as session:
        job = session.get_one(Job, result.job_id)
        items = session.scalars(select(JobItem).order_by(JobItem.line)).all()
        renders = session.execute(select(Render.item_id, Render.render_index, Render.n,
                                         Render.status, Render.enqueued_at, Render.model)
                                  .order_by(Render.id)).all()
    assert (job.status, job.team, job.budget_cents, job.name, job.source) == (
        "running", "data", 500, "jobs.jsonl", "cli")
    assert (job.open_renders, job.items_total, job.plan_cursor) == (59, 30, None)
    assert job.source_digest == file_digest(path) == result.digest
    assert [i.line for i in items] == list(range(1, 31))
    assert {i.status for i in items} == {"running"} and {i.job_id for i in items} == {job.id}
    assert len(renders) == 59 and {(r.status, r.enqueued_at) for r in renders} == {
        ("queued", None)}
    assert [(r.render_index, r.n) for r in renders if r.item_id == items[0].id] == [
        (0, 4), (1, 1)]
    assert (items[0].custom_id, json.loads(items[0].meta)) == ("c1", {"i": 1})
    assert {r.model for r in renders if r.item_id == items[0].id} == {"flux"}
    assert json.loads(items[0].body) == {"model": "flux", "prompt": "otter 1", "n": 5}
    assert json.loads(items[3].body)["prompt"] == "caf\u00e9 \u2028"


def test_an_invalid_line_leaves_no_job_and_no_items(sessions, tmp_path, small_chunks):
    lines = [flux(i) for i in range(1, 41)]
    lines[24] = {"model": "flux"}  # line 25: after three chunks were written
    lines[35] = flux(1)  # line 36: a repeated custom_id, found after writing stopped
    result = submit(sessions, write(tmp_path, jsonl(*lines)))
    assert result.job_id is None
    assert [(e.line, e.reason) for e in result.errors] == [
        (25, "missing prompt"), (36, "custom_id 'c1' repeats line 1")]
    assert counts(sessions) == (0, 0)


def test_allow_invalid_keeps_failed_items_with_their_reasons(sessions, tmp_path, small_chunks):
    lines = [flux(i) for i in range(1, 21)]
    lines[1] = "{oops"
    lines[9] = flux(10, aspect_ratio="5:4")
    lines[14] = flux(3)
    result = submit(sessions, write(tmp_path, jsonl(*lines)), allow_invalid=True)
    assert (result.items, result.error_count) == (17, 3)
    with sessions() as session:
        job = session.get_one(Job, result.job_id)
        failed = session.execute(
            select(JobItem.line, JobItem.status, JobItem.error, JobItem.body)
            .where(JobItem.status == "failed").order_by(JobItem.line)).all()
        running = session.scalar(select(func.count()).where(JobItem.status == "running"))
    assert job.status == "running" and running == 17
    assert (job.items_total, job.items_failed) == (20, 3)
    assert [(f.line, f.status) for f in failed] == [(2, "failed"), (10, "failed"),
                                                   (15, "failed")]
    assert "not valid JSON" in failed[0].error and failed[0].body == "{oops"
    assert "aspect_ratio '5:4'" in failed[1].error
    assert json.loads(failed[1].body)["aspect_ratio"] == "5:4"  # `retry` can plan it again
    assert failed[2].error == "custom_id 'c3' repeats line 3"


def test_a_submission_interrupted_midway_leaves_nothing(sessions, tmp_path, small_chunks):
    class Interrupting(dict):
        def get(self, model, default=None):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 20:
                raise KeyboardInterrupt
            return super().get(model, default)

    with pytest.raises(KeyboardInterrupt):
        submit_file(sessions, write(tmp_path, jsonl(*[flux(i) for i in range(1, 31)])),
                    Interrupting(CAPS), team="t", budget_cents=1, name=None,
                    allow_invalid=False)
    assert counts(sessions) == (0, 0)


def test_an_empty_file_creates_nothing(sessions, tmp_path):
    with pytest.raises(JobFileError, match="no job lines"):
        submit(sessions, write(tmp_path, b"\n\n"))
    assert counts(sessions) == (0, 0)


# --- the command ---------------------------------------------------------------------------
