"""A sample run's job on SQLite and PostgreSQL: only the drawn lines render, the job pauses
instead of ending, and resuming renders every other line once, never a sampled one again."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.caps import current_caps
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import resume_job
from pipeline.sample import sample_cost, sample_rendered
from pipeline.submission import submit_job
from tests.helpers import assert_books_balance, render_all, summary


def job_file(tmp_path: Path, count: int) -> str:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "model": "flux-2-dev",
                                        "prompt": f"otter {i}"}) + "\n" for i in range(count)))
    return str(path)


def render_everything(svc) -> None:
    while renders := dispatch_pending(svc):
        render_all(svc, renders)


def test_a_sample_renders_its_lines_pauses_and_resume_renders_the_rest_once(svc, fake, tmp_path):
    caps = current_caps(svc.settings, svc.sessions)
    planned = submit_job(svc.sessions, job_file(tmp_path, 40), caps, team="t",
                         budget_cents=500, name="s", allow_invalid=False, sample=5)
    job_id = planned.job_id
    render_everything(svc)

    s = summary(svc, job_id)
    assert (s["status"], s["sample_lines"], s["items_succeeded"]) == ("paused", 5, 5)
    assert fake.stats()["calls"] == 5 and s["spent_cents"] == 15 == fake.stats()["billed_cents"]
    with svc.sessions() as session:
        assert sample_rendered(session, job_id)
    assert sample_cost(s).projected_cents == 120
    assert_books_balance(svc, job_id)

    resumed = resume_job(svc.sessions, job_id, in_process=False)
    assert resumed.resumed
    render_everything(svc)
    s = summary(svc, job_id)
    assert (s["status"], s["sample_lines"], s["items_succeeded"]) == ("succeeded", None, 40)
    # 40 calls in all: the 5 sampled lines were not sent again.
    assert fake.stats()["calls"] == 40
    assert s["spent_cents"] == 120 == fake.stats()["billed_cents"]
    assert_books_balance(svc, job_id)


def test_a_sample_of_the_whole_file_is_an_ordinary_job(svc, fake, tmp_path):
    caps = current_caps(svc.settings, svc.sessions)
    planned = submit_job(svc.sessions, job_file(tmp_path, 4), caps, team="t",
                         budget_cents=500, name="s", allow_invalid=False, sample=10)
    render_everything(svc)
    s = summary(svc, planned.job_id)
    assert (s["status"], s["sample_lines"], s["items_succeeded"]) == ("succeeded", None, 4)
    assert_books_balance(svc, planned.job_id)
