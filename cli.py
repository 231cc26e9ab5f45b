"""The `imagebatch` command: parse, call pipeline/ and workers/, print."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from cli_terminal import (
    CONCURRENCY,
    EXIT_USAGE,
    JOB_ID,
    NOTIFY,
    SAMPLE_SIZE,
    SCHEDULE_NAME,
    SHARD_SIZE,
    TEAM_NAME,
    Group,
    UserError,
    budget_options,
    cap_from_options,
    err,
    exit_for,
    finite,
    job_options,
    nothing_to_resume,
    out,
    parse_only,
    print_json,
    print_outcome,
    print_table,
    progress_bar,
    say,
    show,
)
from fake_upstream.command import fake_upstream_command
from pipeline import jobs, submission, views
from pipeline.caps import current_caps
from pipeline.db import (
    check_database,
    database_revisions,
    open_database,
    reading,
    transaction,
    writing,
)
from pipeline.logs import configure_logging
from pipeline.redact import redact_url
from pipeline.report import GROUPS
from pipeline.sample import sample_rendered
from pipeline.settings import Settings, mask_url, unknown_settings
from pipeline.views import money
from pipeline.webhooks import delivery_lines, job_deliveries


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True,
              help="More log lines on stderr (-vv for debug); `worker` shows Celery's banner.")
@click.version_option(package_name="imagebatch")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Turn job files (JSONL, one request per line) or job rows in SQL into images, video and
    audio in storage, through an OpenAI-compatible /v1/images/generations endpoint, never
    spending more than the budget and accounting for every cent in SQL.

    Configuration comes from IMAGEBATCH_* environment variables (API_BASE, API_KEY,
    DATA_DIR, DATABASE_URL, BROKER_URL, STORAGE_URL, CONCURRENCY, ...). With none set,
    everything is embedded: a SQLite file and a media folder in ./imagebatch-data.

    Try it with no key and no servers:  imagebatch demo
    """
    ctx.obj = verbose
    configure_logging(verbose)
    for unknown in unknown_settings():
        logging.getLogger("imagebatch").warning("%s is not an imagebatch setting (ignored)",
                                                unknown)


def load_settings(concurrency: int | None = None, **overrides: Any) -> Settings:
    """The settings from the environment, with what the command line said instead."""
    if concurrency:
        overrides["concurrency"] = concurrency
    settings = Settings.from_env()
    return replace(settings, **overrides) if overrides else settings


def nudge(settings: Settings) -> None:
    """Wake the dispatcher now, or say why not (the job waits in SQL meanwhile)."""
    from workers.tasks import wake_dispatcher

    if (warning := wake_dispatcher(settings)) is not None:
        say(warning)


@main.command()
@click.option("--refresh", is_flag=True, help="Fetch /models now instead of using the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(refresh: bool, as_json: bool) -> None:
    """List the image, video and audio models the API offers, with their caps and prices.

    The answer of GET /models is cached in SQL for IMAGEBATCH_MODELS_TTL seconds."""
    settings = load_settings()
    with open_database(settings) as sessions:
        caps = sorted(current_caps(settings, sessions, refresh=refresh).values(),
                      key=lambda c: c.model)
    if as_json:
        print_json([c.__dict__ for c in caps])
        return
    print_table(views.models_table(f"models at {redact_url(settings.api_base)}", caps))
    for c in caps:
        if c.refused is not None:  # why a model listed "refused" cannot run
            show(c.refused)


@main.command()
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def plan(file: str, as_json: bool) -> None:
    """Validate FILE and show what it would cost, without generating anything.

    Per model: items, images, upstream calls (n split into calls of at most max_n) and the
    maximum cost. Exits 2 when any line is invalid (the first 100 are listed)."""
    settings = load_settings()
    with open_database(settings) as sessions:
        submission.check_job_file(file)
        planned = submission.check_file(file, current_caps(settings, sessions))
    if as_json:
        print_json(views.plan_dict(planned))
    else:
        print_table(views.plan_table(f"plan for {file}", planned))
        for line in submission.error_lines(planned, file):
            say(line)
    if planned.error_count:
        sys.exit(EXIT_USAGE)


def notify_url(url: str | None, settings: Settings) -> str | None:
    """--notify checked (form, addresses, the secret set) before anything is written."""
    from pipeline.webhooks import check_notify_url

    return None if url is None else check_notify_url(url, settings)


def submit_here(settings: Settings, sessions: sessionmaker[Session], file: str,
                spec: submission.JobSpec) -> int:
    """FILE written as a pending job under the submission rule; the invalid lines it let
    through (--allow-invalid) are listed, and a plan that costs more than the cap noted."""
    submission.check_job_file(file)
    planned = submission.submit_spec(sessions, file, current_caps(settings, sessions), spec)
    for line in [*submission.error_lines(planned, file),
                 *views.cap_notes(planned, spec.budget_cents)]:
        say(line)
    assert planned.job_id is not None  # submit_job refuses what it does not write
    return planned.job_id


@main.command()
@job_options
def submit(file: str, team: str, budget: int | None, budget_cents: int | None,
           name: str | None, allow_invalid: bool, no_reuse: bool, as_json: bool,
           notify: str | None) -> None:
    """Submit FILE as a job for `imagebatch worker` processes to render, and return at once.

    FILE is JSONL ('-' for stdin): one request body per line (model, prompt, n, and any
    provider parameter, passed through), with optional custom_id and metadata; OpenAI Batch
    lines {custom_id, method, url, body} work too."""
    from workers.app import connected_app
    from workers.tasks import nudge_dispatcher

    settings = load_settings()
    cap = cap_from_options(budget, budget_cents)
    spec = submission.JobSpec(team, cap, name, allow_invalid, reuse=not no_reuse,
                              notify_url=notify_url(notify, settings))
    app = connected_app(settings)  # a broker out of reach is said before the job is written
    with open_database(settings) as sessions:
        job_id = submit_here(settings, sessions, file, spec)
        nudge_dispatcher(app)
        summary = jobs.summary_of(sessions, job_id)
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
@click.option("--sample", type=SAMPLE_SIZE, metavar="K",
              help="Render K lines drawn at random first (the same K for the same file), "
                   "print what they cost and the projected total (projected_cents in "
                   "--json), then ask whether to go on; with no terminal, or answered no, "
                   "the job is left paused and `imagebatch resume JOB` renders the rest.")
@click.option("--yes", "-y", is_flag=True, help="With --sample: go on without asking.")
def run(file: str, team: str, budget: int | None, budget_cents: int | None, name: str | None,
        allow_invalid: bool, no_reuse: bool, as_json: bool, notify: str | None,
        concurrency: int | None, new: bool, sample: int | None, yes: bool) -> None:
    """Submit FILE and render it in this process until the job ends, with progress.

    Ctrl-C pauses the job: nothing new is sent, in-flight renders finish and are settled,
    and `imagebatch resume JOB` continues it later. A second Ctrl-C leaves at once (exit
    130; renders in flight are taken back by the sweeper once their leases run out).

    A file whose earlier job is unfinished (paused, or its process killed) is refused with
    the command that continues it; --new starts another job anyway.

    Exit code 0 when every item succeeded, 1 when the job ended partial, failed or cancelled
    or was paused, 2 for usage errors, invalid input and an unfinished earlier job."""
    if yes and sample is None:
        raise UserError("--yes: only with --sample K")
    settings = load_settings(concurrency)
    cap = cap_from_options(budget, budget_cents)
    spec = submission.JobSpec(team, cap, name, allow_invalid, sample, not no_reuse,
                              notify_url(notify, settings))
    summary = run_job_here(settings, file, spec, quiet=as_json, new=new, yes=yes)
    if as_json:
        print_json(summary)
    exit_for(summary["status"])


def run_job_here(settings: Settings, file: str, spec: submission.JobSpec, *, quiet: bool,
                 new: bool = True, yes: bool = False) -> dict[str, Any]:
    """Submit FILE and render it here; unless `new`, refuse a file whose job is unfinished.
    With `sample`, the sample first, then the rest when the user says so."""
    from workers.local import after_sample, run_here

    with open_database(settings) as sessions:
        summary = run_here(settings, sessions, file, lambda: submit_here(
            settings, sessions, file, spec), err, say, quiet=quiet, new=new)
        with sessions() as session:
            sampled = spec.sample is not None and sample_rendered(session, summary["id"])
        if sampled:
            summary = after_sample(settings, sessions, summary, lambda rest: yes or (
                sys.stdin.isatty() and click.confirm(f"render the other {rest:,} lines?",
                                                     default=False, err=True)),
                err, say, quiet=quiet)
        if not quiet:
            print_outcome(settings, sessions, summary)
    return summary


@main.command()
@click.argument("job", type=JOB_ID, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(job: int | None, as_json: bool) -> None:
    """Show one job (with its failed items), or the latest jobs."""
    with reading(load_settings()) as session:
        if job is not None:
            summary = jobs.status_document(session, job)
            if told := job_deliveries(session, job):
                summary["webhooks"] = told
        else:
            latest = [jobs.job_summary(session, j.id) for j in jobs.list_jobs(session)]
    if job is not None and as_json:
        print_json(summary)
    elif job is not None:
        for line in [*views.job_lines(summary), *delivery_lines(summary.get("webhooks", []))]:
            show(line)
    elif as_json:
        print_json({"jobs": latest})
    else:
        print_table(views.jobs_table(latest))


@main.command()
@click.argument("job", type=JOB_ID)
def cancel(job: int) -> None:
    """Cancel JOB: nothing new is sent; in-flight renders finish and are settled.

    The job is cancelled first (renders check it before they call), then its queued renders
    and pending items, in chunks: on a job of any size nothing new is called within a
    second. Interrupted, run it again. `imagebatch resume JOB` renders the cancelled items
    after all."""
    with open_database(load_settings()) as sessions:
        if not jobs.cancel_in_chunks(sessions, job):
            out.print(f"job {job} had already ended ({jobs.summary_of(sessions, job)['status']})")
            return
        with sessions() as session:
            in_flight = jobs.renders_running(session, job)
    out.print(f"job {job} cancelled" + (
        f": {in_flight} render(s) in flight finish and are settled" if in_flight else ""))


@main.command()
@click.argument("job", type=JOB_ID)
@click.option("--only", default="failed", show_default=True, callback=parse_only,
              help="Which items go again, comma-separated: failed (every failed item), "
                   "cancelled, budget (failed for budget), unknown (a last attempt whose "
                   "outcome is unknown).")
@budget_options("Raise (or set) the job's cap first,")
def retry(job: int, only: tuple[str, ...], budget: int | None, budget_cents: int | None
          ) -> None:
    """Render JOB's failed items again (each attempt reserves anew), once the job has ended.

    `imagebatch resume JOB` then renders them in this process; or `imagebatch worker`
    processes do."""
    settings = load_settings()
    cap = cap_from_options(budget, budget_cents, required=False)
    with open_database(settings) as sessions:
        with transaction(sessions) as session:
            count = jobs.retry_job(session, job, cap, only)
        if not count:  # the job was left exactly as it ended (its cap too)
            state = jobs.summary_of(sessions, job)["status"]
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
    with open_database(load_settings()) as sessions:
        with transaction(sessions) as session:
            changed = jobs.pause_job(session, job)
        with sessions() as session:
            state = jobs.job_state(session, job).status
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
@budget_options("Raise (or set) the job's cap first,")
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
    from workers.local import resume_here

    settings = load_settings(concurrency)
    cap = cap_from_options(budget, budget_cents, required=False)
    with open_database(settings) as sessions:
        if detach:
            summary = None
            if jobs.resume_job(sessions, job, budget_cents=cap, in_process=False).resumed:
                nudge(settings)
                summary = jobs.summary_of(sessions, job)
        else:
            summary = resume_here(settings, sessions, job, cap, err, say, quiet=as_json)
        if summary is None:
            nothing_to_resume(jobs.summary_of(sessions, job), as_json)
        if not (as_json or detach):
            print_outcome(settings, sessions, summary)
    if as_json:
        print_json(summary)
    if not detach:
        exit_for(summary["status"])
    if not as_json:
        out.print(f"job {job} is {summary['status']} again: `imagebatch worker` processes "
                  f"continue it (follow it with `imagebatch status {job}`)", highlight=False)


@main.command()
@click.argument("job", type=JOB_ID)
@click.option("--format", "fmt", default="jsonl", show_default=True,
              type=click.Choice(["jsonl", "csv", "hf", "webdataset", "parquet"]),
              help="Rows (jsonl, csv), a Hugging Face imagefolder (hf), tar shards "
                   "(webdataset) or one Parquet table.")
@click.option("-o", "--output", metavar="DEST",
              help="A file, a folder or s3://bucket/prefix/ (default: standard output for "
                   "jsonl and csv, ./job-JOB-FORMAT otherwise).")
@click.option("--shard-size", type=SHARD_SIZE, default=1000, show_default=True,
              help="webdataset: samples per tar shard.")
@click.option("--embed", is_flag=True, help="parquet: the files' bytes in a `content` column.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary.")
def export(job: int, fmt: str, output: str | None, shard_size: int, embed: bool,
           as_json: bool) -> None:
    """Export the stored files of JOB: rows (where each file is, what it is, what it cost)
    or a dataset that datasets, webdataset or pyarrow loads as it is."""
    from pipeline.datasets import DATASET_FORMATS, file_count
    from pipeline.export import export_job, export_rows, write_export
    from pipeline.storage import open_store

    store = open_store(load_settings().storage_url)
    with reading(load_settings()) as session:
        jobs.job_summary(session, job)  # a clear error for a job that does not exist
        if fmt not in DATASET_FORMATS and output is None and not embed:
            write_export(export_rows(session, job, store.uri), sys.stdout, fmt)
            return
        with progress_bar("exporting", file_count(session, job)) as advance:
            summary = export_job(session, job, store, fmt, output or f"job-{job}-{fmt}",
                                 shard_size=shard_size, embed=embed, on_file=advance).as_dict()
    if as_json:
        print_json(summary)
        return
    skipped = f" ({summary['skipped']} audio/video skipped)" if summary["skipped"] else ""
    err.print(f"wrote {summary['files']} files{skipped} to {summary['destination']}",
              highlight=False)


@main.group()
def team() -> None:
    """Team period budgets: every render reserves on its job's cap and its team's period."""


@team.command("set")
@click.argument("name", type=TEAM_NAME)
@budget_options("The period's limit (e.g. 500.00)")
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
    with writing(load_settings()) as session:
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

    with reading(load_settings()) as session:
        states = list_teams(session)
    if as_json:
        print_json([s.as_dict() for s in states])
    else:
        print_table(views.teams_table(states))


@team.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def team_show(name: str, as_json: bool) -> None:
    """Team NAME's current period: limit, spent, reserved, unknown, left, start and end."""
    from pipeline.teams import team_state

    with reading(load_settings()) as session:
        try:
            state = team_state(session, name)
        except LookupError as exc:
            raise UserError(str(exc.args[0])) from None
    if as_json:
        print_json(state.as_dict())
        return
    for line in views.team_lines(state):
        out.print(line)


@main.command()
@click.option("--team", help="Only this team.")
@click.option("--job", type=JOB_ID, help="Only this job.")
@click.option("--model", help="Only this model.")
@click.option("--since", help="From this UTC date or time (inclusive), e.g. 2026-11-01.")
@click.option("--until", help="Up to this UTC date or time (exclusive).")
@click.option("--by", type=click.Choice(GROUPS), help="One row per team, model, job, day or month.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
def report(team: str | None, job: int | None, model: str | None, since: str | None,
           until: str | None, by: str | None, fmt: str, as_json: bool) -> None:
    """Costs from the ledger: upstream calls, images, charged, unknown, released, the
    average cost per image (spent / images), and the images reused (seeded requests that
    had succeeded before: copied, not paid) with what they saved. Totals equal the ledger
    rows they cover."""
    from pipeline.report import ReportFilter, ledger_report, parse_moment, total_of

    filters = ReportFilter(team=team, job=job, model=model, since=parse_moment(since, "--since"),
                           until=parse_moment(until, "--until"))
    with reading(load_settings()) as session:
        rows = [*ledger_report(session, filters, by)]
    rows.append(total_of(rows))
    fmt = "json" if as_json else fmt
    if fmt == "json":
        print_json({"by": by, "rows": [r.as_dict() for r in rows[:-1]],
                    "total": rows[-1].as_dict()})
    elif fmt == "csv":
        views.write_csv([row.as_dict() for row in rows], sys.stdout)
    else:
        print_table(views.report_table(by, rows))


@main.group()
def schedule() -> None:
    """Scheduled renders, fired by `imagebatch beat`."""


@schedule.command("add")
@click.argument("name", type=SCHEDULE_NAME)
@click.argument("file")
@click.option("--cron", required=True, help="When to fire, e.g. '0 3 * * *'.")
@click.option("--team", default="default", show_default=True, type=TEAM_NAME)
@budget_options("Each job's cap")
@click.option("--timezone", default="UTC", show_default=True,
              help="The zone the cron expression is read in, e.g. Europe/Berlin.")
@click.option("--allow-invalid", is_flag=True,
              help="Keep the schedule even if some lines are invalid: each job fails them.")
@NOTIFY
def schedule_add(name: str, file: str, cron: str, team: str, budget: int | None,
                 budget_cents: int | None, timezone: str, allow_invalid: bool,
                 notify: str | None) -> None:
    """Fire FILE as a job on the cron schedule. FILE is checked as `submit` checks it (every
    line against the models' caps). Its content is stored with the schedule, so moving or
    editing the file later changes nothing."""
    from pipeline.models import utcnow
    from pipeline.schedules import add_schedule, next_firing

    cap = cap_from_options(budget, budget_cents)
    text, source = submission.read_job_text(file)
    settings = load_settings()
    notify = notify_url(notify, settings)  # each firing's job gets it
    with open_database(settings) as sessions:
        caps = current_caps(settings, sessions)  # network: before the transaction
        with transaction(sessions) as session:
            checked = add_schedule(session, name=name, cron=cron, job_text=text, team=team,
                                   budget_cents=cap, caps=caps, allow_invalid=allow_invalid,
                                   timezone=timezone, source_name=source, where=file,
                                   notify_url=notify)
    for line in submission.error_lines(checked, file):
        say(line)
    upcoming = next_firing(cron, timezone, utcnow())
    out.print(f"schedule {name}: next firing {upcoming:%Y-%m-%d %H:%M} UTC "
              "(it fires while `imagebatch beat` runs)")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True)
def schedule_list(as_json: bool) -> None:
    """Every schedule with its next firing and its last job."""
    from pipeline.schedules import list_schedules

    with reading(load_settings()) as session:
        schedules = list_schedules(session)
    if as_json:
        print_json([s.__dict__ for s in schedules])
    else:
        print_table(views.schedules_table(schedules))


@schedule.command("remove")
@click.argument("name")
def schedule_remove(name: str) -> None:
    """Delete schedule NAME (its jobs stay)."""
    from pipeline.schedules import remove_schedule

    with writing(load_settings()) as session:
        remove_schedule(session, name)
    out.print(f"schedule {name} removed")


@schedule.command("run")
@click.argument("name")
def schedule_run(name: str) -> None:
    """Create schedule NAME's job now (the workers render it)."""
    from pipeline.schedules import run_now

    settings = load_settings()
    with open_database(settings) as sessions:
        with transaction(sessions) as session:
            job_id = run_now(session, name)
        nudge(settings)
    out.print(f"schedule {name}: job {job_id} submitted")


@main.command()
@click.option("--concurrency", type=CONCURRENCY,
              help="Upstream calls in flight in this worker (default "
                   "IMAGEBATCH_CONCURRENCY).")
@click.option("--sweep/--no-sweep", default=True, show_default=True,
              help="Also plan pending jobs, send queued renders to the broker as renders "
                   "start, and bring back stuck renders (needed where no `imagebatch beat` "
                   "runs; harmless beside one).")
@click.pass_obj
def worker(verbose: int, concurrency: int | None, sweep: bool) -> None:
    """Render queued jobs until stopped (Ctrl-C or SIGTERM finishes what it started).

    It starts with one line naming its broker, database, storage and concurrency; -v also
    shows Celery's banner."""
    from workers.serve import serve_worker

    settings = load_settings(concurrency)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    serve_worker(settings, sweep=sweep, loglevel=level, banner=verbose > 0, say=say)


@main.command()
@click.option("--interval", type=click.FloatRange(0.1, 86_400), default=2.0, show_default=True,
              callback=lambda _ctx, _param, value: finite(value, "--interval"),
              help="Seconds between two looks at pending jobs, schedules and stuck renders.")
def beat(interval: float) -> None:
    """Pick up jobs inserted with SQL, fire schedules, and sweep stuck renders, until stopped."""
    from workers.serve import serve_beat

    serve_beat(load_settings(), interval=interval, say=say)


@main.command()
def dispatch() -> None:
    """Plan pending jobs now (those inserted with SQL included) and enqueue their renders."""
    from workers.app import connected_app
    from workers.embedded import tick
    from workers.tasks import shutdown_services

    settings = load_settings()
    check_database(settings)
    count = tick(connected_app(settings))
    shutdown_services()
    out.print(f"enqueued {count} render(s)")


@main.group()
def db() -> None:
    """The database schema (Alembic migrations)."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema to this version's."""
    settings = load_settings()
    current, _ = database_revisions(settings, upgrade=True)
    out.print(f"schema at revision {current} ({mask_url(settings.database_url)})")


@db.command("current")
def db_current() -> None:
    """Show the schema's revision and the one this version needs."""
    current, head = database_revisions(load_settings())
    out.print(f"database: {current or 'empty'}; this imagebatch: {head}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on; any but loopback needs IMAGEBATCH_SERVE_TOKEN.")
@click.option("--port", type=click.IntRange(1, 65_535), default=8080, show_default=True)
def serve(host: str, port: int) -> None:
    """A read-only web page of the jobs, their files and the spend, until stopped."""
    from web.app import serve as serve_web

    serve_web(load_settings(), host, port)


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
        summary = run_job_here(settings, str(example), submission.JobSpec("demo", 200, "demo"),
                               quiet=False)
        billed = fake.stats()["billed_cents"]
    out.print(f"the fake upstream billed {money(billed)}; the ledger says "
              f"{money(summary['spent_cents'])}")
    exit_for(summary["status"])


main.add_command(fake_upstream_command)

if __name__ == "__main__":
    main()
