"""The Celery app's configuration: the in-memory broker of `run` hands its loop back soon."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from pipeline.settings import Settings
from workers.app import DRAIN_TIMEOUT, MemoryTransport, create_app


def test_run_broker_hands_the_consumer_loop_back_within_the_drain_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping `run`'s worker waits for its consumer loop, which asks the broker for 2 s."""
    monkeypatch.setenv("IMAGEBATCH_DATA_DIR", str(tmp_path))
    app = create_app(Settings.from_env(), broker_url="memory://localhost//")
    with app.connection_for_read() as connection:
        assert isinstance(connection.transport, MemoryTransport)
        with connection.SimpleQueue("imagebatch-test") as queue:
            queue.consumer.consume()
            started = time.monotonic()
            with pytest.raises(socket.timeout):
                connection.drain_events(timeout=2.0)
            assert time.monotonic() - started < DRAIN_TIMEOUT + 0.5
            queue.put({"render": 1})  # a message still comes through at once
            assert queue.get(timeout=2.0).payload == {"render": 1}
