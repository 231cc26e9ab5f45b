"""Jobs written by another program with plain SQL (the README's exact statements) are picked
up, validated and planned like CLI jobs; a schema that is behind is refused."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from pipeline.db import schema_revisions
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import job_summary
from tests.helpers import render_all

ROOT = Path(__file__).resolve().parent.parent


def readme_sql(dialect: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sql\n-- (\w+)\n(.*?)```", text, re.S)
    return next(body for name, body in blocks if name == dialect)


def run_readme_sql(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        connection.executescript(readme_sql("sqlite"))
        connection.close()
        return
    import psycopg

    url = sa.engine.make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as connection:
        connection.execute(readme_sql("postgresql"))


def test_readme_sql_jobs_are_planned_and_rendered(svc, fake):
    run_readme_sql(svc.settings.database_url)
    run_readme_sql(svc.settings.database_url)  # a second job: ids must not mix
    render_all(svc, dispatch_pending(svc))
    with svc.sessions() as session:
        jobs = [job_summary(session, job_id) for job_id in (1, 2)]
    for job in jobs:
        assert (job["status"], job["team"], job["images"], job["spent_cents"]) == (
            "succeeded", "data", 3, 9)
    assert fake.stats()["billed_cents"] == 18


def test_invalid_sql_items_fail_with_their_reason_and_the_rest_runs(svc, fake):
    engine = sa.create_engine(svc.settings.database_url)
    with engine.begin() as connection:
        job_id = connection.execute(sa.text(
            "INSERT INTO jobs (team, name, budget_cents, status) "
            "VALUES ('t', 'x', 100, 'pending') RETURNING id")).scalar_one()
        rows = [(1, '{"model": "flux-2-dev", "prompt": "ok"}'), (2, "{not json"),
                (3, '{"model": "flux-2-dev", "prompt": "bad", "aspect_ratio": "2:1"}'),
                (4, '{"model": "flux-2-dev"}')]
        for line, body in rows:
            connection.execute(sa.text(
                "INSERT INTO job_items (job_id, line, body) VALUES (:j, :l, :b)"),
                {"j": job_id, "l": line, "b": body})
    engine.dispose()
    render_all(svc, dispatch_pending(svc))
    with svc.sessions() as session:
        job = job_summary(session, job_id)
        from pipeline.jobs import item_errors

        errors = {e["line"]: e["error"] for e in item_errors(session, job_id)}
    assert (job["status"], job["items_succeeded"], job["items_failed"]) == ("partial", 1, 3)
    assert "not valid JSON" in errors[2]
    assert "aspect_ratio '2:1'" in errors[3]
    assert errors[4] == "missing prompt"


def cli_env(tmp_path: Path, fake, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    env.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "cli-data"), IMAGEBATCH_API_BASE=fake.base_url,
               IMAGEBATCH_DATABASE_URL=database_url)
    return env


def test_beat_picks_up_a_sql_job_within_5_seconds(tmp_path, fake, database_url):
    env = cli_env(tmp_path, fake, database_url)
    beat = subprocess.Popen([sys.executable, "-m", "cli", "beat"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # beat is up and idle
        run_readme_sql(database_url)
        inserted = time.monotonic()
        engine = sa.create_engine(database_url)
        status = "pending"
        while status == "pending" and time.monotonic() - inserted < 10:
            time.sleep(0.1)
            with engine.connect() as connection:
                status = connection.execute(sa.text("SELECT status FROM jobs")).scalar_one()
        waited = time.monotonic() - inserted
        with engine.connect() as connection:
            renders = connection.execute(sa.text("SELECT count(*) FROM renders")).scalar_one()
        engine.dispose()
        assert status == "running" and waited < 5, (status, waited)
        assert renders == 2
    finally:
        beat.terminate()
        beat.wait(timeout=20)


def test_a_worker_refuses_a_schema_that_is_behind(tmp_path, fake, postgres_url):
    url = sa.engine.make_url(postgres_url)
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"empty_{os.getpid()}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    env = cli_env(tmp_path, fake, url.set(database=name).render_as_string(hide_password=False))

    def imagebatch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    refused = imagebatch("worker")
    assert refused.returncode == 2
    assert "run `imagebatch db upgrade`" in refused.stderr and "Traceback" not in refused.stderr
    upgraded = imagebatch("db", "upgrade")
    head = schema_revisions(sa.create_engine(postgres_url))[1]
    assert upgraded.returncode == 0 and f"schema at revision {head}" in upgraded.stdout
    assert f"database: {head}; this imagebatch: {head}" in imagebatch("db", "current").stdout
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrading_an_existing_database_counts_its_open_renders(svc, fake):
    """Revision 0002 adds jobs.open_renders: jobs already running keep closing correctly."""
    from alembic import command

    from pipeline.db import _alembic_config

    run_readme_sql(svc.settings.database_url)
    planned = dispatch_pending(svc)
    engine = svc.engine
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), "0001")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE renders SET status = 'succeeded' WHERE id = :id"),
                           {"id": planned[0]})
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "head")
    with engine.connect() as connection:
        counted = connection.execute(sa.text("SELECT open_renders FROM jobs")).scalar_one()
    assert counted == len(planned) - 1
    render_all(svc, planned[1:])
    with svc.sessions() as session:
        summary = job_summary(session, 1)
    assert summary["finished_at"] is not None  # the count reached zero with the last render
