"""Jobs written with plain SQL, as `imagebatch beat` and `imagebatch worker` meet them: beat
picks one up within seconds; a worker refuses a schema that is behind until
`imagebatch db upgrade`."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from pipeline.db import schema_revisions
from tests import ROOT
from tests.integration.test_sql_submit import run_readme_sql


def test_beat_picks_up_a_sql_job_within_5_seconds(tmp_path, fake, database_url):
    env = cli_env(tmp_path, fake, database_url)
    beat = subprocess.Popen([sys.executable, "-m", "cli", "beat"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Beat is up (it says so once its ticker runs): a loaded machine starts it slowly.
        deadline = time.monotonic() + 30
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([beat.stderr], [], [], left)
            assert ready, "beat did not start within 30 s"
            if "beat:" in beat.stderr.readline():
                break
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


def cli_env(tmp_path: Path, fake, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    env.update(IMAGEBATCH_DATA_DIR=str(tmp_path / "cli-data"), IMAGEBATCH_API_BASE=fake.base_url,
               IMAGEBATCH_DATABASE_URL=database_url)
    return env
