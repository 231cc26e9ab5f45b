"""Running workers: Celery's worker in this process (for `run`), and the ticker that
dispatches pending jobs and sweeps stuck renders (in `worker`, `beat` and `run`)."""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from pipeline.dispatch import dispatch_pending
from pipeline.schedules import fire_due
from pipeline.sweep import sweep
from workers.tasks import enqueue_renders, services

log = logging.getLogger("imagebatch.worker")


class InProcessWorker:
    """A Celery threads-pool worker on a daemon thread of this process."""

    def __init__(self, app: Celery, concurrency: int) -> None:
        app.set_default()  # or tasks run under an implicit app (shared/PERFORMANCE.md)
        self.controller = app.WorkController(
            pool="threads",
            concurrency=concurrency,
            loglevel="WARNING",
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            hostname=f"imagebatch-run-{threading.get_native_id()}@localhost",
        )
        self._thread = threading.Thread(target=self.controller.start, name="celery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.controller.stop(in_sighandler=False)
        self._thread.join(timeout=10)


def tick(app: Celery) -> int:
    """Fire due schedules, plan pending jobs, bring back stuck renders; returns how many
    renders it enqueued."""
    svc = services(app)
    fire_due(svc.sessions)
    render_ids = dispatch_pending(svc)
    render_ids += sweep(svc.sessions, svc.settings)
    return enqueue_renders(app, render_ids)


class Ticker:
    """Calls `tick` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, app: Celery, interval: float) -> None:
        self.app = app
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imagebatch-ticker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                tick(self.app)
            except Exception as exc:  # one bad tick (upstream down for /models) must not stop it
                log.warning("dispatch/sweep failed: %s", exc)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
