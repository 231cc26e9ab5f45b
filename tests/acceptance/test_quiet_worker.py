"""`imagebatch worker` and `beat` as real processes: one line saying what they serve and
where (passwords masked), a plain warning once when run as root, Celery's banner only with
-v, and a clean stop on SIGTERM or Ctrl-C."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from tests import ROOT
from tests.conftest import fresh_postgres_database

PASSWORD = "pw-0f9e8d7c6b5a"  # PostgreSQL trusts the tests' connections: any password works
AS_ROOT = os.geteuid() == 0
FLUX = {"model": "flux-2-dev", "prompt": "an otter"}


def environment(tmp_path: Path, fake, postgres_url: str) -> dict[str, str]:
    url, admin = fresh_postgres_database(postgres_url)
    admin.dispose()
    with_password = sa.engine.make_url(url).set(password=PASSWORD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    env.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url,
               IMAGEBATCH_DATABASE_URL=with_password.render_as_string(hide_password=False),
               IMAGEBATCH_CONCURRENCY="3")
    return env


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def render_one_job(env: dict[str, str], tmp_path: Path) -> None:
    """A job submitted and rendered by the worker under test: it is up and serving."""
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(FLUX) + "\n")
    job = json.loads(cli(env, "submit", str(path), "--budget", "1", "--json").stdout)
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        status = json.loads(cli(env, "status", str(job["id"]), "--json").stdout)["status"]
        if status == "succeeded":
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job['id']} is {status} after 60 s")


def read_until(process: subprocess.Popen[str], text: str, timeout: float = 60) -> str:
    """What the process printed until `text` appeared, read from its pipe unbuffered (what
    `communicate` reads next follows on exactly)."""
    seen, give_up = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        ready, _, _ = select.select([process.stdout], [], [], max(0.0, give_up - time.monotonic()))
        assert ready, f"no {text!r} within {timeout} s: {seen.decode()}"
        chunk = os.read(process.stdout.fileno(), 65536)
        assert chunk, f"the process ended before saying {text!r}: {seen.decode()}"
        seen += chunk
    return seen.decode()


def stop(process: subprocess.Popen[str], signum: int = signal.SIGTERM) -> str:
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def test_a_worker_starts_with_one_line_and_says_root_once(tmp_path, fake, postgres_url):
    env = environment(tmp_path, fake, postgres_url)
    assert cli(env, "db", "upgrade").returncode == 0
    worker = start(env, "worker")
    try:
        render_one_job(env, tmp_path)
    finally:
        output = stop(worker)
    lines = output.splitlines()
    assert lines[0].startswith("worker: renders 3 calls in flight (4 renders), plans, sends "
                               "and sweeps jobs, broker filesystem://localhost//, database "
                               "postgresql+psycopg://postgres:***@127.0.0.1:")
    assert f"storage {(tmp_path / 'data' / 'media').as_uri()}" in lines[0]
    assert PASSWORD not in output
    root_lines = [line for line in lines if "runs as root" in line]
    assert len(root_lines) == (1 if AS_ROOT else 0), output
    if AS_ROOT:
        assert root_lines[0].startswith("warning: imagebatch worker runs as root: ")
    for noise in ("SecurityWarning", "celery@", "[queues]", "Traceback", "uid=0"):
        assert noise not in output, output


def test_a_verbose_worker_shows_celerys_banner(tmp_path, fake, postgres_url):
    env = environment(tmp_path, fake, postgres_url)
    assert cli(env, "db", "upgrade").returncode == 0
    worker = start(env, "-v", "worker")
    try:
        render_one_job(env, tmp_path)
    finally:
        output = stop(worker, signal.SIGINT)
    assert any(line.startswith("worker: renders 3 calls in flight")  # after -v's INFO lines
               for line in output.splitlines())
    assert "[queues]" in output and "ready." in output
    assert "SecurityWarning" not in output and PASSWORD not in output
    assert sum("runs as root" in line for line in output.splitlines()) == (1 if AS_ROOT else 0)


def test_beat_starts_with_one_line_and_stops_cleanly(tmp_path, fake, postgres_url):
    env = environment(tmp_path, fake, postgres_url)
    assert cli(env, "db", "upgrade").returncode == 0
    beat = start(env, "beat", "--interval", "0.5")
    try:
        first = read_until(beat, "\n")
        time.sleep(1.5)  # a few rounds of the ticker and the feeder
    finally:
        output = first + stop(beat, signal.SIGINT)
    lines = output.splitlines()
    assert lines[0].startswith("beat: plans jobs, fires schedules and sweeps every 0.5 s, "
                               "broker filesystem://localhost//, database "
                               "postgresql+psycopg://postgres:***@127.0.0.1:")
    assert PASSWORD not in output
    assert lines[1:] == (["warning: imagebatch beat runs as root: whatever it writes belongs "
                          "to root, and a flaw in it or a library it uses could change "
                          "anything on this machine; run it as an ordinary user"]
                         if AS_ROOT else []), output
