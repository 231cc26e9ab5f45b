"""One submission rule for every way a job comes in: `submit`, a schedule (added, then
fired) and SQL rows are checked against the models' caps alike, and each job records where
it came from (cli, schedule, sql). The CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.acceptance.test_cli import FLUX, imagebatch, write
from tests.integration.test_sql_submit import run_readme_sql

# Three lines `submit` refuses, each for a different check against what a model takes.
UNKNOWN_MODEL = {"model": "nope", "prompt": "x", "custom_id": "u"}
OVER_N = {**FLUX, "n": 20_000}
BAD_RATIO = {**FLUX, "aspect_ratio": "5:4"}


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url)
    return environ


def invalid_lines(stderr: str, path: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{path}:")]


def failed_items(env: dict[str, str], job_id: int) -> list[tuple[int, str]]:
    job = json.loads(imagebatch(env, "status", str(job_id), "--json").stdout)
    return sorted((e["line"], e["error"]) for e in job["errors"])


def sources(env: dict[str, str]) -> dict[int, str]:
    database = Path(env["IMAGEBATCH_DATA_DIR"]) / "imagebatch.db"
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT id, source FROM jobs").fetchall())


def test_a_schedule_is_refused_for_the_lines_submit_refuses(env, tmp_path):
    jobs = write(tmp_path, FLUX, UNKNOWN_MODEL, OVER_N, BAD_RATIO)
    submitted = imagebatch(env, "submit", jobs, "--budget", "1")
    added = imagebatch(env, "schedule", "add", "nightly", jobs, "--cron", "0 3 * * *",
                       "--budget", "1")
    assert added.returncode == submitted.returncode == 2
    assert "Traceback" not in added.stderr
    refused = invalid_lines(added.stderr, jobs)
    assert refused == invalid_lines(submitted.stderr, jobs)
    assert [line.split(": ")[0] for line in refused] == [
        f"{jobs}:2 (u)", f"{jobs}:3", f"{jobs}:4"]
    assert "unknown model 'nope'" in refused[0] and "n must be an integer" in refused[1]
    assert "aspect_ratio '5:4'" in refused[2]
    assert added.stderr.splitlines()[-1] == (
        f"error: 3 invalid line(s) in {jobs}; nothing was stored (fix them, or pass "
        "--allow-invalid to run the rest)")
    assert json.loads(imagebatch(env, "schedule", "list", "--json").stdout) == []


def test_a_scheduled_job_fails_the_lines_submit_fails_with_the_same_reasons(env, tmp_path):
    jobs = write(tmp_path, FLUX, UNKNOWN_MODEL, OVER_N, BAD_RATIO)
    added = imagebatch(env, "schedule", "add", "nightly", jobs, "--cron", "0 3 * * *",
                       "--budget", "1", "--allow-invalid")
    assert added.returncode == 0, added.stderr
    assert len(invalid_lines(added.stderr, jobs)) == 3  # said, as `submit --allow-invalid`
    submitted = json.loads(imagebatch(env, "submit", jobs, "--budget", "1", "--allow-invalid",
                                      "--json").stdout)
    ran = imagebatch(env, "schedule", "run", "nightly")
    assert ran.returncode == 0, ran.stderr
    scheduled = int(ran.stdout.split("job ")[1].split()[0])
    assert imagebatch(env, "dispatch").returncode == 0  # plans it against the caps
    expected = failed_items(env, submitted["id"])
    assert [line for line, _ in expected] == [2, 3, 4]
    assert failed_items(env, scheduled) == expected
    job = json.loads(imagebatch(env, "status", str(scheduled), "--json").stdout)
    assert (job["items_total"], job["items_failed"]) == (4, 3)


def test_a_schedule_of_valid_lines_is_kept_and_fires_them_all(env, tmp_path):
    jobs = write(tmp_path, FLUX, {**FLUX, "n": 5, "seed": 7})
    added = imagebatch(env, "schedule", "add", "ok", jobs, "--cron", "0 3 * * *",
                       "--budget", "1")
    assert added.returncode == 0 and added.stderr == ""
    ran = imagebatch(env, "schedule", "run", "ok")
    scheduled = int(ran.stdout.split("job ")[1].split()[0])
    imagebatch(env, "dispatch")
    assert failed_items(env, scheduled) == []


def test_jobs_record_where_they_came_from(env, tmp_path, fake):
    jobs = write(tmp_path, FLUX)
    submitted = json.loads(imagebatch(env, "submit", jobs, "--budget", "1", "--json").stdout)
    ran = json.loads(imagebatch(env, "run", jobs, "--budget", "1", "--new", "--json").stdout)
    assert imagebatch(env, "schedule", "add", "s", jobs, "--cron", "0 3 * * *",
                      "--budget", "1").returncode == 0
    fired = int(imagebatch(env, "schedule", "run", "s").stdout.split("job ")[1].split()[0])
    database = Path(env["IMAGEBATCH_DATA_DIR"]) / "imagebatch.db"
    run_readme_sql(f"sqlite:///{database}")
    inserted = max(sources(env))
    assert sources(env) == {submitted["id"]: "cli", ran["id"]: "cli", fired: "schedule",
                            inserted: "sql"}


def test_lines_sql_cannot_keep_are_refused_as_submit_refuses_and_stay_failed(env, tmp_path):
    """Bytes that are not UTF-8, and a NUL, inside a prompt: each line refused as `submit`
    refuses it; allowed, the schedule keeps them failing (never as a valid request)."""
    path = tmp_path / "raw.jsonl"
    path.write_bytes(json.dumps(FLUX).encode() + b"\n"
                     + b'{"model": "flux-2-dev", "prompt": "caf\xe9"}\n'
                     + b'{"model": "flux-2-dev", "prompt": "a\x00b"}\n')
    jobs = str(path)
    submitted = imagebatch(env, "submit", jobs, "--budget", "1")
    added = imagebatch(env, "schedule", "add", "raw", jobs, "--cron", "0 3 * * *",
                       "--budget", "1")
    assert added.returncode == submitted.returncode == 2
    assert invalid_lines(added.stderr, jobs) == invalid_lines(submitted.stderr, jobs)
    assert [line.split(": ")[0] for line in invalid_lines(added.stderr, jobs)] == [
        f"{jobs}:2", f"{jobs}:3"]
    assert "not UTF-8 text (byte 39)" in added.stderr and "Traceback" not in added.stderr
    allowed = imagebatch(env, "schedule", "add", "raw", jobs, "--cron", "0 3 * * *",
                         "--budget", "1", "--allow-invalid")
    assert allowed.returncode == 0, allowed.stderr
    ran = imagebatch(env, "schedule", "run", "raw")
    scheduled = int(ran.stdout.split("job ")[1].split()[0])
    assert imagebatch(env, "dispatch").returncode == 0
    assert [line for line, _ in failed_items(env, scheduled)] == [2, 3]
