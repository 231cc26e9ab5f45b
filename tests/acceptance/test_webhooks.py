"""`--notify URL` from the command line: `run` tells a receiver when its job ends, a process
killed mid-delivery leaves it to another, and bad input is one line, exit 2, nothing made."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.models import utcnow
from pipeline.settings import Settings
from pipeline.webhooks import CLAIM_SECONDS, deliver_due
from tests.acceptance.test_cli import FLUX, ROOT, SECRET, imagebatch, wait_for_status, write
from tests.receiver import WEBHOOK_SECRET, receiver


@pytest.fixture
def hook():
    with receiver() as r:
        yield r


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    return environ | {"IMAGEBATCH_DATA_DIR": str(tmp_path / "data"),
                      "IMAGEBATCH_API_BASE": fake.base_url, "IMAGEBATCH_API_KEY": SECRET,
                      "IMAGEBATCH_CONCURRENCY": "16",
                      "IMAGEBATCH_WEBHOOK_SECRET": WEBHOOK_SECRET,
                      "IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS": "1"}


def jobs_in(env: dict[str, str]) -> int:
    database = Path(env["IMAGEBATCH_DATA_DIR"]) / "imagebatch.db"
    if not database.exists():
        return 0
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM jobs").fetchone()[0]


@contextmanager
def running(env: dict[str, str], command: str) -> Iterator[None]:
    """`imagebatch worker` or `beat` in the background, stopped as a user stops it (SIGTERM)."""
    process = subprocess.Popen([sys.executable, "-m", "cli", command], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_run_with_notify_posts_the_jobs_end_signed(env, tmp_path, fake, hook):
    result = imagebatch(env, "run", write(tmp_path, FLUX, {**FLUX, "n": 3}), "--budget-cents",
                        "12", "--notify", hook.url, "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    # Told before `run` left: the job's 50, 80 and 100 % (12 cents of 12), then its end.
    posts = hook.wait_for(4, timeout=1)
    assert [p.document["event"] for p in posts] == [
        "spend.50", "spend.80", "spend.100", "job.succeeded"]
    assert all(p.signed_by(WEBHOOK_SECRET) for p in posts)
    assert len({p.delivery for p in posts}) == 4
    end = posts[-1].document
    status = json.loads(imagebatch(env, "status", str(job["id"]), "--json").stdout)
    told = status.pop("webhooks")
    assert end == {"event": "job.succeeded", **status}
    assert [t["status"] for t in told] == ["sent"] * 4
    assert WEBHOOK_SECRET not in result.stdout + result.stderr
    text = imagebatch(env, "status", str(job["id"])).stdout
    assert "webhook job.succeeded: sent (1 attempt)" in text


def test_a_run_whose_receiver_fails_says_so_and_leaves_it_waiting(env, tmp_path, fake, hook):
    hook.answers = [500] * 10
    result = imagebatch(env, "run", write(tmp_path, FLUX), "--budget", "1", "--notify",
                        hook.url, "--json")
    assert result.returncode == 0, result.stderr
    assert "webhook job.succeeded of job 1 is not delivered yet (127.0.0.1 answered HTTP " \
           "500)" in result.stderr
    assert "t0ken" not in result.stderr  # the URL's query (a token) is never shown
    status = json.loads(imagebatch(env, "status", "1", "--json").stdout)
    assert status["webhooks"][0]["status"] == "pending"


def test_a_delivery_outlives_the_process_killed_while_sending_it(env, tmp_path, fake, hook):
    hook.hang.set()  # the receiver takes the POST and does not answer
    run = subprocess.Popen([sys.executable, "-m", "cli", "run", write(tmp_path, FLUX),
                            "--budget", "1", "--notify", hook.url], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    [first] = hook.wait_for(1, timeout=60)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=10)
    hook.hang.clear()
    # Another process (here this one's notifier, once the dead sender's hold has run out)
    # sends the same delivery again.
    settings = Settings.from_env(env)
    later = utcnow() + timedelta(seconds=CLAIM_SECONDS + 1)
    from pipeline.db import open_database

    with open_database(settings) as sessions:
        assert deliver_due(sessions, settings, now=later) == 1
    posts = hook.wait_for(2)
    assert posts[1].delivery == first.delivery and posts[1].body == first.body
    assert posts[1].signed_by(WEBHOOK_SECRET)
    status = json.loads(imagebatch(env, "status", "1", "--json").stdout)
    assert [(w["status"], w["attempts"]) for w in status["webhooks"]] == [("sent", 2)]


def test_a_delivery_left_in_sql_is_sent_by_beat(env, tmp_path, fake, hook):
    """The job ends in a worker that sends nothing (it has no secret: it never sends
    unsigned); a `beat` started later, with the secret, delivers it."""
    submitted = imagebatch({**env, "IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS": "1"}, "submit",
                           write(tmp_path, FLUX), "--budget", "1", "--notify", hook.url)
    assert submitted.returncode == 0, submitted.stderr
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"],
                              env={**env, "IMAGEBATCH_WEBHOOK_SECRET": ""}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_status(env, 1, "succeeded", timeout=120)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, worker_err = worker.communicate(timeout=30)
    assert hook.received == []  # a worker without the secret sends nothing unsigned
    assert "IMAGEBATCH_WEBHOOK_SECRET is not set" in worker_err
    with running(env, "beat"):
        [post] = hook.wait_for(1, timeout=30)
    assert post.document["event"] == "job.succeeded" and post.signed_by(WEBHOOK_SECRET)


@pytest.mark.parametrize(("url", "env_change", "reason"), [
    ("http://127.0.0.1:9/hook", {"IMAGEBATCH_WEBHOOK_SECRET": ""}, "IMAGEBATCH_WEBHOOK_SECRET"),
    ("http://127.0.0.1:9/hook", {"IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS": "0"},
     "a private or loopback address"),
    ("http://169.254.169.254/latest", {}, "a cloud metadata address"),
    ("ftp://example.com/hook", {}, "not an http(s) URL"),
    ("https://user:hunter2@example.com/hook", {}, "holds credentials"),
    ("https://no-such-host.invalid/hook", {}, "cannot resolve no-such-host.invalid"),
])
@pytest.mark.parametrize("command", ["run", "submit", "schedule"])
def test_a_bad_notify_url_is_one_line_and_nothing_is_made(env, tmp_path, fake, url,
                                                         env_change, reason, command):
    env = {**env, **env_change}
    jobs = write(tmp_path, FLUX)
    args = (["schedule", "add", "nightly", jobs, "--cron", "0 3 * * *"] if command == "schedule"
            else [command, jobs])
    result = imagebatch(env, *args, "--budget", "1", "--notify", url)
    assert result.returncode == 2
    assert reason in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hunter2" not in result.stderr
    assert jobs_in(env) == 0
    if command == "schedule":
        listed = imagebatch(env, "schedule", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_a_schedules_jobs_inherit_its_notify_url(env, tmp_path, fake, hook):
    added = imagebatch(env, "schedule", "add", "nightly", write(tmp_path, FLUX), "--cron",
                       "0 3 * * *", "--budget", "1", "--notify", hook.url)
    assert added.returncode == 0, added.stderr
    fired = imagebatch(env, "schedule", "run", "nightly")
    assert fired.returncode == 0, fired.stderr
    with running(env, "worker"):
        [post] = hook.wait_for(1, timeout=60)
    assert post.document["event"] == "job.succeeded"
    assert post.document["name"].startswith("nightly")
    assert SECRET not in post.body.decode()


def test_a_receiver_that_hangs_holds_up_no_render(env, tmp_path, fake, hook):
    """A worker's notifier stuck on a silent receiver: the worker renders the next job
    meanwhile, as fast as ever."""
    hook.hang.set()
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = tmp_path / "a"
        first.mkdir()
        assert imagebatch(env, "submit", write(first, FLUX), "--budget", "1", "--notify",
                          hook.url).returncode == 0
        hook.wait_for(1, timeout=60)  # the notifier now waits for an answer (10 s)
        hung_at = time.monotonic()
        assert imagebatch(env, "submit", write(tmp_path, *[FLUX] * 5), "--budget",
                          "1").returncode == 0
        while json.loads(imagebatch(env, "status", "2", "--json").stdout)["status"] != (
                "succeeded"):
            assert time.monotonic() - hung_at < 8, "the second job waited for the receiver"
        assert len(hook.received) == 1 and hook.hang.is_set()
    finally:
        hook.hang.clear()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
