"""The `imagebatch` command in a subprocess, as a user runs it (embedded default: SQLite,
a media folder, an in-process worker or the embedded broker), against the fake upstream."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import ROOT

SECRET = "sk-air-TESTSECRET-0123456789abcdef"


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url,
                   IMAGEBATCH_API_KEY=SECRET, IMAGEBATCH_CONCURRENCY="16")
    return environ


def imagebatch(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def write(tmp_path: Path, *lines: object) -> str:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


FLUX = {"model": "flux-2-dev", "prompt": "an otter"}


def test_run_renders_a_job_and_prints_one_json_object(env, tmp_path, fake):
    jobs = write(tmp_path, {**FLUX, "n": 5, "custom_id": "a", "metadata": {"split": "train"}},
                 "", {"model": "suno-v5", "prompt": "song", "style": "EDM", "custom_id": "s"})
    result = imagebatch(env, "run", jobs, "--budget", "5.00", "--team", "data", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["status"] == "succeeded" and job["team"] == "data"
    assert (job["budget_cents"], job["spent_cents"], job["reserved_cents"]) == (500, 20, 0)
    assert (job["items_total"], job["items_succeeded"], job["items_failed"]) == (2, 2, 0)
    assert job["images"] == 6 and job["unknown_cents"] == 0
    assert fake.stats()["billed_cents"] == 20

    exported = imagebatch(env, "export", str(job["id"]), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 6
    assert {r["content_type"] for r in rows} == {"image/png", "audio/mpeg"}
    song = next(r for r in rows if r["custom_id"] == "s")
    assert song["uri"].endswith(".mp3") and song["cost_cents"] == "5"
    for row in rows:
        assert Path(row["uri"].removeprefix("file://")).stat().st_size == int(row["bytes"])
    first = json.loads(imagebatch(env, "export", str(job["id"])).stdout.splitlines()[0])
    assert first["metadata"] == {"split": "train"} and first["line"] == 1


def test_invalid_lines_are_reported_with_their_line_and_nothing_is_created(env, tmp_path):
    jobs = write(tmp_path, FLUX, {**FLUX, "aspect_ratio": "5:4"}, "{oops",
                 {"model": "nope", "prompt": "x"}, {"model": "flux-2-dev"})
    result = imagebatch(env, "run", jobs, "--budget", "1")
    assert result.returncode == 2
    for line, reason in [(2, "aspect_ratio '5:4'"), (3, "not valid JSON"),
                         (4, "unknown model 'nope'"), (5, "missing prompt")]:
        assert f"jobs.jsonl:{line}: " in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(imagebatch(env, "status", "--json").stdout) == {"jobs": []}


def test_allow_invalid_runs_the_rest_and_exits_1(env, tmp_path, fake):
    jobs = write(tmp_path, FLUX, "{oops", {**FLUX, "aspect_ratio": "5:4"})
    result = imagebatch(env, "run", jobs, "--budget-cents", "100", "--allow-invalid", "--json")
    assert result.returncode == 1
    job = json.loads(result.stdout)
    assert (job["status"], job["items_succeeded"], job["items_failed"]) == ("partial", 1, 2)
    status = json.loads(imagebatch(env, "status", str(job["id"]), "--json").stdout)
    assert {e["line"] for e in status["errors"]} == {2, 3}


def test_plan_shows_calls_and_the_maximum_cost_without_generating(env, tmp_path, fake):
    jobs = write(tmp_path, {**FLUX, "n": 9}, {"model": "nano-banana-pro", "prompt": "b", "n": 3})
    result = imagebatch(env, "plan", jobs, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["items"], plan["images"], plan["calls"]) == (2, 12, 5)
    assert plan["max_cost_cents"] == 9 * 3 + 3 * 12
    assert fake.stats()["calls"] == 0


def test_stdin_and_usage_errors(env, tmp_path):
    result = imagebatch(env, "plan", "-", stdin=json.dumps(FLUX) + "\n")
    assert result.returncode == 0 and "flux-2-dev" in result.stdout
    no_budget = imagebatch(env, "run", write(tmp_path, FLUX))
    assert no_budget.returncode == 2 and "--budget" in no_budget.stderr
    missing = imagebatch(env, "run", str(tmp_path / "nope.jsonl"), "--budget", "1")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    unpriced = imagebatch(env, "plan", write(tmp_path, {"model": "preview-model", "prompt": "p"}))
    assert unpriced.returncode == 2 and "no known price" in unpriced.stderr
    bad_env = imagebatch({**env, "IMAGEBATCH_CONCURRENCY": "lots"}, "status")
    assert bad_env.returncode == 2 and "IMAGEBATCH_CONCURRENCY" in bad_env.stderr


def test_models_table_and_json(env):
    table = imagebatch(env, "models", "--refresh")
    assert table.returncode == 0
    for name in ("flux-2-dev", "suno-v5", "wan-2.2", "no price"):
        assert name in table.stdout
    listed = json.loads(imagebatch(env, "models", "--json").stdout)
    flux = next(m for m in listed if m["model"] == "flux-2-dev")
    assert flux["max_n"] == 4 and flux["price_per_image_cents"] == 3


def test_submit_and_a_separate_worker_need_no_server(env, tmp_path, fake):
    submitted = imagebatch(env, "submit", write(tmp_path, *[FLUX] * 6), "--budget", "1", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for_status(env, job_id, "succeeded")
        assert job["status"] == "succeeded", job
        assert job["spent_cents"] == 18 == fake.stats()["billed_cents"]
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=30)
    assert SECRET not in stderr


def test_the_api_key_reaches_no_output_sql_or_export(env, tmp_path, fake):
    jobs = write(tmp_path, FLUX, {**FLUX, "fake": {"status": 401}})
    result = imagebatch(env, "-vv", "run", jobs, "--budget", "1", "--json")
    job = json.loads(result.stdout)
    assert fake.requests()[0]["authorization"] is True
    exported = imagebatch(env, "export", str(job["id"]))
    status = imagebatch(env, "status", str(job["id"]), "--json")
    for text in (result.stdout, result.stderr, exported.stdout, status.stdout):
        assert SECRET not in text
    for file in (tmp_path / "data").rglob("*"):
        if file.is_file():
            assert SECRET.encode() not in file.read_bytes(), file


def test_cancel_and_retry_commands(env, tmp_path, fake):
    jobs = write(tmp_path, FLUX, {**FLUX, "fake": {"status": 400, "fail_first": 1, "key": "c"}})
    job = json.loads(imagebatch(env, "run", jobs, "--budget", "1", "--json").stdout)
    assert job["status"] == "partial"
    retried = imagebatch(env, "retry", str(job["id"]))
    assert retried.returncode == 0 and "1 failed item" in retried.stdout
    assert imagebatch(env, "cancel", str(job["id"])).returncode == 0
    after = json.loads(imagebatch(env, "status", str(job["id"]), "--json").stdout)
    assert after["status"] == "cancelled" and after["reserved_cents"] == 0
    assert imagebatch(env, "cancel", "999").returncode == 2


def test_demo_runs_with_no_key_and_no_servers(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ["IMAGEBATCH_DATA_DIR"] = str(tmp_path / "data")
    result = imagebatch(environ, "demo", "--latency", "0.05")
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout and "billed" in result.stdout
    assert any((tmp_path / "data" / "media").rglob("*.mp4"))


def test_team_budget_report_and_schedule_commands(env, tmp_path, fake):
    assert imagebatch(env, "team", "set", "data", "--budget", "0.05", "--period", "day"
                      ).returncode == 0
    jobs = write(tmp_path, *[FLUX] * 3)
    job = json.loads(imagebatch(env, "run", jobs, "--team", "data", "--budget", "1",
                                "--json").stdout)
    assert (job["spent_cents"], job["items_succeeded"], job["status"]) == (3, 1, "partial")
    team = json.loads(imagebatch(env, "team", "show", "data", "--json").stdout)
    assert (team["limit_cents"], team["spent_cents"], team["left_cents"]) == (5, 3, 2)
    assert team["period_start"].endswith("T00:00:00Z")
    assert "data" in imagebatch(env, "team", "list").stdout
    assert imagebatch(env, "team", "show", "nobody").returncode == 2

    report = json.loads(imagebatch(env, "report", "--team", "data", "--by", "model",
                                   "--json").stdout)
    assert report["total"]["charged_cents"] == 3 and report["total"]["images"] == 1
    assert report["rows"][0]["group"] == "flux-2-dev"
    csv_report = imagebatch(env, "report", "--by", "day", "--format", "csv").stdout
    assert csv_report.splitlines()[0].startswith("group,calls,images")
    assert imagebatch(env, "report", "--since", "yesterday").returncode == 2

    added = imagebatch(env, "schedule", "add", "nightly", jobs, "--cron", "0 3 * * *",
                       "--team", "data", "--budget", "0.10", "--timezone", "Europe/Berlin")
    assert added.returncode == 0, added.stderr
    Path(jobs).unlink()  # the schedule keeps the file's content
    listed = json.loads(imagebatch(env, "schedule", "list", "--json").stdout)
    assert listed[0]["name"] == "nightly" and listed[0]["last_job_id"] is None
    ran = imagebatch(env, "schedule", "run", "nightly")
    assert ran.returncode == 0 and "submitted" in ran.stdout
    assert imagebatch(env, "schedule", "add", "bad", str(tmp_path / "x"), "--cron", "* * *",
                      "--budget", "1").returncode == 2
    assert imagebatch(env, "schedule", "remove", "nightly").returncode == 0
    assert imagebatch(env, "schedule", "remove", "nightly").returncode == 2


# --- pause, resume, run of an unfinished file ----------------------------------------------


def otters(count: int, latency: float) -> list[dict[str, object]]:
    return [{**FLUX, "prompt": f"otter {i}", "fake": {"latency": latency}} for i in range(count)]


def wait_for_status(env: dict[str, str], job_id: int, status: str,
                    timeout: float = 60.0) -> dict[str, object]:
    """`status JOB --json` polled until the job is `status` (or the time is up): the last one."""
    deadline = time.monotonic() + timeout
    while True:
        job = json.loads(imagebatch(env, "status", str(job_id), "--json").stdout)
        if job["status"] == status or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def wait_for(check, timeout: float = 30.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def test_ctrl_c_pauses_run_and_resume_finishes_it(env, tmp_path, fake):
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4"}
    jobs = write(tmp_path, *otters(20, latency=0.8))
    run = subprocess.Popen([sys.executable, "-m", "cli", "run", jobs, "--budget", "1", "--json"],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: fake.stats()["in_flight"] > 0, what="a first call")
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stderr
    paused = json.loads(stdout)
    job_id = paused["id"]
    assert paused["status"] == "paused" and paused["reserved_cents"] == 0
    # Every call that was made finished, was stored and charged; nothing else was sent.
    assert 0 < paused["items_succeeded"] == fake.stats()["calls"] < 20
    assert paused["spent_cents"] == 3 * paused["items_succeeded"]
    assert f"imagebatch resume {job_id}" in stderr
    status = json.loads(imagebatch(env, "status", str(job_id), "--json").stdout)
    assert status["status"] == "paused"

    again = imagebatch(env, "run", jobs, "--budget", "1")
    assert again.returncode == 2
    assert f"submitted as job {job_id}, which is paused" in again.stderr
    assert f"imagebatch resume {job_id}" in again.stderr and "--new" in again.stderr
    assert len(json.loads(imagebatch(env, "status", "--json").stdout)["jobs"]) == 1

    resumed = imagebatch(env, "resume", str(job_id), "--json")
    assert resumed.returncode == 0, resumed.stderr
    job = json.loads(resumed.stdout)
    assert (job["id"], job["status"], job["items_succeeded"], job["images"]) == (
        job_id, "succeeded", 20, 20)
    prompts = [r["body"]["prompt"] for r in fake.requests()]
    assert sorted(prompts) == sorted(f"otter {i}" for i in range(20))  # none twice
    assert job["spent_cents"] == 60 == fake.stats()["billed_cents"]

    nothing = imagebatch(env, "resume", str(job_id))
    assert nothing.returncode == 0 and "nothing to resume" in nothing.stderr
    assert fake.stats()["calls"] == 20


def test_run_of_a_file_whose_job_is_unfinished_needs_new(env, tmp_path, fake):
    jobs = write(tmp_path, *otters(3, latency=0.01))
    submitted = json.loads(imagebatch(env, "submit", jobs, "--budget", "1", "--json").stdout)
    refused = imagebatch(env, "run", jobs, "--budget", "1", "--json")
    assert refused.returncode == 2 and refused.stdout == ""
    assert (f"jobs.jsonl was submitted as job {submitted['id']}, which is running (0/3 items "
            f"done): continue it with `imagebatch resume {submitted['id']}`") in refused.stderr
    assert fake.stats()["calls"] == 0
    fresh = imagebatch(env, "run", jobs, "--budget", "1", "--new", "--json")
    assert fresh.returncode == 0, fresh.stderr
    job = json.loads(fresh.stdout)
    assert job["id"] != submitted["id"] and (job["status"], job["images"]) == ("succeeded", 3)
    piped = imagebatch(env, "run", "-", "--budget", "1", "--json", stdin=Path(jobs).read_text())
    assert piped.returncode == 0, piped.stderr  # standard input is never matched
    assert json.loads(piped.stdout)["id"] not in (job["id"], submitted["id"])


def test_pause_and_resume_detach_on_a_worker(env, tmp_path, fake):
    env = {**env, "IMAGEBATCH_CONCURRENCY": "2"}
    # 1.5 s a call, two at a time: 9 s of work, so `pause` (a process of its own, a second or
    # more to start on a loaded machine) comes while the job still runs.
    submitted = imagebatch(env, "submit", write(tmp_path, *otters(12, latency=1.5)), "--budget",
                           "1", "--json")
    job_id = json.loads(submitted.stdout)["id"]
    # Its log goes to a file: a pipe nobody reads until the end fills, and the worker blocks.
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=log, text=True)

    def status() -> dict[str, object]:
        return json.loads(imagebatch(env, "status", str(job_id), "--json").stdout)

    try:
        wait_for(lambda: fake.stats()["calls"] > 0, what="a first call")
        paused = imagebatch(env, "pause", str(job_id))
        assert paused.returncode == 0 and f"imagebatch resume {job_id}" in paused.stdout
        # A send recorded just before the pause may still be on its way to the upstream:
        # wait until no call has arrived or run for a whole second.
        calls = -1
        while calls != fake.stats()["calls"] or fake.stats()["in_flight"]:
            calls = fake.stats()["calls"]
            time.sleep(1.0)
        time.sleep(1.5)  # the worker keeps its queue: nothing new is sent
        assert fake.stats()["calls"] == calls < 12
        assert status()["status"] == "paused"
        assert imagebatch(env, "pause", str(job_id)).stdout.strip().endswith("paused already")
        detached = imagebatch(env, "resume", str(job_id), "--detach")
        assert detached.returncode == 0 and "running again" in detached.stdout
        wait_for(lambda: status()["status"] == "succeeded", timeout=60,
                 what=f"the job ending (worker log: {tmp_path / 'worker.log'})")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
        log.close()
    prompts = [r["body"]["prompt"] for r in fake.requests()]
    assert sorted(prompts) == sorted(f"otter {i}" for i in range(12))
    assert status()["spent_cents"] == 36 == fake.stats()["billed_cents"]


def test_cancel_then_resume_and_retry_only(env, tmp_path, fake):
    jobs = write(tmp_path, FLUX, {**FLUX, "prompt": "refused", "fake": {"status": 400}})
    job = json.loads(imagebatch(env, "run", jobs, "--budget", "1", "--json").stdout)
    assert job["status"] == "partial"
    resumed = imagebatch(env, "resume", str(job["id"]))
    assert resumed.returncode == 1 and "retry" in resumed.stderr
    wrong = imagebatch(env, "retry", str(job["id"]), "--only", "failed,everything")
    assert wrong.returncode == 2 and "everything" in wrong.stderr
    only = imagebatch(env, "retry", str(job["id"]), "--only", "cancelled,budget")
    assert only.returncode == 0 and "nothing to retry (no cancelled or budget items)" in only.stdout
    assert imagebatch(env, "pause", "999").returncode == 2
    assert imagebatch(env, "resume", "999").returncode == 2


def test_a_second_ctrl_c_leaves_at_once_and_resume_takes_the_calls_back(env, tmp_path, fake):
    """Killed with calls in flight: their leases run out, the sweeper of `resume` charges them
    unknown (the provider may have billed them) and renders them again."""
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4", "IMAGEBATCH_LEASE_SECONDS": "2"}
    jobs = write(tmp_path, *otters(12, latency=1.0))
    run = subprocess.Popen([sys.executable, "-m", "cli", "run", jobs, "--budget", "1"],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for(lambda: fake.stats()["in_flight"] > 0, what="a first call")
    run.send_signal(signal.SIGINT)
    time.sleep(0.2)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=5)
    assert run.returncode == 130 and "leaving now" in stderr
    job_id = json.loads(imagebatch(env, "status", "--json").stdout)["jobs"][0]["id"]
    assert f"imagebatch resume {job_id}" in stderr
    resumed = imagebatch(env, "resume", str(job_id), "--json")
    assert resumed.returncode == 0, resumed.stderr
    job = json.loads(resumed.stdout)
    assert (job["status"], job["items_succeeded"], job["images"]) == ("succeeded", 12, 12)
    assert job["reserved_cents"] == 0 and job["spent_cents"] == 36 + job["unknown_cents"]
