"""Running workers: Celery's worker in this process (for `run`), and the ticker that
dispatches pending jobs and sweeps stuck renders (in `worker`, `beat` and `run`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from celery import Celery

from pipeline.dispatch import feed_window, plan_pending
from pipeline.schedules import fire_due
from pipeline.sweep import sweep
from pipeline.webhooks import ROUND, deliver_due
from workers.app import worker_options
from workers.tasks import announce_worker, enqueue_renders, services

log = logging.getLogger("imagebatch.worker")

FEED_INTERVAL = 0.1
# Seconds between two looks for webhook deliveries due (one indexed SELECT when none is).
NOTIFY_INTERVAL = 1.0
REPEAT_FAILURE_AFTER = 60.0
# A round that sent this many goes again at once: the workers are taking messages fast.
FEED_BUSY = 64


# Seconds `stop` waits for a worker still starting (it starts in about a quarter second).
READY_TIMEOUT = 30.0


class InProcessWorker:
    """A Celery threads-pool worker on a daemon thread of this process."""

    def __init__(self, app: Celery, concurrency: int) -> None:
        self.app, self.concurrency = app, concurrency
        app.set_default()  # or tasks run under an implicit app Celery makes of its own
        self._ready = threading.Event()
        self.controller = app.WorkController(
            **worker_options(concurrency),
            loglevel="WARNING",
            without_heartbeat=True,
            hostname=f"imagebatch-run-{threading.get_native_id()}@localhost",
            ready_callback=lambda _consumer: self._ready.set(),
        )
        self._thread = threading.Thread(target=self.controller.start, name="celery", daemon=True)

    def start(self) -> None:
        self._thread.start()
        announce_worker(self.app, self.concurrency)

    def stop(self) -> None:
        """Stop the worker, also one still starting. Celery's stop does nothing before its
        start has begun, and one that lands mid-start crashes the start (a CRITICAL
        traceback): `run` of a file refused at once did both, so wait until it is up."""
        give_up = time.monotonic() + READY_TIMEOUT
        while (not self._ready.wait(0.05) and self._thread.is_alive()
               and time.monotonic() < give_up):
            pass
        self.controller.stop(in_sighandler=False)
        self._thread.join(timeout=10)


def tick(app: Celery, only_job: int | None = None) -> int:
    """Fire due schedules, plan pending jobs, bring back stuck renders, fill the window;
    returns how many renders it enqueued. With `only_job` (a `run` or `resume` process) it
    plans and sends that job alone; it still sweeps every job (settling what dead workers
    left), but other jobs' renders go back to the SQL queue, not to this process."""
    svc = services(app)
    if only_job is None:
        fire_due(svc.sessions)
    plan_pending(svc, only_job)
    sweep(svc.sessions, svc.settings, leased_here=svc.leases.kept())
    return feed(app, only_job)


def feed(app: Celery, only_job: int | None = None) -> int:
    """Send the renders the broker's window has room for; returns how many."""
    return enqueue_renders(app, feed_window(services(app), only_job))


class Every:
    """Calls `work(app)` every `interval` seconds on a daemon thread until stopped; sooner
    again when it reports a full round of work (the window drained faster than its beat)."""

    def __init__(self, app: Celery, interval: float, work: Callable[[Celery], int],
                 name: str, busy_at: int | None = None) -> None:
        self.app, self.interval, self.work, self.busy_at = app, interval, work, busy_at
        # Failing rounds: since when (monotonic; None while it works) and why.
        self.failing_since: float | None = None
        self.failure = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        failing: str | None = None
        said_at = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            wait = self.interval
            try:
                done = self.work(self.app)
                if self.busy_at is not None and done >= self.busy_at:
                    wait = 0.0
                if failing is not None:
                    log.warning("%s works again", self._thread.name)
                    failing = None
                self.failing_since = None
            except Exception as exc:  # one bad round (upstream down for /models) must not stop it
                # Said once, and again each minute it goes on: not every round.
                why = _first_line(exc)
                if why != failing or started - said_at >= REPEAT_FAILURE_AFTER:
                    log.warning("%s failed: %s", self._thread.name, why)
                    said_at = started
                failing = self.failure = why
                if self.failing_since is None:
                    self.failing_since = started
                wait = max(self.interval, 1.0)
            self._stop.wait(max(0.0, wait - (time.monotonic() - started)))


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)  # a database error: the driver's words, no statement
    return str(orig if orig is not None else exc).splitlines()[0] if str(exc) else (
        exc.__class__.__name__)


class Ticker(Every):
    """Schedules, planning, sweeping and the window, every `interval` seconds."""

    def __init__(self, app: Celery, interval: float, only_job: int | None = None) -> None:
        super().__init__(app, interval, partial(tick, only_job=only_job), "imagebatch-ticker")


class Feeder(Every):
    """The window topped up every FEED_INTERVAL as renders start (at 400 renders/s a window
    of 2 x 96 slots lasts half a second)."""

    def __init__(self, app: Celery, only_job: int | None = None) -> None:
        super().__init__(app, FEED_INTERVAL, partial(feed, only_job=only_job),
                         "imagebatch-feeder", busy_at=FEED_BUSY)


def notify(app: Celery, only_job: int | None = None) -> int:
    """Send the webhook deliveries due (`only_job`'s alone in a `run`); how many."""
    svc = services(app)
    return deliver_due(svc.sessions, svc.settings, only_job=only_job)


class Notifier(Every):
    """Webhook deliveries sent and retried on a thread of their own, with a client of their
    own: a slow receiver never holds up a render or the ticker."""

    def __init__(self, app: Celery, only_job: int | None = None) -> None:
        super().__init__(app, NOTIFY_INTERVAL, partial(notify, only_job=only_job),
                         "imagebatch-notifier", busy_at=ROUND)
