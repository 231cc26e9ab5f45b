"""A job rendered in this process (`run`, `resume`, `demo`): the in-process worker on an
in-memory broker, the ticker and feeder of this job alone, and the loop that follows the job
until it ends or pauses, Ctrl-C (or SIGTERM) pausing it; `run_here` and `resume_here` are
what those commands call."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import rich.progress
from celery import Celery
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.jobs import job_state, job_summary, pause_job, renders_running, resume_job
from pipeline.sample import sample_cost
from pipeline.settings import Settings, SettingsError, mask_url
from pipeline.submission import check_job_file, check_not_unfinished
from pipeline.views import items_done, money, progress_line
from workers.app import check_shared_redis, create_app
from workers.embedded import Feeder, InProcessWorker, Notifier, Ticker
from workers.tasks import services, shutdown_services

# How long a run waits for a database that refuses writes (disk full) before it leaves; it
# never leaves while a paid call is in flight or its result waits to be recorded.
DB_PATIENCE = 60.0
# Seconds between two looks at the job's row.
FOLLOW_EVERY = 0.25

Say = Callable[[str], None]


class JobProgress:
    """What `run` and `resume` show of the job: a live bar on a terminal (items, files,
    spent / cap, ETA), else a plain line every PLAIN_EVERY seconds, or nothing (`quiet`)."""

    PLAIN_EVERY = 5.0

    def __init__(self, console: Console, job_id: int, *, quiet: bool) -> None:
        self.console, self.job_id, self.quiet = console, job_id, quiet
        self._last_plain = self._next_live = self._asked_at = 0.0
        self._bar: rich.progress.Progress | None = None
        self._task: Any = None

    def __enter__(self) -> JobProgress:
        if self.console.is_terminal and not self.quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = rich.progress.Progress(
                TextColumn(f"job {self.job_id}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("items · {task.fields[files]} files · {task.fields[money]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("render", total=None, files=0, money="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def due(self) -> bool:
        """Whether a new summary would be shown now (a live bar: at most every 0.25 s and
        no more than 5 % of the time; plain lines: every PLAIN_EVERY seconds; quiet: never)."""
        now = time.monotonic()
        if self._bar is not None:
            if now < self._next_live:
                return False
            self._asked_at = now
            return True
        return not self.quiet and now - self._last_plain >= self.PLAIN_EVERY

    def update(self, s: dict[str, Any]) -> None:
        if self._bar is not None:
            started = time.monotonic()
            self._bar.update(self._task, total=s["items_total"], completed=items_done(s),
                             files=s["images"],
                             money=f"{money(s['spent_cents'])} / {money(s['budget_cents'])}")
            self._next_live = started + max(0.25, 20 * (started - self._asked_at))
        elif not self.quiet:  # `due()` (or the job's end) decided that a line is wanted now
            self._last_plain = time.monotonic()
            self.console.print(progress_line(s), highlight=False)


class Progress(Protocol):
    """What the command shows while the job renders (a bar, plain lines or nothing)."""

    def due(self) -> bool: ...

    def update(self, summary: dict[str, Any]) -> None: ...


class Stopped(RuntimeError):
    """This process cannot go on through no fault of its input (the database refuses
    writes): the message says what happened and what to do."""


def storage_ready(settings: Settings) -> None:
    """SettingsError unless results can be stored (a probe object written and deleted):
    before the first call, so nothing is bought that cannot be kept."""
    from pipeline.storage import StorageError, open_store, probe

    try:
        probe(open_store(settings.storage_url))
    except StorageError as exc:
        raise SettingsError(f"storage cannot keep results ({mask_url(settings.storage_url)}, "
                            f"IMAGEBATCH_STORAGE_URL): {exc}; nothing was sent") from None


@contextmanager
def worker_here(settings: Settings) -> Iterator[Celery]:
    """The in-process worker, as `run` and `resume` start it: storage and the shared Redis
    checked first, then a Celery threads-pool worker on an in-memory broker, stopped (and
    this process's services closed) on the way out."""
    storage_ready(settings)
    check_shared_redis(settings)
    app = create_app(settings, broker_url="memory://localhost//")
    worker = InProcessWorker(app, settings.render_slots)
    worker.start()
    try:
        yield app
    finally:
        worker.stop()
        shutdown_services()


class CtrlC:
    """SIGINT (Ctrl-C) or SIGTERM (`timeout`, `docker stop`, systemd) while a job renders
    here: the first is noted (the loop pauses the job, outside any transaction), the second
    leaves the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.pressed = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.pressed.is_set():
            self.pressed.set()
            return
        # Written straight to the descriptors: the interrupted code may hold a console lock.
        os.write(2, (f"\nleaving now: job {self.job_id} is not finished; renders in flight "
                     "are taken back by the sweeper once their leases run out; continue it "
                     f"with `imagebatch resume {self.job_id}`\n").encode())
        os._exit(130 if signum == signal.SIGINT else 128 + signum)


def render_here(app: Celery, sessions: sessionmaker[Session], job_id: int,
                progress: Progress, say: Say) -> dict[str, Any]:
    """Plan, send and sweep this job here (the ticker's first tick plans it at once) and
    follow it until it ends or pauses; a paused job names the command that continues it.
    Raises Stopped when the database refuses writes for DB_PATIENCE with nothing paid left
    unrecorded."""
    ticker, feeder = Ticker(app, interval=1.0, only_job=job_id), Feeder(app, only_job=job_id)
    notifier = Notifier(app, only_job=job_id)
    svc = services(app)

    def stuck() -> str | None:
        since = feeder.failing_since
        if since is None or time.monotonic() - since < DB_PATIENCE:
            return None
        if svc.commits.waiting or svc.calls_in_flight:
            return None
        lost = svc.commits.lost
        results = (f"{lost} paid result(s) waited longer than IMAGEBATCH_RENDER_DEADLINE and "
                   "could not be recorded: they are charged unknown and rendered again"
                   if lost else "every paid result was recorded")
        return (f"the database refuses writes ({feeder.failure}) for {DB_PATIENCE:g} s: job "
                f"{job_id} stopped with no call in flight ({results}); make room (or bring "
                f"the database back), then `imagebatch resume {job_id}`")

    # The signals are taken before the first render is sent: a SIGTERM from then on pauses.
    with CtrlC(job_id) as ctrl_c:
        ticker.start()
        feeder.start()
        notifier.start()
        try:
            summary = follow_job(sessions, job_id, ctrl_c, progress, say, stuck)
        finally:
            feeder.stop()
            ticker.stop()
            notifier.stop()
    if summary.get("finished_at") is not None:
        notify_before_leaving(svc.sessions, svc.settings, job_id, say)
    if summary["status"] == "paused" and summary["sample_lines"] is None:  # `run` says it
        why = f" ({summary['error']})" if summary.get("error") else ""
        say(f"job {job_id} is paused{why}: continue it with `imagebatch resume {job_id}`")
    return summary


def notify_before_leaving(sessions: sessionmaker[Session], settings: Settings, job_id: int,
                          say: Say) -> None:
    """The job's webhooks due now sent once more before `run` leaves; one that still failed
    is said, with who retries it (it waits in SQL)."""
    from pipeline.webhooks import PENDING, deliver_due, job_deliveries

    deliver_due(sessions, settings, only_job=job_id)
    with sessions() as session:
        waiting = [d for d in job_deliveries(session, job_id) if d["status"] == PENDING]
    for d in waiting:
        why = f" ({d['last_error']})" if d["last_error"] else ""
        say(f"webhook {d['event']} of job {job_id} is not delivered yet{why}: it waits in SQL "
            f"and `imagebatch worker` or `imagebatch beat` retries it (`imagebatch status "
            f"{job_id}` shows it)")


def follow_job(sessions: sessionmaker[Session], job_id: int, ctrl_c: CtrlC, progress: Progress,
               say: Say, stuck: Callable[[], str | None]) -> dict[str, Any]:
    """Show progress until the job ends, or is paused (by Ctrl-C here or `imagebatch pause`
    anywhere) and none of its renders is in flight any more, or `stuck()` says why this
    process cannot go on."""
    asked = False
    told: str | None = None
    while True:
        if ctrl_c.pressed.is_set() and not asked:
            asked = True
            with transaction(sessions) as session:
                paused = pause_job(session, job_id)
            if paused:
                say(f"pausing job {job_id}: nothing new is sent, renders in flight finish and "
                    "are settled (Ctrl-C again to leave now)")
        # The whole summary is a row; whether the job is done is its status, and for a
        # paused job whether any render is still running (read from an index).
        with sessions() as session:
            state = job_state(session, job_id)
            finished = state.finished_at is not None
            drained = (not finished and state.status == "paused"
                       and renders_running(session, job_id) == 0)
            told = _say_why_paused(session, job_id, state.status, told, say)
            if finished or drained or progress.due():
                summary = job_summary(session, job_id)
                progress.update(summary)
        if finished or drained:
            return summary
        why = stuck()
        if why is not None:
            raise Stopped(why)
        ctrl_c.pressed.wait(FOLLOW_EVERY) if not asked else time.sleep(FOLLOW_EVERY)


def _say_why_paused(session: Session, job_id: int, status: str, told: str | None, say: Say
                    ) -> str | None:
    """Say once why the job was paused when something other than a person paused it
    (storage refusing results); returns what has been said."""
    if status != "paused":
        return None
    error = job_summary(session, job_id)["error"]
    if error and error != told:
        say(f"job {job_id} paused ({error}): nothing new is bought; results already paid for "
            "keep trying to be stored, and the job runs on if they are")
    return error


def follow_here(app: Celery, sessions: sessionmaker[Session], job_id: int, console: Console,
                say: Say, *, quiet: bool) -> dict[str, Any]:
    """Render job `job_id` here with a progress bar on `console` (none when `quiet`)."""
    with JobProgress(console, job_id, quiet=quiet) as progress:
        return render_here(app, sessions, job_id, progress, say)


def run_here(settings: Settings, sessions: sessionmaker[Session], file: str,
             submit: Callable[[], int], console: Console, say: Say, *, quiet: bool,
             new: bool = True) -> dict[str, Any]:
    """Submit FILE with `submit` and render the job here until it ends or pauses; unless
    `new`, refuse a file whose earlier job is unfinished."""
    # The file is looked at before any worker starts: a refusal prints its line alone.
    check_job_file(file)
    if not new:
        check_not_unfinished(sessions, file)
    # Celery's worker takes about a quarter of a second to start: while the file is
    # submitted, not between the job's commit and its first call.
    with worker_here(settings) as app:
        return follow_here(app, sessions, submit(), console, say, quiet=quiet)


def resume_here(settings: Settings, sessions: sessionmaker[Session], job_id: int,
                cap: int | None, console: Console, say: Say, *, quiet: bool
                ) -> dict[str, Any] | None:
    """Continue job `job_id` here as `run` does; None when there was nothing to resume."""
    with worker_here(settings) as app:
        resumed = resume_job(sessions, job_id, budget_cents=cap, in_process=True)
        if not resumed.resumed:
            return None
        if not quiet:
            say(f"resuming job {job_id} ({resumed.before})")
        return follow_here(app, sessions, job_id, console, say, quiet=quiet)


def after_sample(settings: Settings, sessions: sessionmaker[Session], summary: dict[str, Any],
                 go_on: Callable[[int], bool], console: Console, say: Say, *, quiet: bool
                 ) -> dict[str, Any]:
    """What a `run --sample` job's sample cost and the whole file would; the rest rendered
    here when `go_on(lines left)` says so, else the job left paused. The summary returned
    carries the sample's figures (`SampleCost.as_dict`)."""
    cost, job = sample_cost(summary), summary["id"]
    say(f"sample: {cost.lines:,} of {cost.total_lines:,} lines cost {money(cost.cents)}; "
        f"the whole file would cost about {money(cost.projected_cents)}")
    rest = cost.total_lines - cost.lines
    if go_on(rest):
        summary = resume_here(settings, sessions, job, None, console, say, quiet=quiet) or summary
    else:
        say(f"job {job} is paused after its sample: `imagebatch resume {job}` renders the "
            f"other {rest:,} lines (the sampled ones are not rendered again)")
    return {**summary, **cost.as_dict()}
