"""The long-running processes, `imagebatch worker` and `imagebatch beat`: each starts with
one line saying what it serves and where (passwords masked), says once in plain words when
it runs as root, and shows Celery's banner only when asked (-v)."""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable

from celery.exceptions import SecurityWarning

from pipeline.db import check_database
from pipeline.settings import Settings, mask_url
from workers.app import connected_app, worker_options
from workers.embedded import Every, Feeder, Notifier, Ticker
from workers.local import storage_ready
from workers.tasks import announce_worker, shutdown_services

Say = Callable[[str], None]

ROOT_WARNING = ("warning: {what} runs as root: whatever it writes belongs to root, and a flaw "
                "in it or a library it uses could change anything on this machine; run it as "
                "an ordinary user")


def where(settings: Settings) -> str:
    """The broker, database and storage a process uses, for its first line."""
    return (f"broker {mask_url(settings.broker_url)}, database "
            f"{mask_url(settings.database_url)}, storage {mask_url(settings.storage_url)}")


def warn_if_root(what: str, say: Say) -> None:
    """Said once, by us: Celery's own SecurityWarning (five lines and a source line) is
    silenced."""
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if os.geteuid() == 0:
        say(ROOT_WARNING.format(what=what))


def serve_worker(settings: Settings, *, sweep: bool, loglevel: str, banner: bool,
                 say: Say) -> None:
    """Render queued jobs until SIGTERM or Ctrl-C (Celery's warm shutdown: what started
    finishes). With `sweep`, also plan pending jobs, keep the broker's window full and bring
    back stuck renders (where no beat runs). Refuses to start on a schema that is behind or
    on storage it cannot write."""
    check_database(settings)
    storage_ready(settings)
    app = connected_app(settings)
    announce_worker(app, settings.render_slots)
    # The ticker plans and sweeps every sweep_interval; the feeder keeps the broker's
    # window full as renders start.
    tickers: list[Every] = ([Ticker(app, interval=settings.sweep_interval), Feeder(app)]
                            if sweep else [])
    tickers.append(Notifier(app))  # webhooks, off the renders' path
    for ticker in tickers:
        ticker.start()
    jobs = "plans, sends and sweeps jobs, " if sweep else ""
    say(f"worker: renders {settings.concurrency} calls in flight ({settings.render_slots} "
        f"renders), {jobs}{where(settings)}")
    warn_if_root("imagebatch worker", say)
    try:
        app.Worker(**worker_options(settings.render_slots), loglevel=loglevel,
                   quiet=not banner).start()
    finally:
        for ticker in tickers:
            ticker.stop()
        shutdown_services()


def serve_beat(settings: Settings, *, interval: float, say: Say) -> None:
    """Plan jobs (those inserted with SQL too), fire schedules, keep the broker's window
    full and sweep stuck renders, until SIGTERM or Ctrl-C."""
    check_database(settings)
    app = connected_app(settings)
    tickers = [Ticker(app, interval=interval), Feeder(app), Notifier(app)]
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM)}
    for ticker in tickers:
        ticker.start()
    say(f"beat: plans jobs, fires schedules and sweeps every {interval:g} s, "
        f"{where(settings)}")
    warn_if_root("imagebatch beat", say)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for ticker in tickers:
            ticker.stop()
        shutdown_services()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
