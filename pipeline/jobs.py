"""Jobs and their items: creating, planning into renders, closing, cancelling, retrying."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, and_, func, insert, or_, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import ledger, queries, webhooks
from pipeline.caps import Caps
from pipeline.db import retry_on_disconnect, transaction
from pipeline.models import (
    TERMINAL_JOB,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    Render,
    RenderStatus,
    utcnow,
)
from pipeline.plan import (
    BadJSON,
    JobLine,
    LineError,
    PlannedItem,
    format_dollars,
    line_from_object,
    load_json,
    plan_lines,
)
from pipeline.teams import LimitBelowSpent

T = TypeVar("T")


class JobNotFound(LookupError):
    pass


def create_job(
    session: Session,
    *,
    team: str,
    budget_cents: int,
    entries: Iterable[JobLine | LineError],
    name: str | None = None,
    source: str = "cli",
    reuse: bool = True,
    notify_url: str | None = None,
) -> int:
    """Write a pending job and its items; the dispatcher plans it. Invalid entries become
    failed items carrying their reason (callers refuse invalid files unless told not to).
    `source` says who made it: "cli", "schedule" (a program writing SQL leaves "sql");
    `notify_url`, where its end and spend crossings are told (pipeline/webhooks.py)."""
    job = Job(team=team, name=name, budget_cents=budget_cents, status=JobStatus.PENDING,
              source=source, reuse=reuse, notify_url=notify_url)
    session.add(job)
    session.flush()
    rows = [_item_row(job.id, entry) for entry in entries]
    if rows:
        session.execute(insert(JobItem), rows)
    return job.id


def _item_row(job_id: int, entry: JobLine | LineError) -> dict[str, Any]:
    if isinstance(entry, LineError):
        return {"job_id": job_id, "line": entry.line, "custom_id": entry.custom_id,
                "body": entry.raw.replace("\x00", "\ufffd"), "meta": None,
                "status": ItemStatus.FAILED,
                "error": entry.reason}
    return {"job_id": job_id, "line": entry.line, "custom_id": entry.custom_id,
            "body": json.dumps(entry.body, ensure_ascii=False),
            "meta": None if entry.metadata is None else json.dumps(entry.metadata),
            "status": ItemStatus.PENDING}


# --- planning ------------------------------------------------------------------------------

# Items planned per transaction: a job of any size has its first renders queued within a
# chunk's time, and SQLite's one write lock is never held for a whole job.
PLAN_CHUNK = 2000


def jobs_to_plan(session: Session, limit: int = 20) -> list[int]:
    """Jobs with items to plan: pending ones, and running or paused ones planned part way."""
    return list(session.scalars(
        select(Job.id).where(or_(
            Job.status == JobStatus.PENDING,
            and_(Job.plan_cursor.is_not(None),
                 Job.status.in_([JobStatus.RUNNING, JobStatus.PAUSED])),
        )).order_by(Job.id).limit(limit)
    ))


def _to_plan(db: Connection, job_id: int) -> queries.PlanState | None:
    """The job's planning state (status, plan_cursor, source) when it has items to plan and
    this transaction may plan them (PostgreSQL: no other dispatcher holds the job's advisory
    lock); else None."""
    if not queries.try_plan_lock(db, job_id):
        return None  # another dispatcher is planning it
    state = queries.plan_state(db, job_id)
    if state is None or (state.status != JobStatus.PENDING and (
            state.plan_cursor is None
            or state.status not in (JobStatus.RUNNING, JobStatus.PAUSED))):
        return None
    return state


def plan_job(session: Session, job_id: int, caps: Mapping[str, Caps],
             chunk: int = PLAN_CHUNK) -> int:
    """Plan the job's next `chunk` pending items: validate them, write their renders (they
    wait in SQL for the broker's window), fail the invalid ones with their reason. Returns
    how many items it took; 0 when there is nothing (left) to plan. The job runs from its
    first chunk on; it cannot close until its last chunk is planned."""
    db = session.connection()
    state = _to_plan(db, job_id)
    if state is None:
        return 0
    starting = state.status == JobStatus.PENDING
    if starting and state.source != "cli":  # the CLI refused repeated ids when it submitted
        _fail_repeated_ids(session, job_id)
    rows = queries.items_after(db, job_id, cursor=0 if starting else state.plan_cursor or 0,
                               chunk=chunk)
    plan = plan_lines([_line_of(row) for row in rows], caps)
    ids = {row.line: row.id for row in rows}
    now = utcnow()
    changes = [queries.ItemChange(ids[e.line], ItemStatus.FAILED.value, e.reason)
               for e in plan.errors]
    renders: list[tuple[Any, ...]] = []
    for planned in plan.items:
        item_id = ids[planned.line.line]
        changes.append(queries.ItemChange(item_id, ItemStatus.RUNNING.value, None))
        renders.extend(render_rows(job_id, item_id, planned))
    queries.items_planned(db, changes)
    queries.insert_renders(db, renders)
    more = len(rows) == chunk
    open_renders = queries.job_planned(
        db, job_id, status=JobStatus.RUNNING.value if starting else state.status,
        plan_cursor=rows[-1].line if more else None, added=len(renders), now=now)
    if starting:
        # A job planned again (`retry`) may have renders of its own queued: count them all.
        queries.set_job(db, job_id, finished_at=None)
        open_renders = recount_open_renders(session, job_id)
    if starting:
        recount_items(session, job_id)
    elif plan.errors:
        queries.add_failed_items(db, job_id, len(plan.errors))
    if not more:
        close_job_if_done(session, job_id, open_renders)
    return len(rows)


def fail_next_item(session: Session, job_id: int, reason: str) -> int:
    """The job's next item to plan fails with `reason`: planning it alone failed (see
    dispatch.plan_chunk). Returns 1, or 0 when no item is left to plan."""
    db = session.connection()
    state = _to_plan(db, job_id)
    if state is None:
        return 0
    starting = state.status == JobStatus.PENDING
    rows = queries.items_after(db, job_id, cursor=0 if starting else state.plan_cursor or 0,
                               chunk=1)
    if not rows:
        return 0
    queries.item_planned(db, rows[0].id, ItemStatus.FAILED.value, reason)
    if not starting:  # a job that starts planning counts its items then
        queries.add_failed_items(db, job_id, 1)
    return 1


def render_rows(job_id: int, item_id: int, planned: PlannedItem) -> list[tuple[Any, ...]]:
    """The item's renders as rows (queries.RENDER_COLUMNS), queued and waiting in SQL."""
    return [(job_id, item_id, spec.index, planned.line.model, spec.n, spec.seed,
             planned.price_per_image_cents, RenderStatus.QUEUED.value, None)
            for spec in planned.renders]


# Submission writes its renders with it too.
insert_renders = queries.insert_renders


def _fail_repeated_ids(session: Session, job_id: int) -> None:
    """A job written by another program's INSERTs: a custom_id used twice keeps its first
    line; the others fail, as the CLI would have refused them."""
    db = session.connection()
    for cid, first in queries.repeated_custom_ids(db, job_id):
        queries.fail_repeats(db, job_id, cid, first_line=first,
                             reason=f"custom_id {cid!r} repeats line {first}")


def _line_of(item: queries.ItemToPlan) -> JobLine | LineError:
    """An item row (ours or another program's INSERT) back as a job line, checked."""
    # Checked as a job file's line is (plan.load_json): another program's row may hold what
    # a file could, and it must fail this item, never the chunk (and every job after it).
    try:
        body = load_json(item.body) if isinstance(item.body, str) else None
    except BadJSON as exc:
        return LineError(item.line, f"body: {exc}", item.custom_id)
    try:
        metadata = load_json(item.meta) if item.meta else None
    except BadJSON as exc:
        return LineError(item.line, f"metadata: {exc}", item.custom_id)
    if not isinstance(body, dict):
        return LineError(item.line, "body must be a JSON object", item.custom_id)
    value = {**body, "custom_id": item.custom_id, "metadata": metadata}
    if value["custom_id"] is None:
        value.pop("custom_id")
    return line_from_object(item.line, value)


# --- closing -------------------------------------------------------------------------------


# test_jobs EXPLAINs the statement the pipeline sends.


def recount_open_renders(session: Session, job_id: int) -> int:
    """Count the job's open renders anew (after planning, cancelling, or to repair).

    The job's row is locked by a statement of its own first. A recount that had to wait for
    the lock inside its UPDATE would still count with the snapshot it started with, so the
    renders that ended (and took themselves off the count) meanwhile would be counted again,
    and the job would close only at the next sweep's recount."""
    db = session.connection()
    queries.lock_job(db, job_id)
    return queries.recount_open(db, job_id)


def close_item(session: Session, item_id: int) -> str | None:
    """An item's final status once none of its renders is open; None while one is (or when
    it had its final status already). The caller counts it on the job (ledger.item_ended)."""
    return queries.close_item(session.connection(), item_id)


def recount_items(session: Session, job_id: int) -> None:
    """Count the job's items by status and its files anew, onto the counters `status` shows
    (after planning starts, cancelling, retrying, resuming: whole-job changes). Reads the
    whole job, so never per render."""
    db = session.connection()
    counts = queries.items_by_status(db, job_id)
    queries.set_shown(db, job_id, total=sum(counts.values()),
                      succeeded=counts.get(ItemStatus.SUCCEEDED.value, 0),
                      failed=counts.get(ItemStatus.FAILED.value, 0),
                      cancelled=counts.get(ItemStatus.CANCELLED.value, 0))


def _close_drained(session: Session, job_id: int) -> None:
    close_job_if_done(session, job_id, 0)


ledger.when_drained(_close_drained)


def close_job_if_done(session: Session, job_id: int, open_renders: int) -> bool:
    """Close the job when none of its renders is open. `open_renders` must come from a
    statement that holds the job's row lock in this transaction (ledger.Moves or
    recount_open_renders)."""
    if open_renders > 0:
        return False
    session.flush()  # what this session changed of the job is read below
    db = session.connection()
    state = queries.job_state(db, job_id)
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    if (state.finished_at is not None or state.plan_cursor is not None
            or state.status in (JobStatus.PENDING, JobStatus.SUBMITTING)):
        return False
    if state.sample_lines is not None and state.status in (JobStatus.RUNNING, JobStatus.PAUSED):
        # A sample rendered: the job waits, paused, for a person to see what it cost; the
        # rest of its lines are pending items that `resume` plans.
        queries.set_job(db, job_id, status=JobStatus.PAUSED.value)
        recount_items(session, job_id)
        return False
    counts = item_counts(session, job_id)
    status = (state.status if state.status == JobStatus.CANCELLED
              else final_status(counts).value)
    queries.set_job(db, job_id, status=status, finished_at=utcnow())
    # Exact at the end whatever happened on the way (one read of the job, once).
    recount_items(session, job_id)
    _reload_job(session, job_id)
    # Told in this transaction: the delivery exists exactly when the job has ended.
    webhooks.tell_job_ended(session, job_id, status, lambda: status_document(session, job_id))
    return True


def _reload_job(session: Session, job_id: int) -> None:
    """The job's row was written with Core: the copy this session holds, if any, is read
    again when next used."""
    loaded = session.identity_map.get(session.identity_key(Job, job_id))
    if loaded is not None:
        session.expire(loaded)


def final_status(counts: Mapping[str, int]) -> JobStatus:
    total = sum(counts.values())
    succeeded = counts.get(ItemStatus.SUCCEEDED, 0)
    if total and succeeded == total:
        return JobStatus.SUCCEEDED
    if succeeded == 0:
        return JobStatus.FAILED
    return JobStatus.PARTIAL


def item_counts(session: Session, job_id: int) -> Counter[str]:
    rows = session.execute(
        select(JobItem.status, func.count()).where(JobItem.job_id == job_id)
        .group_by(JobItem.status)
    ).all()
    return Counter({status: count for status, count in rows})


# --- pause, resume, cancel and retry -------------------------------------------------------

# Rows per transaction when a job is cancelled or resumed: SQLite's one write lock is held for
# a chunk, never for a whole job, and renders settle between chunks.
CHUNK = 20_000
RETRY_CHOICES = queries.RETRY_CHOICES


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def set_job_cap(session: Session, job_id: int, cap_cents: int) -> None:
    """Set the job's cap, in one conditional UPDATE: refused (LimitBelowSpent, nothing
    changed once the caller rolls back) below what the job has already spent and reserved,
    since spent + reserved <= cap must hold at every instant."""
    db = session.connection()
    if queries.set_cap(db, job_id, cap_cents):
        return
    held = queries.spending(db, job_id)
    if held is None:
        raise JobNotFound(f"no job {job_id}")
    raise LimitBelowSpent(
        f"job {job_id}: a cap of {format_dollars(cap_cents)} is below what it has already "
        f"spent ({format_dollars(held.spent_cents)}, {format_dollars(held.reserved_cents)} "
        "more reserved by renders in flight): set at least "
        f"{format_dollars(held.spent_cents + held.reserved_cents)}")


def lock_job_state(session: Session, job_id: int) -> queries.JobState:
    """The job's status, its row locked for the rest of the transaction, and no chunk of its
    planning under way (PostgreSQL: planning reads the status when its chunk starts and
    writes it back when it ends, under the advisory lock taken here too; SQLite's BEGIN
    IMMEDIATE already excludes it). Then a status set here is the one planning sees next."""
    db = session.connection()
    queries.wait_plan_lock(db, job_id)
    queries.lock_job(db, job_id)
    state = queries.job_state(db, job_id)
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    return state


# The job's error while it is paused because storage refused a paid result (render.py).
STORAGE_FAILING = "storage: "


def pause_job(session: Session, job_id: int, reason: str | None = None) -> bool:
    """Send nothing new: the job's renders go back to waiting in SQL when they are delivered
    or about to call (render.py), renders in flight finish and settle. `reason` is kept as
    the job's error while it is paused (None: a person paused it). False when the job was
    neither running nor pending (paused already, ended, or still being submitted)."""
    state = lock_job_state(session, job_id)
    db = session.connection()
    if state.status == JobStatus.PAUSED and reason is None:
        # Paused by a person now, whatever paused it before: nothing unpauses it but resume.
        queries.set_job(db, job_id, error=None)
    if state.status not in (JobStatus.RUNNING, JobStatus.PENDING):
        return False
    queries.set_job(db, job_id, status=JobStatus.PAUSED.value, error=reason)
    return True


def unpause_job(session: Session, job_id: int, cause: str) -> bool:
    """Run again a job paused for `cause` (the start of its error) once that cause is gone;
    a job paused by a person, or for another cause, stays paused."""
    return queries.unpause(session.connection(), job_id, cause)


def renders_running(session: Session, job_id: int) -> int:
    """The job's renders holding a lease (in flight, or waiting to retry), from the index."""
    return queries.renders_running(session.connection(), job_id)


def unfinished_job_of(session: Session, digest: str) -> Job | None:
    """The latest job submitted from a file with this sha256 that has not ended (a job still
    being submitted is not one: there is nothing to continue)."""
    return session.scalars(
        select(Job).where(Job.source_digest == digest,
                          Job.status.not_in([*TERMINAL_JOB, JobStatus.SUBMITTING]))
        .order_by(Job.id.desc()).limit(1)
    ).first()


def begin_cancel(session: Session, job_id: int) -> bool:
    """The first, short transaction of a cancel: the job is cancelled (every render reads its
    job's status before it starts and again, committing its send, just before it calls: from
    this commit on nothing new is sent), nothing more of it is planned, and it is held open
    (one more open render) until `finish_cancel` recounts it. False when it had ended (a
    cancel that was interrupted is taken up again)."""
    state = lock_job_state(session, job_id)
    if state.status in TERMINAL_JOB and not (
            state.status == JobStatus.CANCELLED and state.finished_at is None):
        return False
    db = session.connection()
    queries.set_job(db, job_id, status=JobStatus.CANCELLED.value, plan_cursor=None)
    queries.keep_open(db, job_id)
    return True


def finish_cancel(transactions: Callable[[], AbstractContextManager[Session]], job_id: int,
                  chunk: int = CHUNK) -> None:
    """The rest of a cancel, each step a transaction of `transactions()`: queued renders
    cancelled, `chunk` at a time; pending items cancelled and items whose renders have all
    ended settled, by ranges of `chunk` lines; then the job recounted (its open renders and
    the counters `status` shows) and closed if nothing of it is in flight (else its last
    render closes it)."""
    while _each(transactions, lambda db: queries.cancel_queued_renders(
            db, job_id, chunk=chunk)) == chunk:
        pass
    for lo, hi in _line_ranges(transactions, job_id, chunk):
        _each(transactions, lambda db, lo=lo, hi=hi: (
            queries.cancel_pending_items(db, job_id, lo, hi),
            queries.close_running_items(db, job_id, lo, hi)))
    with transactions() as session:
        _recount_and_close(session, job_id)


def _each(transactions: Callable[[], AbstractContextManager[Session]],
          step: Callable[[Connection], T]) -> T:
    """`step` in a transaction of `transactions()`, run again on a deadlock (PostgreSQL) when
    each is a transaction of its own: a chunk locks its rows in index order while a
    committer's group locks the renders and items it starts or ends in arrival order, and
    PostgreSQL rolls one back. Ending or cancelling a job's rest must not stop there."""
    def once() -> T:
        with transactions() as session:
            return step(session.connection())
    return retry_on_disconnect(once)


def fail_queued_renders(transactions: Callable[[], AbstractContextManager[Session]],
                        job_id: int, reason: str, chunk: int = CHUNK) -> int:
    """Every queued render of the job failed with `reason`, `chunk` a transaction of
    `transactions()`; then its items closed by ranges of lines and the job recounted and
    closed if nothing of it is in flight (else its last render closes it). Renders in flight
    end as usual. Returns how many renders it failed."""
    failed = 0
    while True:
        done = _each(transactions, lambda db: queries.fail_queued_renders(
            db, job_id, reason, chunk=chunk))
        failed += done
        if done < chunk:
            break
    for lo, hi in _line_ranges(transactions, job_id, chunk):
        _each(transactions, lambda db, lo=lo, hi=hi: queries.close_running_items(
            db, job_id, lo, hi))
    with transactions() as session:
        _recount_and_close(session, job_id)
    return failed


def _recount_and_close(session: Session, job_id: int) -> None:
    """After a whole-job change: open renders and the counters `status` shows counted anew
    (under the job's row lock, taken first), and the job closed if nothing of it is open."""
    open_renders = recount_open_renders(session, job_id)
    if not close_job_if_done(session, job_id, open_renders):  # closing recounts items itself
        recount_items(session, job_id)


def _line_ranges(transactions: Callable[[], AbstractContextManager[Session]], job_id: int,
                 chunk: int) -> list[tuple[int, int]]:
    with transactions() as session:
        lo, hi = queries.line_range(session.connection(), job_id)
    if lo is None or hi is None:
        return []
    return [(start, min(start + chunk, hi + 1)) for start in range(lo, hi + 1, chunk)]


def cancel_in_chunks(sessions: sessionmaker[Session], job_id: int, chunk: int = CHUNK) -> bool:
    """Cancel a job of any size: nothing new is sent, queued renders and pending items are
    cancelled, in-flight renders finish and settle as usual (a reservation is only ever held
    by an attempt in flight). The status goes first, in a short transaction of its own, then
    the rest `chunk` rows a transaction. Interrupted, it is taken up again by running it
    again."""
    with transaction(sessions) as session:
        if not begin_cancel(session, job_id):
            return False
    finish_cancel(lambda: transaction(sessions), job_id, chunk)
    return True


@dataclass
class Resumed:
    """What `resume_job` found and did."""

    before: str  # the job's status when asked
    status: str  # its status now
    renders: int = 0  # cancelled renders queued again
    items: int = 0  # cancelled items opened again

    @property
    def resumed(self) -> bool:
        return self.before not in TERMINAL_JOB or self.before == JobStatus.CANCELLED


def resume_job(sessions: sessionmaker[Session], job_id: int, *, budget_cents: int | None = None,
               in_process: bool = True, chunk: int = CHUNK) -> Resumed:
    """Continue a paused job, one whose process died (still running), or a cancelled one.

    Items that ended are never rendered again; a render running under a live lease is left
    to it (the sweeper revives it once the lease runs out). Cancelled renders of unfinished
    items are queued again with a fresh attempt budget (as `retry`), cancelled items opened
    again (those never planned are planned), and, `in_process`, renders whose broker message
    was sent are put back in the SQL queue (the message died with its process's in-memory
    broker). Meanwhile a paused or cancelled job is held paused and open, so nothing sends,
    plans or closes it half restored. A job that ended otherwise (succeeded, partial,
    failed) is left as it is: `retry_job` renders failed items again."""
    with transaction(sessions) as session:
        state = lock_job_state(session, job_id)
        before = state.status
        if before == JobStatus.SUBMITTING:
            raise ValueError(f"job {job_id} is still being submitted (or its submission was "
                             "interrupted): there is nothing to continue yet")
        if before in TERMINAL_JOB and before != JobStatus.CANCELLED:
            return Resumed(before, before)
        db = session.connection()
        if budget_cents is not None:
            set_job_cap(session, job_id, budget_cents)
        held = before in (JobStatus.PAUSED, JobStatus.CANCELLED)
        if held:
            # A sample's job (`run --sample`) goes on as a whole job from here.
            queries.set_job(db, job_id, status=JobStatus.PAUSED.value, finished_at=None,
                            sample_lines=None)
            queries.keep_open(db, job_id)
    done = Resumed(before, before)
    done.renders = _repeat(sessions, queries.restore_cancelled_renders, job_id, chunk)
    if in_process:
        _repeat(sessions, queries.forget_sent_renders, job_id, chunk)
    for lo, hi in _line_ranges(lambda: transaction(sessions), job_id, chunk):
        with transaction(sessions) as session:
            done.items += queries.reopen_cancelled_items(session.connection(), job_id, lo, hi)
    with transaction(sessions) as session:
        state = lock_job_state(session, job_id)
        if held and state.status != JobStatus.PAUSED:
            done.status = state.status  # cancelled (or ended) meanwhile: left so
            _recount_and_close(session, job_id)  # the hold let go
            return done
        db = session.connection()
        plan_cursor: int | queries.Keep = queries.KEEP
        if state.started_at is None:  # never planned: the dispatcher plans it from the start
            done.status = JobStatus.PENDING.value
        else:
            done.status = JobStatus.RUNNING.value
            if queries.any_pending_item(db, job_id):
                plan_cursor = 0  # planned again from its first line: pending ones
        queries.set_job(db, job_id, status=done.status, finished_at=None, error=None,
                        plan_cursor=plan_cursor)
        # The hold let go; with nothing left to send (a cancelled job whose every item had
        # ended meanwhile), the job closes.
        _recount_and_close(session, job_id)
    return done


def _repeat(sessions: sessionmaker[Session], step: Callable[..., int], job_id: int,
            chunk: int) -> int:
    """Run a chunked step (`step(db, job_id, chunk=chunk)` -> rows) until a chunk finds fewer
    rows than `chunk`, a transaction each; how many rows."""
    total = 0
    while True:
        done = _each(lambda: transaction(sessions), lambda db: step(db, job_id, chunk=chunk))
        total += done
        if done < chunk:
            return total


def retry_job(session: Session, job_id: int, budget_cents: int | None = None,
              only: Iterable[str] = ("failed",)) -> int:
    """Put the job's chosen items back: `only` any of RETRY_CHOICES: failed (every failed
    item), cancelled, budget (failed items whose render failed for budget), unknown (items
    with a render whose last attempt's outcome is unknown). Their failed and cancelled
    renders are queued again (each retry attempt gets its own reservation; the attempt limit
    counts from here, `retry_from`), items that failed validation are planned again. Returns
    how many items."""
    chosen = set(only)
    if not chosen or chosen - set(RETRY_CHOICES):
        raise ValueError(f"retry: choose among {', '.join(RETRY_CHOICES)}, not "
                         f"{', '.join(sorted(chosen - set(RETRY_CHOICES))) or 'nothing'}")
    state = lock_job_state(session, job_id)
    if state.status not in TERMINAL_JOB:
        hint = (f" (continue it with `imagebatch resume {job_id}`)"
                if state.status == JobStatus.PAUSED else "")
        raise ValueError(f"job {job_id} is still {state.status}; retry it once it has "
                         f"ended{hint}")
    if state.status == JobStatus.SUCCEEDED:  # every item succeeded: nothing can go again
        return 0
    db = session.connection()
    items = queries.items_to_retry(db, job_id, chosen)
    if not items:  # nothing goes again: the job stays as it ended
        return 0
    if budget_cents is not None:
        set_job_cap(session, job_id, budget_cents)
    for start in range(0, len(items), 1000):
        batch = items[start:start + 1000]
        queries.requeue_renders_of_items(db, batch)
        queries.reopen_items(db, batch)
    # The error goes: a job ended for budget (exhaustion.py) is marked by it. Pending lets
    # the dispatcher plan the re-opened items and count the queued renders.
    queries.set_job(db, job_id, status=JobStatus.PENDING.value, finished_at=None, error=None)
    recount_items(session, job_id)
    _reload_job(session, job_id)
    return len(items)


# --- reading -------------------------------------------------------------------------------


def job_state(session: Session, job_id: int) -> queries.JobState:
    """The job's status and finished_at (one row, no counting)."""
    state = queries.job_state(session.connection(), job_id)
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    return state


def job_summary(session: Session, job_id: int) -> dict[str, Any]:
    """The job as `status` shows it: one row, whatever the job's size (its counters)."""
    job = get_job(session, job_id)
    if job.status in (JobStatus.PENDING, JobStatus.SUBMITTING):
        counts = item_counts(session, job_id)  # not planned yet: counted, once
        items_total, images = sum(counts.values()), job.images
    else:
        counts = Counter({ItemStatus.SUCCEEDED: job.items_succeeded,
                          ItemStatus.FAILED: job.items_failed,
                          ItemStatus.CANCELLED: job.items_cancelled})
        items_total, images = job.items_total, job.images
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "team": job.team,
        "budget_cents": job.budget_cents,
        "spent_cents": job.spent_cents,
        "reserved_cents": job.reserved_cents,
        "unknown_cents": job.unknown_cents,
        "items_total": items_total,
        "items_succeeded": counts.get(ItemStatus.SUCCEEDED, 0),
        "items_failed": counts.get(ItemStatus.FAILED, 0),
        "items_cancelled": counts.get(ItemStatus.CANCELLED, 0),
        "images": images,
        # `run --sample`: the lines it renders before it pauses (null once resumed, and for
        # every other job).
        "sample_lines": job.sample_lines,
        # Why a paused job is paused, when something other than a person paused it.
        "error": job.error,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


def status_document(session: Session, job_id: int) -> dict[str, Any]:
    """What `status JOB --json` prints: the summary and the first failed items' reasons."""
    return {**job_summary(session, job_id), "errors": item_errors(session, job_id)}


def summary_of(sessions: sessionmaker[Session], job_id: int) -> dict[str, Any]:
    """`job_summary` in a session of its own."""
    with sessions() as session:
        return job_summary(session, job_id)


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def item_errors(session: Session, job_id: int, limit: int = 50) -> list[dict[str, Any]]:
    """The job's first failed items (by line) with their reasons."""
    rows = session.execute(
        select(JobItem.line, JobItem.custom_id, JobItem.error)
        .where(JobItem.job_id == job_id, JobItem.status == ItemStatus.FAILED)
        .order_by(JobItem.line).limit(limit)
    ).all()
    errors = []
    for line, custom_id, error in rows:
        reason = error or _render_error(session, job_id, line)
        errors.append({"line": line, "custom_id": custom_id, "error": reason})
    return errors


def _render_error(session: Session, job_id: int, line: int) -> str | None:
    return session.scalars(
        select(Render.error)
        .join(JobItem, JobItem.id == Render.item_id)
        .where(JobItem.job_id == job_id, JobItem.line == line, Render.error.is_not(None))
        .limit(1)
    ).first()


def list_jobs(session: Session, limit: int = 20) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))
