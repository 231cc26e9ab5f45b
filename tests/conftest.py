"""Shared fixtures: real servers started once per session, a fresh data folder per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.db import make_engine, upgrade_schema
from pipeline.runtime import Services, start_services
from pipeline.settings import Settings


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


@pytest.fixture
def settings(tmp_path: Path, fake: FakeServer) -> Settings:
    return make_settings(tmp_path / "data", fake.base_url)


@pytest.fixture
def svc(settings: Settings) -> Iterator[Services]:
    upgrade_schema(make_engine(settings.database_url))
    services = start_services(settings)
    yield services
    services.close()
