"""The tasks: ids in, one pipeline call each. SQL holds the truth; these only carry ids."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable

from celery import Celery

from pipeline.dispatch import dispatch_pending
from pipeline.render import run_render
from pipeline.runtime import Services, start_services
from pipeline.settings import Settings, SettingsError

log = logging.getLogger("imagebatch.worker")

_services: Services | None = None
_services_lock = threading.Lock()


def services(app: Celery) -> Services:
    """This process's services, started on first use (one loop, one pool, one S3 client)."""
    global _services
    with _services_lock:
        if _services is None:
            _services = start_services(app.conf.imagebatch_settings)
        return _services


def shutdown_services() -> None:
    global _services
    with _services_lock:
        if _services is not None:
            _services.close()
            _services = None


def register(app: Celery) -> None:
    @app.task(name="imagebatch.render", ignore_result=True, acks_late=True)
    def render(render_id: int) -> str:
        return run_render(services(app), render_id)

    @app.task(name="imagebatch.dispatch", ignore_result=True)
    def dispatch() -> int:
        return enqueue_renders(app, dispatch_pending(services(app)))


def enqueue_renders(app: Celery, render_ids: Iterable[int]) -> int:
    """One message per render, all through one producer connection."""
    task = app.tasks["imagebatch.render"]
    count = 0
    with app.producer_or_acquire() as producer:
        for render_id in render_ids:
            task.apply_async((render_id,), producer=producer)
            count += 1
            if count % 50 == 0:
                # Queueing is pure Python (0.15 ms a message in memory) that keeps the GIL
                # from the worker's own threads, so a job's first renders would wait for
                # its last message: let them in.
                time.sleep(0)
    return count


def announce_worker(app: Celery, slots: int) -> str:
    """Register this process as a worker with `slots` render slots; returns its name."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    services(app).leases.announce(name, slots)
    return name


def nudge_dispatcher(app: Celery) -> None:
    app.tasks["imagebatch.dispatch"].apply_async()


def wake_dispatcher(settings: Settings) -> str | None:
    """Nudge the dispatcher now; with the broker out of reach, the warning to show instead: the
    job still waits in SQL, where the dispatcher of `worker` and `beat` finds it next round."""
    from workers.app import connected_app

    try:
        nudge_dispatcher(connected_app(settings))
    except SettingsError as exc:
        return (f"warning: {exc}; `imagebatch worker` or `beat` picks the job up once they "
                "reach it")
    return None
