"""Settings, the database URL and start-up, as a user meets them: every IMAGEBATCH_* value
checked when read (one line naming the variable, exit 2), a database that cannot be used
said in one line, job files looked at before any worker starts, and many processes starting
at once on a fresh database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.db import open_engine, schema_revisions
from tests import ROOT
from tests.servers import free_port

PASSWORD = "hunter2-SECRET"
FLUX = {"model": "flux-2-dev", "prompt": "an otter"}


@pytest.fixture
def env(tmp_path: Path, fake) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    environ.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "data"), IMAGEBATCH_API_BASE=fake.base_url,
                   IMAGEBATCH_CONCURRENCY="8")
    return environ


def imagebatch(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 60
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed as a usage error should: exit 2, one line on stderr, no stack."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "CRITICAL" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def jobs_file(tmp_path: Path, count: int = 1, name: str = "jobs.jsonl") -> str:
    """`count` lines; files of different names hold different lines (`run` refuses a file
    whose copy is still running)."""
    path = tmp_path / name
    path.write_text("".join(json.dumps({**FLUX, "prompt": f"otter {name} {i}"}) + "\n"
                            for i in range(count)))
    return str(path)


# --- item 12: every setting checked when read ----------------------------------------------


def test_a_lease_of_zero_is_refused_before_anything_is_sent(env, tmp_path, fake):
    """It used to send every render max_attempts times (24 cents for 6 lines, no files)."""
    result = imagebatch({**env, "IMAGEBATCH_LEASE_SECONDS": "0"}, "run", jobs_file(tmp_path, 6),
                        "--budget", "1")
    line = one_line_error(result)
    assert line == "error: IMAGEBATCH_LEASE_SECONDS='0': must be from 2 to 86,400 seconds"
    assert fake.stats()["calls"] == 0
    assert not (tmp_path / "data" / "imagebatch.db").exists()  # nothing was created


@pytest.mark.parametrize("name, value", [
    ("CONCURRENCY", "0"), ("RENDER_DEADLINE", "nan"), ("RENDER_DEADLINE", "0"),
    ("MAX_MEDIA_BYTES", "-1"), ("READ_TIMEOUT", "soon"), ("COMMITTERS", "0"),
    ("VISIBILITY_TIMEOUT", "1e999"), ("MODELS_TTL", "3.5"),
])
def test_the_cli_refuses_a_bad_setting_in_one_line(env, tmp_path, fake, name, value):
    for args in (["run", jobs_file(tmp_path), "--budget", "1"], ["status"], ["worker"]):
        line = one_line_error(imagebatch({**env, f"IMAGEBATCH_{name}": value}, *args))
        assert line.startswith(f"error: IMAGEBATCH_{name}={value!r}: "), line
    assert fake.stats()["calls"] == 0


def test_an_unknown_setting_is_named_in_a_warning(env):
    result = imagebatch({**env, "IMAGEBATCH_CONCURENCY": "0"}, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert "IMAGEBATCH_CONCURENCY is not an imagebatch setting (ignored)" in result.stderr


# --- item 11: the database URL ---------------------------------------------------------------


def _closed_port() -> int:
    return free_port()  # free: nothing listens there


@pytest.mark.parametrize("url, reason", [
    ("garbage", "not a database URL"),
    (f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:port/db", "not a database URL"),
    (f"mysql://root:{PASSWORD}@127.0.0.1/imagebatch", "mysql is not supported"),
    (f"oracle://scott:{PASSWORD}@db/orcl", "oracle is not supported"),
    (f"postgresql+asyncpg://u:{PASSWORD}@127.0.0.1/db", "the driver asyncpg is not supported"),
    ("sqlite://", "an in-memory SQLite database cannot be used"),
    ("sqlite:///:memory:", "an in-memory SQLite database cannot be used"),
    ("sqlite:///file::memory:?uri=true", "an in-memory SQLite database cannot be used"),
    ("postgresql+psycopg://u:{pw}@127.0.0.1:{port}/db", "cannot open the database: connection"),
    ("postgresql+psycopg://u:{pw}@host.invalid/db", "cannot open the database: failed to "
                                                    "resolve host"),
    ("sqlite:///{tmp}", "is a directory, not a database file"),
    ("sqlite:///{tmp}/a-file/imagebatch.db", "a-file is a file, not a folder"),
    ("sqlite:///{tmp}/not-a-db.txt", "cannot open the database: file is not a database"),
])
def test_a_database_url_that_cannot_be_used_is_one_line_naming_it(env, tmp_path, url, reason):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-db.txt").write_text("these are not the droids\n" * 100)
    url = url.format(pw=PASSWORD, port=_closed_port(), tmp=tmp_path)
    for args in (["status"], ["run", jobs_file(tmp_path), "--budget", "1"], ["db", "upgrade"]):
        started = time.monotonic()
        result = imagebatch({**env, "IMAGEBATCH_DATABASE_URL": url}, *args, timeout=30)
        line = one_line_error(result)
        assert time.monotonic() - started < 20  # an in-memory database used to hang `run`
        assert line.startswith("error: IMAGEBATCH_DATABASE_URL='"), line
        assert reason in line, line
        assert PASSWORD not in result.stderr + result.stdout
        if PASSWORD in url:
            assert ":***@" in line


def test_an_unusable_data_dir_names_imagebatch_data_dir(env, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for data_dir, reason in [(tmp_path / "a-file", "is a file, not a folder"),
                             (tmp_path / "a-file" / "data", "a-file is a file, not a folder")]:
        result = imagebatch({**env, "IMAGEBATCH_DATA_DIR": str(data_dir)}, "status")
        line = one_line_error(result)
        assert line.startswith(f"error: IMAGEBATCH_DATA_DIR='{data_dir}'"), line
        assert reason in line


def test_a_database_failing_mid_command_is_one_line(env, tmp_path):
    """The schema says current but a table is gone (someone's hand in the file): the
    command's first statement fails; one line naming the database, not a traceback."""
    assert imagebatch(env, "status").returncode == 0
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'imagebatch.db'}")
    with engine.begin() as connection:
        connection.execute(sa.text("PRAGMA foreign_keys=OFF"))
        connection.execute(sa.text("DROP TABLE jobs"))
    engine.dispose()
    line = one_line_error(imagebatch(env, "status"))
    assert line == (f"error: IMAGEBATCH_DATA_DIR='{tmp_path / 'data'}': the database failed: "
                    "no such table: jobs")


# --- item 13: the job file looked at before any worker starts --------------------------------


def test_run_on_a_file_it_cannot_use_says_what_it_is_in_one_line(env, tmp_path, fake):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n  \n\r\n\t\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    cases = {
        str(tmp_path / "empty.jsonl"): "no job lines (the file is empty)",
        str(tmp_path / "blank.jsonl"): "no job lines (the file is blank lines only)",
        str(tmp_path / "missing.jsonl"): "no such file",
        str(tmp_path / "folder"): "is a directory, not a job file",
        "/dev/null": "not a regular file (a character device)",
        str(tmp_path / "pipe"): "not a regular file (a pipe)",
    }
    for path, reason in cases.items():
        for command in (["run", path, "--budget", "1"], ["run", path, "--budget", "1", "--new"],
                        ["submit", path, "--budget", "1"], ["plan", path]):
            line = one_line_error(imagebatch(env, *command, timeout=30))
            assert line.startswith(f"error: {path}: {reason}"), (command, line)
    empty_stdin = one_line_error(imagebatch(env, "run", "-", "--budget", "1", stdin=""))
    assert empty_stdin == "error: -: no job lines (standard input is empty)"
    assert fake.stats()["calls"] == 0
    assert json.loads(imagebatch(env, "status", "--json").stdout) == {"jobs": []}


def test_run_on_bad_utf8_lists_the_line_and_no_celery_traceback(env, tmp_path, fake):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xff\xfe not text\n")
    for _ in range(3):
        result = imagebatch(env, "run", str(path), "--budget", "1", "--new")
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"{path}:1: not UTF-8 text (byte 1)",
            f"error: 1 invalid line(s) in {path}; nothing was submitted (fix them, or pass "
            "--allow-invalid to run the rest)"]
    # Standard input still works, blank lines and all.
    piped = imagebatch(env, "run", "-", "--budget", "1", "--json",
                       stdin="\n" + json.dumps(FLUX) + "\n\n")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["images"] == 1 == fake.stats()["calls"]


def test_a_broker_out_of_reach_is_said_before_anything_is_written(env, tmp_path):
    broker = f"redis://:{PASSWORD}@127.0.0.1:{_closed_port()}/0"
    submit = imagebatch({**env, "IMAGEBATCH_BROKER_URL": broker}, "submit",
                        jobs_file(tmp_path), "--budget", "1")
    line = one_line_error(submit)
    assert line.startswith("error: IMAGEBATCH_BROKER_URL='redis://:***@127.0.0.1:")
    assert "cannot reach the broker" in line and PASSWORD not in submit.stderr
    assert json.loads(imagebatch(env, "status", "--json").stdout) == {"jobs": []}
    for command in ("worker", "beat", "dispatch"):
        line = one_line_error(imagebatch({**env, "IMAGEBATCH_BROKER_URL": broker}, command))
        assert "cannot reach the broker" in line
    # The Redis of the shared limits: renders used to wait for it forever.
    limits = {**env, "IMAGEBATCH_REDIS_URL": broker}
    for command in (["run", jobs_file(tmp_path), "--budget", "1"], ["worker"]):
        line = one_line_error(imagebatch(limits, *command))
        assert line.startswith("error: IMAGEBATCH_REDIS_URL='redis://:***@127.0.0.1:"), line
        assert "cannot reach Redis" in line
    assert json.loads(imagebatch(env, "status", "--json").stdout) == {"jobs": []}


# --- item 14: many processes on a fresh database at once -------------------------------------


def test_many_commands_at_once_on_a_fresh_data_dir_all_succeed(env, tmp_path, fake):
    """Each creates the embedded database on first use: one migrates, under a lock beside the
    file, the others find it current. One used to die with 'database is locked'."""
    runs = [subprocess.Popen([sys.executable, "-m", "cli", "run", jobs_file(tmp_path, 2, f"{i}"),
                              "--budget", "1", "--json"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(4)]
    statuses = [subprocess.Popen([sys.executable, "-m", "cli", "status", "--json"], env=env,
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(4)]
    for proc in statuses:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "jobs" in json.loads(stdout)
    jobs = []
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
        jobs.append(json.loads(stdout))
    assert sorted(j["id"] for j in jobs) == [1, 2, 3, 4]
    assert all((j["status"], j["images"], j["spent_cents"]) == ("succeeded", 2, 6) for j in jobs)
    assert fake.stats()["billed_cents"] == 24


def test_many_upgrades_at_once_on_a_fresh_postgresql_database(env, postgres_url):
    url = sa.engine.make_url(postgres_url)
    name = f"fresh_{os.getpid()}_{time.monotonic_ns()}"
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    fresh = url.set(database=name).render_as_string(hide_password=False)
    try:
        environ = {**env, "IMAGEBATCH_DATABASE_URL": fresh}
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "db", "upgrade"], env=environ,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(5)]
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr
            assert "schema at revision" in stdout
        engine = open_engine(fresh)
        current, head = schema_revisions(engine)
        engine.dispose()
        assert current == head != ""
        assert imagebatch(environ, "status", "--json").returncode == 0
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
