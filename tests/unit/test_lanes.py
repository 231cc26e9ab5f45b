"""The unit lane keeps its promise (no socket, process or database, so it runs on a machine
with no server installed), and `python -m tests` looks for servers only when a lane that
needs them is asked for."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys

import pytest

from tests.__main__ import needs_servers
from tests.unit.conftest import IOInUnitTest


def test_a_unit_test_that_reaches_for_a_server_fails_naming_what_it_tried() -> None:
    with pytest.raises(IOInUnitTest, match="resolve a host name"):
        socket.create_connection(("localhost", 6379), timeout=1)
    with pytest.raises(IOInUnitTest, match="connect a socket"):
        socket.socket().connect(("127.0.0.1", 5432))


def test_a_unit_test_cannot_listen_start_a_process_or_open_sqlite() -> None:
    with pytest.raises(IOInUnitTest, match="bind a socket"):
        socket.socket().bind(("127.0.0.1", 0))
    with pytest.raises(IOInUnitTest, match="start a process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(IOInUnitTest, match="start a process"):
        os.system("true")
    with pytest.raises(IOInUnitTest, match="open an SQLite database"):
        sqlite3.connect(":memory:")


@pytest.mark.parametrize("args", [
    ["tests/unit"],
    ["tests/unit/"],
    ["tests/unit/test_sse.py"],
    ["tests/unit/test_sse.py::test_each_line_end", "-x"],
    ["-q", "-k", "sse", "tests/unit"],
    ["--help"],
    ["--collect-only", "-q"],
])
def test_the_unit_lane_alone_or_no_test_run_looks_for_no_server(args: list[str]) -> None:
    assert needs_servers(args) is False


@pytest.mark.parametrize("args", [
    [],
    ["-m", "not big"],
    ["tests"],
    ["tests/integration"],
    ["tests/unit", "tests/acceptance/test_cli.py"],
    ["-k", "tests/unit"],
])
def test_any_other_lane_needs_the_servers(args: list[str]) -> None:
    assert needs_servers(args) is True
