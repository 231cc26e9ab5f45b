"""The unit lane: no I/O at all, so it runs anywhere in seconds (no Redis, PostgreSQL, S3 or
upstream, not even a file). A unit test that opens a socket, resolves a host name, starts a
process, opens an SQLite database or asks for a server or folder fixture fails here, naming
what it tried: such a test belongs in tests/integration."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
from collections.abc import Callable

import pytest

# Fixtures of tests/conftest.py (and pytest's own) that start a server or touch the disk.
NOT_FOR_UNIT_TESTS = frozenset({
    "fake", "fake_server", "database_url", "settings", "svc", "redis_url", "postgres_url",
    "s3_endpoint", "tmp_path", "tmp_path_factory", "tmpdir", "tmpdir_factory",
})


class IOInUnitTest(AssertionError):
    """A unit test tried to reach outside its own process memory."""


def _refuse(what: str) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise IOInUnitTest(f"a unit test may not {what}: it belongs in tests/integration")
    return refuse


@pytest.fixture(autouse=True)
def _no_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = sorted(NOT_FOR_UNIT_TESTS.intersection(request.fixturenames))
    if asked:
        raise IOInUnitTest(f"a unit test may not use {', '.join(asked)}: it belongs in "
                           "tests/integration")
    monkeypatch.setattr(socket.socket, "connect", _refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "bind", _refuse("bind a socket"))
    monkeypatch.setattr(socket.socket, "sendto", _refuse("send a datagram"))
    monkeypatch.setattr(socket, "getaddrinfo", _refuse("resolve a host name"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
    for name in ("system", "posix_spawn", "posix_spawnp"):
        monkeypatch.setattr(os, name, _refuse("start a process"))
    monkeypatch.setattr(sqlite3, "connect", _refuse("open an SQLite database"))
