"""The `imagebatch` command: parse, call pipeline/ and workers/, print."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import OperationalError

from pipeline.caps import Caps, load_caps
from pipeline.db import (
    SchemaBehind,
    error_reason,
    open_engine,
    prepare_schema,
    schema_revisions,
    session_factory,
    transaction,
)
from pipeline.jobs import (
    RETRY_CHOICES,
    JobNotFound,
    begin_cancel,
    finish_cancel,
    item_errors,
    job_state,
    job_summary,
    list_jobs,
    pause_job,
    renders_running,
    resume_job,
    retry_job,
    unfinished_job_of,
)
from pipeline.plan import column_problem, parse_cents, parse_dollars, shown
from pipeline.redact import redact_url
from pipeline.settings import Settings, SettingsError, unknown_settings
from pipeline.submission import (
    JobFileError,
    Submission,
    check_file,
    check_readable,
    submit_file,
)

EXIT_OK, EXIT_JOB_NOT_OK, EXIT_USAGE = 0, 1, 2
# How long `run` waits for a database that refuses writes (disk full) before it leaves; it
# never leaves while a paid call is in flight or its result waits to be recorded.
DB_PATIENCE = 60.0
FINAL_OK = "succeeded"

# Piped output is read by scripts and people alike: wide enough that tables never wrap ids.
# No markup: user strings (job and team names, values in errors) are printed as they are
# ("[/x]" in a name was a MarkupError traceback); styles are given as Text.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, markup=False)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200,
              markup=False)


class Stopped(click.ClickException):
    """A run that cannot go on through no fault of its input: one line, exit code 1."""

    exit_code = EXIT_JOB_NOT_OK

    def show(self, file: Any = None) -> None:
        err.print(f"error: {self.message}", highlight=False, markup=False)


class UserError(click.ClickException):
    """A problem the user can fix: printed as one line, exit code 2, never a traceback."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        err.print(Text.assemble(("error:", "bold red"), f" {self.message}"), highlight=False)


def _known_errors() -> tuple[type[Exception], ...]:
    from pipeline.storage import StorageError
    from pipeline.upstream import UpstreamError

    return (SettingsError, SchemaBehind, JobNotFound, StorageError, UpstreamError, ValueError,
            OSError)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except _known_errors() as exc:
            raise UserError(str(exc)) from None
        except OperationalError as exc:  # the database went away or locked up mid-command
            raise UserError(f"{Settings.from_env().database_label}: the database failed: "
                            f"{error_reason(exc)}") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv for debug).")
@click.version_option(package_name="imagebatch")
def main(verbose: int) -> None:
    """Turn job files (JSONL, one request per line) or job rows in SQL into images, video and
    audio in storage, through an OpenAI-compatible /v1/images/generations endpoint, never
    spending more than the budget and accounting for every cent in SQL.

    Configuration comes from IMAGEBATCH_* environment variables (API_BASE, API_KEY,
    DATA_DIR, DATABASE_URL, BROKER_URL, STORAGE_URL, CONCURRENCY, ...). With none set,
    everything is embedded: a SQLite file and a media folder in ./imagebatch-data.

    Try it with no key and no servers:  imagebatch demo
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for unknown in unknown_settings():
        logging.getLogger("imagebatch").warning("%s is not an imagebatch setting (ignored)",
                                                unknown)
    if verbose < 2:
        for handler in logging.getLogger().handlers:
            handler.addFilter(one_line_transport_logs)
    # A line per HTTP request or per task is noise at hundreds of renders a second: -vv shows it.
    for chatty in ("httpx", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(chatty).setLevel(max(level, logging.WARNING) if verbose < 2
                                           else logging.DEBUG)


# --- shared plumbing -----------------------------------------------------------------------


def one_line_transport_logs(record: logging.LogRecord) -> bool:
    """Celery's and kombu's records without their tracebacks (they stay one line; -vv shows
    them whole): the user's error, not a transport's stack, is what a command prints."""
    if record.name.startswith(("celery", "kombu", "amqp")) and record.exc_info:
        record.msg = f"{record.getMessage()} ({record.exc_info[1]!r})"
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True


def load_settings(**overrides: Any) -> Settings:
    settings = Settings.from_env()
    return replace(settings, **overrides) if overrides else settings


def finite(value: float, option: str) -> float:
    """click's FloatRange lets nan through (every comparison with it is false)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=option)
    return value


def broker_app(settings: Settings) -> Any:
    """The Celery app, on a broker that answered (or a one-line error naming
    IMAGEBATCH_BROKER_URL): checked before anything is written or any worker starts."""
    from workers.app import check_broker, check_shared_redis, create_app

    app = create_app(settings)
    check_broker(app)
    check_shared_redis(settings)
    return app


def nudge(settings: Settings) -> None:
    """Wake the dispatcher now. With the broker away the job still waits in SQL, where the
    dispatcher of `worker` and `beat` finds it on its next round: a warning, not a failure."""
    from workers.tasks import nudge_dispatcher

    try:
        nudge_dispatcher(broker_app(settings))
    except SettingsError as exc:
        err.print(f"warning: {exc}; `imagebatch worker` or `beat` picks the job up once they "
                  "reach it", highlight=False, markup=False)


@contextmanager
def database(settings: Settings, *, upgrade: bool = True):  # type: ignore[no-untyped-def]
    """The session factory. The embedded SQLite file is created and upgraded on the spot;
    a server database must be upgraded explicitly (`imagebatch db upgrade`)."""
    engine = open_engine(settings.database_url, where=settings.database_label)
    try:
        prepare_schema(engine, upgrade=settings.is_sqlite and upgrade,
                       where=settings.database_label)
        yield session_factory(engine)
    finally:
        engine.dispose()


def fetch_models(settings: Settings) -> list[dict[str, Any]]:
    from pipeline.runtime import build_upstream

    async def fetch() -> list[dict[str, Any]]:
        client = build_upstream(settings)
        try:
            return await client.list_models()
        finally:
            await client.aclose()

    return asyncio.run(fetch())


def model_caps(settings: Settings, sessions: Any, *, refresh: bool = False) -> dict[str, Caps]:
    return load_caps(sessions, settings.api_base, lambda: fetch_models(settings),
                     ttl_seconds=settings.models_ttl, refresh=refresh,
                     allow_free=settings.allow_free_models)


def read_job_text(path: str) -> tuple[str, str]:
    """(text, a name for it). '-' reads standard input."""
    if path == "-":
        return sys.stdin.read(), "stdin"
    readable(path)
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8"), file_name(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def file_name(path: str) -> str:
    """The file's name as text that can be stored and printed: bytes of a name that are not
    UTF-8 (Python reads them as lone surrogates) become U+FFFD."""
    return Path(path).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def readable(path: str) -> None:
    """A missing file, a directory, a pipe or a device, an unreadable or an empty one (or
    nothing on standard input): one line saying which, exit 2."""
    if path != "-":
        regular_file(path)
    try:
        check_readable(path)
    except JobFileError as exc:
        raise UserError(str(exc)) from None
    if path == "-":
        peek = getattr(sys.stdin.buffer, "peek", None)  # the bytes stay for the reader
        if peek is not None and not peek(1):
            raise UserError("-: no job lines (standard input is empty)")
    elif not has_text(path):
        empty = os.stat(path).st_size == 0
        raise UserError(f"{path}: no job lines (the file is "
                        f"{'empty' if empty else 'blank lines only'})")


def regular_file(path: str) -> None:
    """A job file is read twice (its digest finds an earlier job, then the lines): only a
    regular file can be. A pipe or a device goes through standard input instead."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory, not a job file")
    if not stat.S_ISREG(mode):
        kind = ("a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device")
        raise UserError(f"{path}: not a regular file ({kind}); give a job file, or - to "
                        "read standard input")


def has_text(path: str) -> bool:
    """Whether the file holds anything but whitespace (read up to its first such byte)."""
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 16):
                if chunk.strip():
                    return True
    except OSError:
        return True  # the reader that follows says what is wrong
    return False


class Money(click.ParamType):
    """A cap or limit given as dollars ('5.00') or, `in_cents`, as cents ('500'): converted
    to integer cents from 0 to plan.MAX_CENTS. Anything else (NaN, sNaN, Infinity, 1e309,
    a negative amount, a fraction of a cent) is one line naming the option, exit 2."""

    def __init__(self, *, in_cents: bool = False) -> None:
        self.in_cents = in_cents
        self.name = "cents" if in_cents else "dollars"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return (parse_cents if self.in_cents else parse_dollars)(str(value))
        except ValueError as exc:
            raise UserError(f"{_option(param)}: {exc}") from None


class StoredText(click.ParamType):
    """A string that is stored in a column of `longest` characters: refused in one line
    when longer, or when it holds what SQL cannot store (a NUL, or bytes that are not UTF-8,
    which reach Python as lone surrogates)."""

    name = "text"

    def __init__(self, longest: int) -> None:
        self.longest = longest

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> str:
        text = str(value)
        name = _option(param)
        problem = column_problem(name, text, self.longest)
        if problem is not None:
            raise UserError(problem.replace("holds a lone surrogate", "holds bytes that are not "
                                            "UTF-8 text, read as a lone surrogate"))
        return text


def _option(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    if isinstance(param, click.Argument):
        return param.human_readable_name  # JOB, NAME
    return max(param.opts, key=len) if param.opts else str(param.name)


class Number(click.ParamType):
    """A whole number from `low` to `high`, else one line naming the option, exit 2: a job
    id of 10**20 reached SQL as an OverflowError traceback."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
        if number is None or not self.low <= number <= self.high:
            raise UserError(f"{_option(param)}: {shown(value)} is not a whole number from "
                            f"{self.low:,} to {self.high:,}")
        return number


JOB_ID = Number(1, 2**31 - 1)  # jobs.id is a 32-bit integer
CONCURRENCY = Number(1, 10_000)
DOLLARS, CENTS = Money(), Money(in_cents=True)
TEAM_NAME, SCHEDULE_NAME, JOB_NAME = StoredText(200), StoredText(200), StoredText(500)


def cap_from_options(budget: int | None, cents: int | None) -> int:
    """The cap in cents from --budget (already converted from dollars) or --budget-cents."""
    if budget is not None and cents is not None:
        raise UserError("give --budget or --budget-cents, not both")
    if cents is not None:
        return cents
    if budget is None:
        raise UserError("every job needs a cap: --budget DOLLARS (e.g. 5.00) or --budget-cents")
    return budget


def money(cents: int | None) -> str:
    return "-" if cents is None else f"${cents / 100:,.2f}"


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, default=str))


def exit_for(status: str) -> NoReturn:
    sys.exit(EXIT_OK if status == FINAL_OK else EXIT_JOB_NOT_OK)


# --- models and plan -----------------------------------------------------------------------


@main.command()
@click.option("--refresh", is_flag=True, help="Fetch /models now instead of using the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(refresh: bool, as_json: bool) -> None:
    """List the image, video and audio models the API offers, with their caps and prices.

    The answer of GET /models is cached in SQL for IMAGEBATCH_MODELS_TTL seconds."""
    settings = load_settings()
    with database(settings) as sessions:
        caps = model_caps(settings, sessions, refresh=refresh)
    if as_json:
        print_json([c.__dict__ for c in caps.values()])
        return
    table = Table(title=f"models at {redact_url(settings.api_base)}")
    for column in ("model", "modalities", "max_n", "aspect ratios / sizes", "qualities",
                   "max input images", "price / image"):
        table.add_column(column)
    for c in sorted(caps.values(), key=lambda c: c.model):
        shapes = ", ".join((c.aspect_ratios or ()) + (c.sizes or ())) or "any"
        table.add_row(
            c.model, ", ".join(c.modalities), str(c.max_n or "any"), shapes,
            ", ".join(c.qualities or ()) or "any",
            "any" if c.max_input_images is None else str(c.max_input_images),
            price_shown(c),
        )
    out.print(table)
    for c in sorted(caps.values(), key=lambda c: c.model):
        if c.refused is not None:  # why a model listed "refused" cannot run
            out.print(c.refused, highlight=False, markup=False)


def price_shown(caps: Caps) -> str:
    if caps.refused is not None:
        return "refused"
    return "no price" if caps.price_per_image_cents is None else f"{caps.price_per_image_cents}¢"


def plan_file(settings: Settings, sessions: Any, path: str) -> Submission:
    """Validate and price the file, streamed (nothing is written)."""
    readable(path)
    caps = model_caps(settings, sessions)
    try:
        return check_file(path, caps)
    except JobFileError as exc:
        raise UserError(str(exc)) from None


def print_plan_errors(plan: Submission, path: str) -> None:
    """The first MAX_ERRORS invalid lines as FILE:LINE (custom_id): reason, then a count."""
    for error in plan.errors:
        cid = f" ({error.custom_id})" if error.custom_id else ""
        err.print(f"{path}:{error.line}{cid}: {error.reason}", highlight=False, markup=False)
    if plan.error_count > len(plan.errors):
        err.print(f"... and {plan.error_count - len(plan.errors):,} more invalid lines",
                  highlight=False, markup=False)


def plan_dict(plan: Submission) -> dict[str, Any]:
    return {
        "items": plan.items,
        "images": plan.images,
        "calls": plan.calls,
        "max_cost_cents": plan.max_cost_cents,
        "by_model": [m.__dict__ for m in plan.by_model.values()],
        "errors": [{"line": e.line, "custom_id": e.custom_id, "reason": e.reason}
                   for e in plan.errors],
        "error_count": plan.error_count,
    }


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def plan(file: str, as_json: bool) -> None:
    """Validate FILE and show what it would cost, without generating anything.

    Per model: items, images, upstream calls (n split into calls of at most max_n) and the
    maximum cost. Exits 2 when any line is invalid (the first 100 are listed)."""
    settings = load_settings()
    with database(settings) as sessions:
        planned = plan_file(settings, sessions, file)
    if as_json:
        print_json(plan_dict(planned))
    else:
        table = Table(title=f"plan for {file}")
        for column in ("model", "items", "images", "calls", "max cost"):
            table.add_column(column, justify="right" if column != "model" else "left")
        for m in planned.by_model.values():
            table.add_row(m.model, str(m.items), str(m.images), str(m.calls),
                          money(m.max_cost_cents))
        table.add_row("total", str(planned.items), str(planned.images), str(planned.calls),
                      money(planned.max_cost_cents), style="bold")
        out.print(table)
        print_plan_errors(planned, file)
    if planned.error_count:
        sys.exit(EXIT_USAGE)


# --- submit and run ------------------------------------------------------------------------


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("file"),
        click.option("--team", default="default", show_default=True, type=TEAM_NAME,
                     help="Team the job is charged to (its period budget applies too)."),
        click.option("--budget", type=DOLLARS, help="The job's cap in dollars, e.g. 5.00."),
        click.option("--budget-cents", type=CENTS, help="The job's cap in cents."),
        click.option("--name", type=JOB_NAME,
                     help="A name for the job (default: the file's name)."),
        click.option("--allow-invalid", is_flag=True,
                     help="Submit even if some lines are invalid: they become failed items."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def submit_job(settings: Settings, sessions: Any, file: str, team: str, cap: int,
               name: str | None, allow_invalid: bool) -> tuple[int, Submission]:
    """Validate, price and write FILE as a pending job in one streamed pass."""
    readable(file)
    caps = model_caps(settings, sessions)
    try:
        planned = submit_file(sessions, file, caps, team=team, budget_cents=cap,
                              name=name or ("stdin" if file == "-" else file_name(file)),
                              allow_invalid=allow_invalid)
    except JobFileError as exc:
        raise UserError(str(exc)) from None
    if planned.error_count:
        print_plan_errors(planned, file)
    if planned.job_id is None:
        raise UserError(
            f"{planned.error_count:,} invalid line(s) in {file}; nothing was submitted "
            "(fix them, or pass --allow-invalid to run the rest)"
        )
    job_id = planned.job_id
    if planned.max_cost_cents > cap:
        err.print(f"note: the plan costs up to {money(planned.max_cost_cents)} but the cap is "
                  f"{money(cap)}: renders that do not fit will fail with reason 'budget'")
    return job_id, planned


@main.command()
@job_options
def submit(file: str, team: str, budget: int | None, budget_cents: int | None,
           name: str | None, allow_invalid: bool, as_json: bool) -> None:
    """Submit FILE as a job for `imagebatch worker` processes to render, and return at once.

    FILE is JSONL ('-' for stdin): one request body per line (model, prompt, n, and any
    provider parameter, passed through), with optional custom_id and metadata; OpenAI Batch
    lines {custom_id, method, url, body} work too."""
    from workers.tasks import nudge_dispatcher

    settings = load_settings()
    cap = cap_from_options(budget, budget_cents)
    app = broker_app(settings)  # a broker out of reach is said before the job is written
    with database(settings) as sessions:
        job_id, _ = submit_job(settings, sessions, file, team, cap, name, allow_invalid)
        nudge_dispatcher(app)
        with sessions() as session:
            summary = job_summary(session, job_id)
    if as_json:
        print_json(summary)
    else:
        out.print(f"submitted job {job_id} ({summary['items_total']} items, cap {money(cap)}); "
                  f"follow it with: imagebatch status {job_id}")



@main.command()
@job_options
@click.option("--concurrency", type=CONCURRENCY,
              help="Upstream calls in flight (default IMAGEBATCH_CONCURRENCY, 64).")
@click.option("--new", is_flag=True,
              help="Start a new job even if this file's earlier job is unfinished.")
def run(file: str, team: str, budget: int | None, budget_cents: int | None, name: str | None,
        allow_invalid: bool, as_json: bool, concurrency: int | None, new: bool) -> None:
    """Submit FILE and render it in this process until the job ends, with progress.

    Ctrl-C pauses the job: nothing new is sent, in-flight renders finish and are settled,
    and `imagebatch resume JOB` continues it later. A second Ctrl-C leaves at once (exit
    130; renders in flight are taken back by the sweeper once their leases run out).

    A file whose earlier job is unfinished (paused, or its process killed) is refused with
    the command that continues it; --new starts another job anyway.

    Exit code 0 when every item succeeded, 1 when the job ended partial, failed or cancelled
    or was paused, 2 for usage errors, invalid input and an unfinished earlier job."""
    settings = load_settings(**({"concurrency": concurrency} if concurrency else {}))
    cap = cap_from_options(budget, budget_cents)
    summary = run_job_here(settings, file, team, cap, name, allow_invalid, quiet=as_json,
                           new=new)
    if as_json:
        print_json(summary)
    exit_for(summary["status"])


def run_job_here(settings: Settings, file: str, team: str, cap: int, name: str | None,
                 allow_invalid: bool, *, quiet: bool, new: bool = True) -> dict[str, Any]:
    """Submit FILE and render it here; unless `new`, refuse a file whose job is unfinished."""
    with database(settings) as sessions:
        # The file is looked at before any worker starts: a refusal prints its line alone.
        readable(file)
        if not new:
            refuse_unfinished(sessions, file)
        storage_ready(settings)
        # Celery's worker takes about a quarter of a second to start: while the file is
        # submitted, not between the job's commit and its first call.
        with worker_here(settings) as app:
            job_id, _ = submit_job(settings, sessions, file, team, cap, name, allow_invalid)
            summary = render_here(app, sessions, job_id, quiet=quiet)
        if not quiet:
            print_outcome(settings, sessions, summary)
    return summary


def refuse_unfinished(sessions: Any, file: str) -> None:
    """Exit 2 naming `resume` when FILE (same sha256) was submitted as a job that has not
    ended. Standard input is never matched."""
    from pipeline.submission import file_digest

    if file == "-":
        return
    readable(file)
    digest = file_digest(file)
    with sessions() as session:
        job = unfinished_job_of(session, digest)
        if job is None:
            return
        s = job_summary(session, job.id)
    done = s["items_succeeded"] + s["items_failed"] + s["items_cancelled"]
    raise UserError(
        f"{file_name(file)} was submitted as job {job.id}, which is {s['status']} "
        f"({done:,}/{s['items_total']:,} items done): continue it with "
        f"`imagebatch resume {job.id}`, or pass --new to start another copy")


def storage_ready(settings: Settings) -> None:
    """Exit 2 unless results can be stored (a probe object written and deleted): before the
    first call, so nothing is bought that cannot be kept."""
    from pipeline.storage import StorageError, open_store, probe

    try:
        probe(open_store(settings.storage_url))
    except StorageError as exc:
        raise UserError(f"storage cannot keep results ({_safe_url(settings.storage_url)}, "
                        f"IMAGEBATCH_STORAGE_URL): {exc}; nothing was sent") from None


@contextmanager
def worker_here(settings: Settings):  # type: ignore[no-untyped-def]
    """A Celery worker in this process on an in-memory broker, stopped on the way out."""
    from workers.app import check_shared_redis, create_app
    from workers.embedded import InProcessWorker
    from workers.tasks import shutdown_services

    check_shared_redis(settings)
    app = create_app(settings, broker_url="memory://localhost//")
    worker = InProcessWorker(app, settings.render_slots)
    worker.start()
    try:
        yield app
    finally:
        worker.stop()
        shutdown_services()


def render_here(app: Any, sessions: Any, job_id: int, *, quiet: bool) -> dict[str, Any]:
    """Plan, send and sweep here (the ticker's first tick plans the job at once) and follow
    the job until it ends or pauses; a paused job names the command that continues it."""
    from workers.embedded import Feeder, Ticker
    from workers.tasks import services

    ticker, feeder = Ticker(app, interval=1.0, only_job=job_id), Feeder(app, only_job=job_id)
    svc = services(app)

    def stuck() -> str | None:
        """Why this process cannot go on: the database has refused writes (the feeder's) for
        DB_PATIENCE, and no paid call is in flight or waits to be recorded (leaving then
        loses nothing more)."""
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
        try:
            summary = follow_job(sessions, job_id, ctrl_c, quiet=quiet, stuck=stuck)
        finally:
            feeder.stop()
            ticker.stop()
    if summary["status"] == "paused":
        why = f" ({summary['error']})" if summary.get("error") else ""
        err.print(f"job {job_id} is paused{why}: continue it with `imagebatch resume {job_id}`",
                  highlight=False, markup=False)
    return summary


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

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.pressed.is_set():
            self.pressed.set()
            return
        # Written straight to the descriptors: the interrupted code may hold a console lock.
        os.write(2, (f"\nleaving now: job {self.job_id} is not finished; renders in flight "
                     "are taken back by the sweeper once their leases run out; continue it "
                     f"with `imagebatch resume {self.job_id}`\n").encode())
        os._exit(130 if signum == signal.SIGINT else 128 + signum)


def follow_job(sessions: Any, job_id: int, ctrl_c: CtrlC, *, quiet: bool,
               stuck: Callable[[], str | None] = lambda: None) -> dict[str, Any]:
    """Show progress until the job ends, or is paused (by Ctrl-C here or `imagebatch pause`
    anywhere) and none of its renders is in flight any more, or `stuck()` says why this
    process cannot go on."""
    progress = JobProgress(err, job_id, quiet=quiet)
    asked = False
    told: str | None = None
    with progress:
        while True:
            if ctrl_c.pressed.is_set() and not asked:
                asked = True
                with transaction(sessions) as session:
                    paused = pause_job(session, job_id)
                if paused:
                    err.print(f"pausing job {job_id}: nothing new is sent, renders in flight "
                              "finish and are settled (Ctrl-C again to leave now)",
                              highlight=False)
            # The whole summary is a row; whether the job is done is its status, and for a
            # paused job whether any render is still running (read from an index).
            with sessions() as session:
                state = job_state(session, job_id)
                finished = state.finished_at is not None
                drained = (not finished and state.status == "paused"
                           and renders_running(session, job_id) == 0)
                told = _say_why_paused(session, job_id, state.status, told)
                if finished or drained or progress.due():
                    summary = job_summary(session, job_id)
                    progress.update(summary)
            if finished or drained:
                return summary
            why = stuck()
            if why is not None:
                raise Stopped(why)
            ctrl_c.pressed.wait(0.25) if not asked else time.sleep(0.25)


def _say_why_paused(session: Any, job_id: int, status: str, told: str | None) -> str | None:
    """Say once why the job was paused when something other than a person paused it (storage
    refusing results); returns what has been said."""
    if status != "paused":
        return None
    error = job_summary(session, job_id)["error"]
    if error and error != told:
        err.print(f"job {job_id} paused ({error}): nothing new is bought; results already "
                  "paid for keep trying to be stored, and the job runs on if they are",
                  highlight=False, markup=False)
    return error


def print_outcome(settings: Settings, sessions: Any, summary: dict[str, Any]) -> None:
    job_id = summary["id"]
    colour = {"succeeded": "green", "partial": "yellow", "paused": "yellow"}.get(
        summary["status"], "red")
    out.print(
        Text.assemble(f"job {job_id} ", (summary["status"], f"bold {colour}"), ": ")
        + f"{summary['items_succeeded']}/{summary['items_total']} items, "
        f"{summary['images']} files, spent {money(summary['spent_cents'])} of "
        f"{money(summary['budget_cents'])}"
        + (f" ({money(summary['unknown_cents'])} unknown)" if summary["unknown_cents"] else "")
    )
    out.print(f"files: {settings.storage_url.rstrip('/')}/job-{job_id:06d}/", highlight=False)
    if summary["status"] == "paused":
        out.print(f"continue it with: imagebatch resume {job_id}", highlight=False)
    with sessions() as session:
        errors = item_errors(session, job_id, limit=10)
    for e in errors:
        cid = f" ({e['custom_id']})" if e["custom_id"] else ""
        err.print(f"  line {e['line']}{cid}: {e['error']}", highlight=False, markup=False)
    if errors:
        err.print(f"export the files with: imagebatch export {job_id} --format csv")


class JobProgress:
    """A live bar on a terminal (items, files, spent / cap, ETA); plain lines otherwise."""

    PLAIN_EVERY = 5.0

    def __init__(self, console: Console, job_id: int, *, quiet: bool) -> None:
        self.console, self.job_id, self.quiet = console, job_id, quiet
        self.live = console.is_terminal and not quiet
        self._last_plain = 0.0
        self._next_live = self._asked_at = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> JobProgress:
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
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
        done = s["items_succeeded"] + s["items_failed"] + s["items_cancelled"]
        spent = f"{money(s['spent_cents'])} / {money(s['budget_cents'])}"
        if self._bar is not None:
            started = time.monotonic()
            self._bar.update(self._task, total=s["items_total"], completed=done,
                             files=s["images"], money=spent)
            self._next_live = started + max(0.25, 20 * (started - self._asked_at))
            return
        if not self.quiet:  # `due()` (or the job's end) decided that a line is wanted now
            self._last_plain = time.monotonic()
            self.console.print(
                f"job {self.job_id}: {done}/{s['items_total']} items, {s['images']} files, "
                f"spent {spent}, {s['status']}", highlight=False)


# --- job commands --------------------------------------------------------------------------


@main.command()
@click.argument("job", type=JOB_ID, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(job: int | None, as_json: bool) -> None:
    """Show one job (with its failed items), or the latest jobs."""
    settings = load_settings()
    with database(settings) as sessions, sessions() as session:
        if job is not None:
            summary = job_summary(session, job)
            summary["errors"] = item_errors(session, job)
            if as_json:
                print_json(summary)
                return
            _print_summary(summary)
            return
        jobs = [job_summary(session, j.id) for j in list_jobs(session)]
    if as_json:
        print_json({"jobs": jobs})
        return
    table = Table(title="jobs")
    for column in ("id", "name", "team", "status", "items", "files", "spent", "cap"):
        table.add_column(column)
    for s in jobs:
        table.add_row(str(s["id"]), s["name"] or "", s["team"], s["status"],
                      f"{s['items_succeeded']}/{s['items_total']}", str(s["images"]),
                      money(s["spent_cents"]), money(s["budget_cents"]))
    out.print(table)


def _print_summary(s: dict[str, Any]) -> None:
    out.print(f"job {s['id']} ({s['name'] or 'unnamed'}, team {s['team']}): {s['status']}")
    out.print(f"  items: {s['items_succeeded']} succeeded, {s['items_failed']} failed, "
              f"{s['items_cancelled']} cancelled, {s['items_total']} in all")
    out.print(f"  files: {s['images']}")
    out.print(f"  money: spent {money(s['spent_cents'])} (unknown {money(s['unknown_cents'])}),"
              f" reserved {money(s['reserved_cents'])}, cap {money(s['budget_cents'])}")
    for e in s["errors"]:
        out.print(f"  line {e['line']}: {e['error']}", highlight=False, markup=False)


@main.command()
@click.argument("job", type=JOB_ID)
def cancel(job: int) -> None:
    """Cancel JOB: nothing new is sent; in-flight renders finish and are settled.

    The job is cancelled first (renders check it before they call), then its queued renders
    and pending items, in chunks: on a job of any size nothing new is called within a
    second. Interrupted, run it again. `imagebatch resume JOB` renders the cancelled items
    after all."""
    settings = load_settings()
    with database(settings) as sessions:
        with transaction(sessions) as session:
            changed = begin_cancel(session, job)
        if not changed:
            with sessions() as session:
                state = job_summary(session, job)["status"]
            out.print(f"job {job} had already ended ({state})")
            return
        finish_cancel(lambda: transaction(sessions), job)
        with sessions() as session:
            in_flight = renders_running(session, job)
    out.print(f"job {job} cancelled" + (
        f": {in_flight} render(s) in flight finish and are settled" if in_flight else ""))


def parse_only(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    wrong = [v for v in chosen if v not in RETRY_CHOICES]
    if wrong or not chosen:
        raise click.BadParameter(f"{', '.join(wrong) or 'nothing'} is not among "
                                 f"{', '.join(RETRY_CHOICES)}")
    return chosen


@main.command()
@click.argument("job", type=JOB_ID)
@click.option("--only", default="failed", show_default=True, callback=parse_only,
              help="Which items go again, comma-separated: failed (every failed item), "
                   "cancelled, budget (failed for budget), unknown (a last attempt whose "
                   "outcome is unknown).")
@click.option("--budget", type=DOLLARS,
              help="Raise (or set) the job's cap in dollars first.")
@click.option("--budget-cents", type=CENTS, help="The same, in cents.")
def retry(job: int, only: tuple[str, ...], budget: int | None, budget_cents: int | None
          ) -> None:
    """Render JOB's failed items again (each attempt reserves anew), once the job has ended.

    `imagebatch resume JOB` then renders them in this process; or `imagebatch worker`
    processes do."""
    settings = load_settings()
    cap = None if budget is None and budget_cents is None else cap_from_options(budget,
                                                                                budget_cents)
    with database(settings) as sessions:
        with transaction(sessions) as session:
            count = retry_job(session, job, cap, only)
        if not count:  # the job was left exactly as it ended (its cap too)
            state = _job_summary(sessions, job)["status"]
            out.print(f"job {job} is {state}: nothing to retry (no {' or '.join(only)} "
                      "items); nothing was changed", highlight=False)
            return
        nudge(settings)
    out.print(f"job {job}: {count} {' or '.join(only)} item(s) queued again; render them "
              f"here with `imagebatch resume {job}` or on `imagebatch worker` processes")


@main.command()
@click.argument("job", type=JOB_ID)
def pause(job: int) -> None:
    """Pause JOB: nothing new is sent, renders in flight finish and are settled, the rest
    waits queued. `imagebatch resume JOB` continues it in this process, `imagebatch resume
    JOB --detach` on `imagebatch worker` processes."""
    settings = load_settings()
    with database(settings) as sessions:
        with transaction(sessions) as session:
            changed = pause_job(session, job)
        with sessions() as session:
            state = job_state(session, job).status
    if changed:
        out.print(f"job {job} paused: renders in flight finish; continue it with "
                  f"`imagebatch resume {job}` (here) or `imagebatch resume {job} --detach` "
                  "(on the workers)", highlight=False)
    elif state == "paused":
        out.print(f"job {job} is paused already", highlight=False)
    else:
        out.print(f"job {job} is {state}: nothing to pause", highlight=False)


@main.command()
@click.argument("job", type=JOB_ID)
@click.option("--budget", type=DOLLARS,
              help="Raise (or set) the job's cap in dollars first.")
@click.option("--budget-cents", type=CENTS, help="The same, in cents.")
@click.option("--detach", is_flag=True,
              help="Set the job running and return: `imagebatch worker` processes continue it.")
@click.option("--concurrency", type=CONCURRENCY,
              help="Upstream calls in flight (default IMAGEBATCH_CONCURRENCY, 64).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def resume(job: int, budget: int | None, budget_cents: int | None, detach: bool,
           concurrency: int | None, as_json: bool) -> None:
    """Continue JOB in this process, as `run` does: a paused job, one whose `run` was killed,
    or a cancelled one (its cancelled items are rendered after all).

    Items that ended are never rendered again. A render another process may still be
    calling keeps its lease; the sweeper here takes it back once the lease runs out
    (IMAGEBATCH_LEASE_SECONDS). Ctrl-C pauses again, as in `run`.

    Exit codes as `run`: 0 when every item succeeded (also when it had already: nothing to
    resume), 1 when the job ended otherwise or was paused, 2 for usage errors."""
    settings = load_settings(**({"concurrency": concurrency} if concurrency else {}))
    cap = None if budget is None and budget_cents is None else cap_from_options(budget,
                                                                                budget_cents)
    with database(settings) as sessions:
        if detach:
            resumed = resume_job(sessions, job, budget_cents=cap, in_process=False)
            if resumed.resumed:
                nudge(settings)
            summary = _job_summary(sessions, job)
            if not resumed.resumed:
                _nothing_to_resume(summary, as_json)
            if as_json:
                print_json(summary)
            else:
                out.print(f"job {job} is {summary['status']} again: `imagebatch worker` "
                          f"processes continue it (follow it with `imagebatch status {job}`)",
                          highlight=False)
            return
        storage_ready(settings)
        with worker_here(settings) as app:
            resumed = resume_job(sessions, job, budget_cents=cap, in_process=True)
            if resumed.resumed:
                if not as_json:
                    err.print(f"resuming job {job} ({resumed.before})", highlight=False)
                summary = render_here(app, sessions, job, quiet=as_json)
        if not resumed.resumed:
            _nothing_to_resume(_job_summary(sessions, job), as_json)
        if not as_json:
            print_outcome(settings, sessions, summary)
    if as_json:
        print_json(summary)
    exit_for(summary["status"])


def _job_summary(sessions: Any, job: int) -> dict[str, Any]:
    with sessions() as session:
        return job_summary(session, job)


def _nothing_to_resume(summary: dict[str, Any], as_json: bool) -> NoReturn:
    job, status = summary["id"], summary["status"]
    hint = "" if status == FINAL_OK else (
        f"; `imagebatch retry {job} --only failed,budget,unknown` renders failed items again")
    err.print(f"job {job} {status}: nothing to resume{hint}", highlight=False, markup=False)
    if as_json:
        print_json(summary)
    else:
        out.print(f"job {job} {status}: {summary['items_succeeded']}/{summary['items_total']} "
                  f"items, {summary['images']} files, spent {money(summary['spent_cents'])} "
                  f"of {money(summary['budget_cents'])}", highlight=False)
    exit_for(status)


@main.command()
@click.argument("job", type=JOB_ID)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Write to this file instead of standard output.")
def export(job: int, fmt: str, output: str | None) -> None:
    """Export one row per stored file of JOB: where it is, what it is, and what it cost."""
    from pipeline.export import export_rows, write_export
    from pipeline.storage import open_store

    settings = load_settings()
    uri_of = open_store(settings.storage_url).uri
    with database(settings) as sessions, sessions() as session:
        job_summary(session, job)  # a clear error for a job that does not exist
        if output is None:
            write_export(export_rows(session, job, uri_of), sys.stdout, fmt)
            return
        with open(output, "w", encoding="utf-8", newline="") as file:
            count = write_export(export_rows(session, job, uri_of), file, fmt)
    err.print(f"wrote {count} rows to {output}")


# --- teams, reports and schedules ----------------------------------------------------------


@main.group()
def team() -> None:
    """Team period budgets: every render reserves on its job's cap and its team's period."""


@team.command("set")
@click.argument("name", type=TEAM_NAME)
@click.option("--budget", type=DOLLARS, help="The period's limit in dollars (e.g. 500.00).")
@click.option("--budget-cents", type=CENTS, help="The same, in cents.")
@click.option("--period", type=click.Choice(["day", "week", "month", "none"]), default="month",
              show_default=True, help="UTC periods; 'none' is one budget for all time.")
@click.option("--no-budget", is_flag=True, help="Remove the limit (jobs run on their cap).")
def team_set(name: str, budget: int | None, budget_cents: int | None, period: str,
             no_budget: bool) -> None:
    """Create or change team NAME's budget. Lowering it stops new reservations that do not
    fit at once (renders in flight finish); it cannot go below what the current period has
    already spent and reserved."""
    from pipeline.teams import set_team, team_state

    cap = None if no_budget else cap_from_options(budget, budget_cents)
    settings = load_settings()
    with database(settings) as sessions, transaction(sessions) as session:
        set_team(session, name, cap, period)
        session.flush()
        state = team_state(session, name)
    out.print(f"team {name}: {money(state.limit_cents) if cap is not None else 'no limit'} "
              f"per {period}")


@team.command("list")
@click.option("--json", "as_json", is_flag=True)
def team_list(as_json: bool) -> None:
    """Every team with its current period's limit, spent, reserved and left."""
    from pipeline.teams import list_teams

    settings = load_settings()
    with database(settings) as sessions, sessions() as session:
        states = list_teams(session)
    if as_json:
        print_json([s.as_dict() for s in states])
        return
    table = Table(title="teams")
    for column in ("team", "period", "limit", "spent", "unknown", "reserved", "left"):
        table.add_column(column)
    for s in states:
        table.add_row(s.team, s.period, money(s.limit_cents), money(s.spent_cents),
                      money(s.unknown_cents), money(s.reserved_cents), money(s.left_cents))
    out.print(table)


@team.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def team_show(name: str, as_json: bool) -> None:
    """Team NAME's current period: limit, spent, reserved, unknown, left, start and end."""
    from pipeline.teams import team_state

    settings = load_settings()
    with database(settings) as sessions, sessions() as session:
        try:
            state = team_state(session, name)
        except LookupError as exc:
            raise UserError(str(exc.args[0])) from None
    if as_json:
        print_json(state.as_dict())
        return
    d = state.as_dict()
    out.print(f"team {name} ({state.period}): limit {money(state.limit_cents)}, "
              f"spent {money(state.spent_cents)} (unknown {money(state.unknown_cents)}), "
              f"reserved {money(state.reserved_cents)}, left {money(state.left_cents)}")
    out.print(f"period: {d['period_start'] or 'all time'} to {d['period_end'] or 'forever'}")


def _parse_day(value: str | None, option: str) -> Any:
    from datetime import datetime

    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=None)
    except ValueError:
        raise UserError(f"{option} {value!r} is not a date (YYYY-MM-DD)") from None


@main.command()
@click.option("--team", help="Only this team.")
@click.option("--job", type=JOB_ID, help="Only this job.")
@click.option("--model", help="Only this model.")
@click.option("--since", help="From this UTC date or time (inclusive), e.g. 2026-11-01.")
@click.option("--until", help="Up to this UTC date or time (exclusive).")
@click.option("--by", type=click.Choice(["team", "model", "job", "day", "month"]),
              help="One row per team, model, job, day or month.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
def report(team: str | None, job: int | None, model: str | None, since: str | None,
           until: str | None, by: str | None, fmt: str, as_json: bool) -> None:
    """Costs from the ledger: upstream calls, images, charged, unknown, released, and the
    average cost per image (spent / images). Totals equal the ledger rows they cover."""
    from pipeline.report import ReportFilter, ledger_report, total_of

    settings = load_settings()
    filters = ReportFilter(team=team, job=job, model=model,
                           since=_parse_day(since, "--since"), until=_parse_day(until, "--until"))
    with database(settings) as sessions, sessions() as session:
        rows = ledger_report(session, filters, by)
    total = total_of(rows)
    fmt = "json" if as_json else fmt
    if fmt == "json":
        print_json({"by": by, "rows": [r.as_dict() for r in rows], "total": total.as_dict()})
        return
    if fmt == "csv":
        import csv

        from pipeline.export import neutralised

        writer = csv.writer(sys.stdout, lineterminator="\r\n")  # as `export` (RFC 4180)
        fields = list(total.as_dict())
        writer.writerow(fields)
        for row in [*rows, total]:  # team and model names are user strings: no formulas
            writer.writerow([neutralised(row.as_dict()[f]) for f in fields])
        return
    table = Table(title="costs from the ledger")
    for column in (by or "", "calls", "images", "charged", "unknown", "released", "per image"):
        table.add_column(column, justify="left" if column == (by or "") else "right")
    for row in [*rows, total]:
        per = "-" if row.avg_cents_per_image is None else f"{row.avg_cents_per_image:.2f}¢"
        table.add_row(row.group, str(row.calls), str(row.images), money(row.charged_cents),
                      money(row.unknown_cents), money(row.released_cents), per,
                      style="bold" if row is total else None)
    out.print(table)


@main.group()
def schedule() -> None:
    """Scheduled renders, fired by `imagebatch beat`."""


@schedule.command("add")
@click.argument("name", type=SCHEDULE_NAME)
@click.argument("file")
@click.option("--cron", required=True, help="When to fire, e.g. '0 3 * * *'.")
@click.option("--team", default="default", show_default=True, type=TEAM_NAME)
@click.option("--budget", type=DOLLARS, help="Each job's cap in dollars.")
@click.option("--budget-cents", type=CENTS, help="The same, in cents.")
@click.option("--timezone", default="UTC", show_default=True,
              help="The zone the cron expression is read in, e.g. Europe/Berlin.")
def schedule_add(name: str, file: str, cron: str, team: str, budget: int | None,
                 budget_cents: int | None, timezone: str) -> None:
    """Fire FILE as a job on the cron schedule. The file's content is stored with the
    schedule, so moving or editing the file later changes nothing."""
    from pipeline.schedules import ScheduleError, add_schedule, next_slot

    cap = cap_from_options(budget, budget_cents)
    text, source = read_job_text(file)
    settings = load_settings()
    with database(settings) as sessions, transaction(sessions) as session:
        try:
            add_schedule(session, name=name, cron=cron, job_text=text, team=team,
                         budget_cents=cap, timezone=timezone, source_name=source)
        except ScheduleError as exc:
            raise UserError(str(exc)) from None
    from pipeline.models import utcnow

    upcoming = next_slot(cron, timezone, utcnow())
    out.print(f"schedule {name}: next firing {upcoming:%Y-%m-%d %H:%M} UTC "
              "(it fires while `imagebatch beat` runs)")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True)
def schedule_list(as_json: bool) -> None:
    """Every schedule with its next firing and its last job."""
    from pipeline.schedules import list_schedules

    settings = load_settings()
    with database(settings) as sessions, sessions() as session:
        views = list_schedules(session)
    if as_json:
        print_json([v.__dict__ for v in views])
        return
    table = Table(title="schedules")
    for column in ("name", "cron", "zone", "team", "cap", "next (UTC)", "last job", "status"):
        table.add_column(column)
    for v in views:
        table.add_row(v.name, v.cron, v.timezone, v.team, money(v.budget_cents),
                      f"{v.next_firing:%Y-%m-%d %H:%M}", str(v.last_job_id or "-"),
                      v.last_job_status or "-")
    out.print(table)


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name: str) -> None:
    """Delete schedule NAME (its jobs stay)."""
    from pipeline.schedules import ScheduleError, remove_schedule

    settings = load_settings()
    with database(settings) as sessions, transaction(sessions) as session:
        try:
            remove_schedule(session, name)
        except ScheduleError as exc:
            raise UserError(str(exc)) from None
    out.print(f"schedule {name} removed")


@schedule.command("run")
@click.argument("name")
def schedule_run(name: str) -> None:
    """Create schedule NAME's job now (the workers render it)."""
    from pipeline.schedules import ScheduleError, run_now

    settings = load_settings()
    with database(settings) as sessions:
        with transaction(sessions) as session:
            try:
                job_id = run_now(session, name)
            except ScheduleError as exc:
                raise UserError(str(exc)) from None
        nudge(settings)
    out.print(f"schedule {name}: job {job_id} submitted")


# --- processes -----------------------------------------------------------------------------


@main.command()
@click.option("--concurrency", type=CONCURRENCY,
              help="Upstream calls in flight in this worker (default "
                   "IMAGEBATCH_CONCURRENCY).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Also plan pending jobs, send queued renders to the broker as renders "
                   "start, and bring back stuck renders (needed where no `imagebatch beat` "
                   "runs; harmless beside one).")
def worker(concurrency: int | None, sweep: bool) -> None:
    """Render queued jobs until stopped (Ctrl-C or SIGTERM finishes what it started)."""
    from workers.embedded import Feeder, Ticker
    from workers.tasks import announce_worker

    settings = load_settings(**({"concurrency": concurrency} if concurrency else {}))
    with database(settings):
        pass  # refuses to start on a schema that is behind
    storage_ready(settings)
    app = broker_app(settings)
    announce_worker(app, settings.render_slots)
    # The ticker plans and sweeps every sweep_interval; the feeder keeps the broker's
    # window full as renders start.
    tickers = [Ticker(app, interval=settings.sweep_interval), Feeder(app)] if sweep else []
    for ticker in tickers:
        ticker.start()
    err.print(f"worker: {settings.concurrency} calls in flight ({settings.render_slots} "
              f"renders), broker "
              f"{_safe_url(settings.broker_url)}, database {_safe_url(settings.database_url)}")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    app.Worker(pool="threads", concurrency=settings.render_slots, loglevel=level,
               without_mingle=True, without_gossip=True, optimization="fair").start()
    for ticker in tickers:
        ticker.stop()


@main.command()
@click.option("--interval", type=click.FloatRange(0.1, 86_400), default=2.0, show_default=True,
              callback=lambda _ctx, _param, value: finite(value, "--interval"),
              help="Seconds between two looks at pending jobs, schedules and stuck renders.")
def beat(interval: float) -> None:
    """Pick up jobs inserted with SQL, fire schedules, and sweep stuck renders, until stopped."""
    from workers.embedded import Feeder, Ticker

    settings = load_settings()
    with database(settings):
        pass
    app = broker_app(settings)
    tickers = [Ticker(app, interval=interval), Feeder(app)]
    err.print(f"beat: every {interval:g}s")
    for ticker in tickers:
        ticker.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for ticker in tickers:
            ticker.stop()


@main.command()
def dispatch() -> None:
    """Plan pending jobs now (those inserted with SQL included) and enqueue their renders."""
    from workers.embedded import tick

    settings = load_settings()
    with database(settings):
        pass
    count = tick(broker_app(settings))
    from workers.tasks import shutdown_services

    shutdown_services()
    out.print(f"enqueued {count} render(s)")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


@main.group()
def db() -> None:
    """The database schema (Alembic migrations)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema to this version's."""
    settings = load_settings()
    engine = open_engine(settings.database_url, where=settings.database_label)
    try:
        prepare_schema(engine, upgrade=True, where=settings.database_label)
        current, _ = schema_revisions(engine)
    finally:
        engine.dispose()
    out.print(f"schema at revision {current} ({_safe_url(settings.database_url)})")


@db.command("current")
def db_current() -> None:
    """Show the schema's revision and the one this version needs."""
    settings = load_settings()
    engine = open_engine(settings.database_url, where=settings.database_label)
    try:
        current, head = schema_revisions(engine)
    finally:
        engine.dispose()
    out.print(f"database: {current or 'empty'}; this imagebatch: {head}")


# --- trying it out -------------------------------------------------------------------------


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--latency", type=float, default=1.0, show_default=True,
              help="Seconds each render takes (keepalives are sent meanwhile).")
@click.option("--keepalive", type=float, default=0.2, show_default=True,
              help="Seconds between two ': keepalive' comments.")
@click.option("--media-bytes", type=int, default=2048, show_default=True,
              help="Approximate size of each media file.")
@click.option("--fail-rate", type=float, default=0.0, help="Share of calls answered 500.")
@click.option("--cut-rate", type=float, default=0.0, help="Share of streams cut (billed).")
@click.option("--rate-limit-rate", type=float, default=0.0, help="Share answered 429.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None,
              help="Serve this many generations at once; answer 429 to more.")
@click.option("--concurrency-retry-after", type=click.FloatRange(min=0), default=None,
              help="Retry-After seconds of those 429s (none by default).")
def fake_upstream(host: str, port: int, latency: float, keepalive: float, media_bytes: int,
                  fail_rate: float, cut_rate: float, rate_limit_rate: float,
                  max_concurrent: int | None, concurrency_retry_after: float | None) -> None:
    """Serve a fake provider (/v1/models, /v1/images/generations) for trying job files and
    budgets without spending: set IMAGEBATCH_API_BASE=http://HOST:PORT/v1."""
    from fake_upstream.app import FakeConfig, serve

    config = FakeConfig(latency=latency, keepalive_interval=keepalive, media_bytes=media_bytes,
                        fail_rate=fail_rate, cut_rate=cut_rate, rate_limit_rate=rate_limit_rate,
                        max_concurrent=max_concurrent,
                        concurrency_retry_after=concurrency_retry_after)
    err.print(f"fake upstream on http://{host}:{port}/v1 (Ctrl-C stops it)")
    serve(host, port, config)


@main.command()
@click.option("--latency", type=float, default=0.5, show_default=True)
def demo(latency: float) -> None:
    """Render the example job (examples/demo.jsonl) against a bundled fake upstream: no key,
    no servers, no spending. Prints where the files landed and what they cost."""
    from fake_upstream.app import FakeConfig, FakeServer

    example = Path(__file__).resolve().parent / "examples" / "demo.jsonl"
    with FakeServer(FakeConfig(latency=latency)) as fake:
        settings = load_settings(api_base=fake.base_url, api_key=None)
        err.print(f"demo: fake upstream at {fake.base_url}, data in {settings.data_dir}")
        summary = run_job_here(settings, str(example), "demo", 200, "demo", False, quiet=False)
        billed = fake.stats()["billed_cents"]
    out.print(f"the fake upstream billed {money(billed)}; the ledger says "
              f"{money(summary['spent_cents'])}")
    exit_for(summary["status"])


if __name__ == "__main__":
    main()
