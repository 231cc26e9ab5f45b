"""`imagebatch run` as the process a user, `timeout`, `docker stop` or systemd controls: signals,
and a run that renders its own job only (subprocesses on the embedded default)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.acceptance.test_cli import FLUX, ROOT, SECRET, imagebatch, otters, wait_for, write


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    return environ | {"IMAGEBATCH_DATA_DIR": str(tmp_path / "data"),
                      "IMAGEBATCH_API_BASE": fake.base_url, "IMAGEBATCH_API_KEY": SECRET}


def start_run(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", "run", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def settled_calls(fake) -> int:
    """The upstream's call count once no call is in flight and none has arrived for a second
    (a send recorded just before a pause or a kill may still be on its way)."""
    calls = -1
    while calls != fake.stats()["calls"] or fake.stats()["in_flight"]:
        calls = fake.stats()["calls"]
        time.sleep(1.0)
    return calls


def test_sigterm_pauses_run_like_a_first_ctrl_c(env, tmp_path, fake):
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4"}
    run = start_run(env, write(tmp_path, *otters(20, latency=0.8)), "--budget", "1", "--json")
    wait_for(lambda: fake.stats()["in_flight"] > 0, what="a first call")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr
    job = json.loads(stdout)
    assert job["status"] == "paused" and job["reserved_cents"] == 0
    # Every call made was recorded, stored and charged: nothing billed went unrecorded.
    assert 0 < job["items_succeeded"] == fake.stats()["calls"] < 20
    assert job["spent_cents"] == 3 * job["items_succeeded"] == fake.stats()["billed_cents"]
    assert f"imagebatch resume {job['id']}" in stderr


def test_a_second_sigterm_leaves_at_once(env, tmp_path, fake):
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4"}
    run = start_run(env, write(tmp_path, *otters(8, latency=2.0)), "--budget", "1")
    wait_for(lambda: fake.stats()["in_flight"] > 0, what="a first call")
    run.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=5)
    assert run.returncode == 128 + signal.SIGTERM and "leaving now" in stderr


def test_run_renders_its_own_job_not_an_earlier_killed_one(env, tmp_path, fake):
    """Job A's `run` is killed with calls in flight; a later `run` of job B settles what A's
    dead process left (its leases run out) but sends none of A's renders: A waits, running,
    for `resume`."""
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4", "IMAGEBATCH_LEASE_SECONDS": "2"}
    first = tmp_path / "a"
    first.mkdir()
    run_a = start_run(env, write(first, *otters(12, latency=1.0)), "--budget", "1")
    wait_for(lambda: fake.stats()["calls"] >= 4, what="job A's first calls")
    run_a.kill()
    run_a.communicate(timeout=5)
    settled_calls(fake)
    calls_for_a = len(fake.requests())

    bees = [{**FLUX, "prompt": f"bee {i}", "fake": {"latency": 1.5}} for i in range(12)]
    second = tmp_path / "b"
    second.mkdir()
    # Long enough for A's leases to run out and be swept while B renders.
    run_b = imagebatch(env, "run", write(second, *bees), "--budget", "1", "--json")
    assert run_b.returncode == 0, run_b.stderr
    job_b = json.loads(run_b.stdout)
    assert (job_b["status"], job_b["images"]) == ("succeeded", 12)

    prompts = [r["body"]["prompt"] for r in fake.requests()]
    assert not [p for p in prompts[calls_for_a:] if p.startswith("otter")]
    jobs = {j["id"]: j for j in json.loads(imagebatch(env, "status", "--json").stdout)["jobs"]}
    job_a = next(j for i, j in jobs.items() if i != job_b["id"])
    assert job_a["status"] == "running" and job_a["items_succeeded"] < 12
    resumed = imagebatch(env, "resume", str(job_a["id"]), "--json")
    assert resumed.returncode == 0, resumed.stderr
    job_a = json.loads(resumed.stdout)
    assert (job_a["status"], job_a["images"], job_a["reserved_cents"]) == ("succeeded", 12, 0)
    assert job_b["spent_cents"] == 36
    # A's calls cut by the kill are charged unknown (the provider may have billed them).
    assert job_a["spent_cents"] == 36 + job_a["unknown_cents"] > 36


# --- storage that cannot keep results --------------------------------------------------------


def test_run_refuses_storage_that_cannot_keep_results_before_any_call(env, tmp_path, fake):
    jobs = write(tmp_path, *otters(3, latency=0.01))
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the media folder should be")
    for url, says in ((blocked.as_uri(), "not-a-folder"), ("ftp://example.com/media", "ftp"),
                      ((blocked / "media").as_uri(), "not-a-folder")):
        result = imagebatch({**env, "IMAGEBATCH_STORAGE_URL": url}, "run", jobs, "--budget",
                            "1")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and says in result.stderr
        assert "storage cannot keep results" in result.stderr
        assert "IMAGEBATCH_STORAGE_URL" in result.stderr and "nothing was sent" in result.stderr
    worker = imagebatch({**env, "IMAGEBATCH_STORAGE_URL": blocked.as_uri()}, "worker")
    assert worker.returncode == 2 and "storage cannot keep results" in worker.stderr
    assert fake.stats()["calls"] == 0
    assert json.loads(imagebatch(env, "status", "--json").stdout)["jobs"] == []


def test_storage_failing_mid_job_pauses_it_and_its_return_runs_it_again(env, tmp_path, fake):
    """The media folder turns into a file while results arrive: the job pauses at the first
    refused result (nothing new is bought), the results in hand keep trying, and when the
    folder is back they are stored and the job runs on: every call paid once, every file
    kept."""
    media = tmp_path / "media"
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4", "IMAGEBATCH_STORAGE_URL": media.as_uri(),
           "IMAGEBATCH_BACKOFF_BASE": "0.2"}
    run = start_run(env, write(tmp_path, *otters(24, latency=0.5)), "--budget", "1", "--json")
    wait_for(lambda: fake.stats()["calls"] >= 4, what="the first calls")
    media.rename(tmp_path / "media-away")
    media.write_text("storage is gone")

    def status() -> dict[str, object]:
        jobs = json.loads(imagebatch(env, "status", "--json").stdout)["jobs"]
        return json.loads(imagebatch(env, "status", str(jobs[0]["id"]), "--json").stdout)

    wait_for(lambda: status()["status"] == "paused", what="the job pausing")
    assert str(status()["error"]).startswith("storage: cannot write")
    calls = settled_calls(fake)
    time.sleep(1.5)
    assert fake.stats()["calls"] == calls < 24  # nothing new was bought
    media.unlink()
    (tmp_path / "media-away").rename(media)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    job = json.loads(stdout)
    assert (job["status"], job["images"], job["error"]) == ("succeeded", 24, None)
    assert job["spent_cents"] == 72 == fake.stats()["billed_cents"]
    assert fake.stats()["calls"] == 24
    assert len([p for p in media.rglob("*") if p.is_file()]) == 24


# --- a database that refuses writes ----------------------------------------------------------


def test_a_full_disk_stops_buying_and_no_paid_result_is_paid_again(env, tmp_path, fake):
    """The database's files may not grow (RLIMIT_FSIZE on the `run` process: writes fail as on
    a full disk) while results arrive, then may again: the results in hand wait for the
    database and are recorded, nothing new is bought meanwhile, the job ends, and every call
    is paid once."""
    env = {**env, "IMAGEBATCH_CONCURRENCY": "4"}
    assert imagebatch(env, "db", "upgrade").returncode == 0
    data = tmp_path / "data"
    limit = (data / "imagebatch.db").stat().st_size + 400_000

    def limited() -> None:
        # The soft limit only: this test may raise it again without privileges.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    run = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", write(tmp_path, *otters(80, latency=0.3)),
         "--budget", "5", "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=limited)
    wal = data / "imagebatch.db-wal"
    try:
        wait_for(lambda: wal.exists() and wal.stat().st_size >= limit - 8192, timeout=60,
                 what="the database's log reaching the limit")
        calls = fake.stats()["calls"]
        # Longer than the driver-level retries of a lost connection (about 15 s).
        time.sleep(20)
        assert fake.stats()["calls"] <= calls + 4  # at most the calls already under way
        assert run.poll() is None
    finally:
        resource.prlimit(run.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # room again
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "Traceback" not in stderr
    job = json.loads(stdout)
    assert (job["status"], job["images"], job["reserved_cents"]) == ("succeeded", 80, 0)
    assert fake.stats()["calls"] == 80 == fake.stats()["billed_calls"]
    assert job["spent_cents"] == 240 == fake.stats()["billed_cents"]
