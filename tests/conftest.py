"""Shared fixtures: real servers started once per session (only when a test asks for one, so
the unit lane runs with no server installed), a fresh data folder per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.db import make_engine, upgrade_schema
from pipeline.runtime import Services, start_services
from pipeline.settings import Settings
from tests.servers import start_moto, start_postgres, start_redis

# The fast lane first: a whole run fails in seconds on a broken unit before starting servers.
LANES = ("unit", "integration", "acceptance")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    outside = sorted({str(item.path.relative_to(TESTS.parent)) for item in items
                      if _lane(item) is None})
    if outside:  # a lane is a promise (the unit lane runs anywhere): no test outside one
        raise pytest.UsageError(f"{', '.join(outside)}: outside the test lanes; move it to "
                                "tests/unit (no I/O), tests/integration or tests/acceptance "
                                "(the CLI in a subprocess)")
    items.sort(key=lambda item: LANES.index(_lane(item) or "integration"))  # stable sort


def _lane(item: pytest.Item) -> str | None:
    """The lane of a test under tests/ (None: outside every lane); a test from elsewhere
    (a path given on the command line) runs with the integration lane."""
    if TESTS not in item.path.parents:
        return "integration"
    lane = item.path.relative_to(TESTS).parts[0]
    return lane if lane in LANES else None


@pytest.fixture(autouse=True)
def _no_imagebatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's IMAGEBATCH_* variables (or a real API key)."""
    for name in list(os.environ):
        if name.startswith("IMAGEBATCH_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    with FakeServer(FakeConfig(latency=0.05, keepalive_interval=0.02)) as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


def make_settings(data_dir: Path, api_base: str, **overrides: object) -> Settings:
    base = Settings(
        api_base=api_base,
        data_dir=data_dir,
        concurrency=16,
        render_deadline=10.0,
        read_timeout=5.0,
        connect_timeout=2.0,
        backoff_base=0.02,
        backoff_cap=0.2,
        requeue_after=600.0,
    )
    return replace(base, **overrides).with_defaults()  # type: ignore[arg-type]


# --- real servers, once per session --------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, stop = start_redis()
    yield url
    stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server with a migrated template database that tests clone."""
    url, stop = start_postgres()
    engine = make_engine(url)
    upgrade_schema(engine)
    engine.dispose()
    yield url
    stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    endpoint, stop = start_moto()
    yield endpoint
    stop()


_databases = itertools.count(1)


def fresh_postgres_database(template_url: str) -> tuple[str, sa.Engine]:
    """A new database cloned from the migrated one (much faster than migrating again)."""
    url = sa.engine.make_url(template_url)
    name = f"test_{os.getpid()}_{next(_databases)}"
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": url.database})
        connection.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{url.database}"'))
    return url.set(database=name).render_as_string(hide_password=False), admin


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'imagebatch.db'}"
        upgrade_schema(make_engine(url))
        yield url
        return
    url, admin = fresh_postgres_database(request.getfixturevalue("postgres_url"))
    yield url
    name = sa.engine.make_url(url).database
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, fake: FakeServer, database_url: str) -> Settings:
    return make_settings(tmp_path / "data", fake.base_url, database_url=database_url)


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    services = start_services(settings)
    yield services
    services.close()
