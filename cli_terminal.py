"""The terminal side of the commands: the two consoles, every error a user can meet as one
line with its exit code, the option types that check each value where it is read (naming
the option when it is wrong), and tables, JSON and progress bars as printed."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline import views
from pipeline.db import SchemaBehind, error_reason
from pipeline.jobs import RETRY_CHOICES, JobNotFound, item_errors
from pipeline.plan import OPTION, parse_cents, parse_dollars, stored_text, whole_number
from pipeline.settings import Settings, SettingsError
from pipeline.submission import InvalidLines

EXIT_OK, EXIT_JOB_NOT_OK, EXIT_USAGE = 0, 1, 2
FINAL_OK = "succeeded"

# Piped output is read by scripts and people alike: wide enough that tables never wrap ids.
# No markup: user strings (job and team names, values in errors) are printed as they are
# ("[/x]" in a name was a MarkupError traceback); styles are given as Text.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, markup=False)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200,
              markup=False)


def say(text: str) -> None:
    """A line on stderr, as it is."""
    err.print(text, highlight=False, markup=False)


def show(text: str) -> None:
    """A line on stdout, as it is."""
    out.print(text, highlight=False, markup=False)


class Stopped(click.ClickException):
    """A run that cannot go on through no fault of its input: one line, exit code 1."""

    exit_code = EXIT_JOB_NOT_OK

    def show(self, file: Any = None) -> None:
        say(f"error: {self.message}")


class UserError(click.ClickException):
    """A problem the user can fix: printed as one line, exit code 2, never a traceback."""

    exit_code = EXIT_USAGE

    def show(self, file: Any = None) -> None:
        err.print(Text.assemble(("error:", "bold red"), f" {self.message}"), highlight=False)


class Group(click.Group):
    """Every error a user can meet as one line: bad input, settings and files exit 2 (each
    invalid job line first, FILE:LINE: reason), a run that cannot go on exits 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from pipeline.datasets import ExportError
        from pipeline.storage import StorageError
        from pipeline.upstream import UpstreamError
        from workers.local import Stopped as RunStopped

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except InvalidLines as exc:
            for line in exc.lines:
                say(line)
            raise UserError(exc.summary) from None
        except RunStopped as exc:
            raise Stopped(str(exc)) from None
        except (SettingsError, SchemaBehind, JobNotFound, StorageError, UpstreamError,
                ExportError, ValueError, OSError) as exc:
            raise UserError(str(exc)) from None
        except OperationalError as exc:  # the database went away or locked up mid-command
            raise UserError(f"{Settings.from_env().database_label}: the database failed: "
                            f"{error_reason(exc)}") from None


def finite(value: float, option: str) -> float:
    """click's FloatRange lets nan through (every comparison with it is false)."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param_hint=option)
    return value


class Checked(click.ParamType):
    """A value converted by `check`, or one line naming the option (exit 2) saying why not
    (`check` raises ValueError; OPTION in its reason is the option's name)."""

    def __init__(self, name: str, check: Callable[[str], Any]) -> None:
        self.name, self.check = name, check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if not isinstance(value, str):
            return value  # a default, converted already
        try:
            return self.check(value)
        except ValueError as exc:
            option, reason = _option(param), str(exc)
            raise UserError(reason.replace(OPTION, option) if OPTION in reason
                            else f"{option}: {reason}") from None


def _option(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    if isinstance(param, click.Argument):
        return param.human_readable_name  # JOB, NAME
    return max(param.opts, key=len) if param.opts else str(param.name)


# Money is integer cents from 0 to plan.MAX_CENTS, given as dollars ('5.00') or cents ('500'):
# NaN, sNaN, Infinity, 1e309, a negative amount or a fraction of a cent are refused.
DOLLARS, CENTS = Checked("dollars", parse_dollars), Checked("cents", parse_cents)
JOB_ID = Checked("integer", whole_number(1, 2**31 - 1))  # jobs.id is a 32-bit integer
CONCURRENCY = Checked("integer", whole_number(1, 10_000))
SHARD_SIZE = Checked("integer", whole_number(1, 10_000_000))
SAMPLE_SIZE = Checked("integer", whole_number(1, 2**31 - 1))
TEAM_NAME = SCHEDULE_NAME = Checked("text", stored_text(200))
JOB_NAME = Checked("text", stored_text(500))


def budget_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--budget DOLLARS and --budget-cents CENTS, for `what`."""
    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option("--budget-cents", type=CENTS, help="The same, in cents.")(command)
        return click.option("--budget", type=DOLLARS, help=f"{what} in dollars.")(command)
    return add


def cap_from_options(budget: int | None, cents: int | None, *, required: bool = True
                     ) -> int | None:
    """The cap in cents from --budget (already converted from dollars) or --budget-cents;
    None when neither is given and none is `required`."""
    if budget is not None and cents is not None:
        raise UserError("give --budget or --budget-cents, not both")
    if cents is not None:
        return cents
    if budget is None and required:
        raise UserError("every job needs a cap: --budget DOLLARS (e.g. 5.00) or --budget-cents")
    return budget


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, default=str))


def print_table(view: views.TableView) -> None:
    table = Table(title=view.title)
    for column in view.columns:
        table.add_column(column, justify="right" if column in view.right else "left")
    for number, row in enumerate(view.rows, start=1):
        table.add_row(*row, style="bold" if view.total and number == len(view.rows) else None)
    out.print(table)


def exit_for(status: str) -> NoReturn:
    sys.exit(EXIT_OK if status == FINAL_OK else EXIT_JOB_NOT_OK)


@contextmanager
def progress_bar(what: str, total: int) -> Iterator[Callable[[], None]]:
    """A bar on stderr while `what` goes on, only when stderr is a terminal: yields `advance`."""
    if not err.is_terminal:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


NOTIFY = click.option(
    "--notify", metavar="URL",
    help="POST the job's end and its spend crossing 50/80/100 % of its cap or its team's "
         "budget to URL, signed with IMAGEBATCH_WEBHOOK_SECRET (see README, Webhooks).")


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("file"),
        click.option("--team", default="default", show_default=True, type=TEAM_NAME,
                     help="Team the job is charged to (its period budget applies too)."),
        budget_options("The job's cap"),
        click.option("--name", type=JOB_NAME,
                     help="A name for the job (default: the file's name)."),
        click.option("--allow-invalid", is_flag=True,
                     help="Submit even if some lines are invalid: they become failed items."),
        click.option("--no-reuse", is_flag=True,
                     help="Call the upstream even for a seeded request that already "
                          "succeeded (by default its files are copied, at no cost)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
        NOTIFY,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def parse_only(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    wrong = [v for v in chosen if v not in RETRY_CHOICES]
    if wrong or not chosen:
        raise click.BadParameter(f"{', '.join(wrong) or 'nothing'} is not among "
                                 f"{', '.join(RETRY_CHOICES)}")
    return chosen


def print_outcome(settings: Settings, sessions: sessionmaker[Session],
                  summary: dict[str, Any]) -> None:
    """`print_job_outcome` with the job's first failed items read from `sessions`."""
    with sessions() as session:
        errors = item_errors(session, summary["id"], limit=10)
    print_job_outcome(summary, settings.storage_url, errors)


def print_job_outcome(summary: dict[str, Any], storage_url: str,
                      errors: list[dict[str, Any]]) -> None:
    """How a job that `run` or `resume` followed ended, where its files are, and its first
    failed items."""
    job_id, status = summary["id"], summary["status"]
    colour = {"succeeded": "green", "partial": "yellow", "paused": "yellow"}.get(status, "red")
    out.print(Text.assemble(f"job {job_id} ", (status, f"bold {colour}"), ": ")
              + views.spent_of_cap(summary))
    show(f"files: {storage_url.rstrip('/')}/job-{job_id:06d}/")
    if status == "paused":
        show(f"continue it with: imagebatch resume {job_id}")
    for line in views.item_error_lines(errors):
        say(line)
    if errors:
        err.print(f"export the files with: imagebatch export {job_id} --format csv")


def nothing_to_resume(summary: dict[str, Any], as_json: bool) -> NoReturn:
    """`resume` of a job that has ended: why there is nothing to do, and the exit code."""
    job, status = summary["id"], summary["status"]
    hint = "" if status == FINAL_OK else (
        f"; `imagebatch retry {job} --only failed,budget,unknown` renders failed items again")
    say(f"job {job} {status}: nothing to resume{hint}")
    if as_json:
        print_json(summary)
    else:
        show(f"job {job} {status}: {views.spent_of_cap(summary, unknown=False)}")
    exit_for(status)
