"""Start-up, in process: a read-only SQLite file is named by its setting, and a worker stopped
the moment it starts stops without a traceback."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from pipeline.db import open_engine
from pipeline.settings import Settings, SettingsError
from workers.app import create_app
from workers.embedded import InProcessWorker


def test_a_read_only_database_file_is_named(tmp_path):
    path = tmp_path / "imagebatch.db"
    open_engine(f"sqlite:///{path}").dispose()
    path.chmod(0o444)
    if os.access(path, os.W_OK):  # root writes anyway: a read-only file system says it then
        path = Path("/proc/imagebatch.db")
    with pytest.raises(SettingsError) as refused:
        open_engine(f"sqlite:///{path}")
    assert str(refused.value).startswith(f"IMAGEBATCH_DATABASE_URL='sqlite:///{path}': ")


def test_a_worker_stopped_the_moment_it_starts_stops_without_a_traceback(tmp_path, caplog):
    """`run` of a file refused at once stopped the in-process worker while Celery was still
    starting it: a CRITICAL 'Unrecoverable error' traceback, or a worker left running."""
    settings = Settings.from_env({"IMAGEBATCH_DATA_DIR": str(tmp_path)})
    app = create_app(settings, broker_url="memory://localhost//")
    for _ in range(3):
        worker = InProcessWorker(app, 4)
        with caplog.at_level(logging.WARNING):
            worker._thread.start()  # Celery's start alone, no announce: the narrowest window
            started = time.monotonic()
            worker.stop()
        assert not worker._thread.is_alive()
        assert time.monotonic() - started < 10
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
