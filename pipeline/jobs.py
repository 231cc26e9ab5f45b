"""Jobs and their items: creating, planning into renders, closing, cancelling, retrying."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from pipeline import ledger
from pipeline.caps import Caps
from pipeline.db import transaction
from pipeline.models import (
    TERMINAL_JOB,
    Attempt,
    AttemptOutcome,
    Image,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    Render,
    RenderStatus,
    status_is,
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

OPEN_RENDER = (RenderStatus.QUEUED, RenderStatus.RUNNING)


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
) -> int:
    """Write a pending job and its items; the dispatcher plans it. Invalid entries become
    failed items carrying their reason (callers refuse invalid files unless told not to).
    `source` says who made it: "cli", "schedule" (a program writing SQL leaves "sql")."""
    job = Job(team=team, name=name, budget_cents=budget_cents, status=JobStatus.PENDING,
              source=source)
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
# Planning locks a job with a PostgreSQL advisory lock in this namespace, not its row: the
# row is the job's hot row, written by every render that settles meanwhile.
PLAN_LOCK_NAMESPACE = 0x1B0B


def jobs_to_plan(session: Session, limit: int = 20) -> list[int]:
    """Jobs with items to plan: pending ones, and running or paused ones planned part way."""
    return list(session.scalars(
        select(Job.id).where(or_(
            Job.status == JobStatus.PENDING,
            and_(Job.plan_cursor.is_not(None),
                 Job.status.in_([JobStatus.RUNNING, JobStatus.PAUSED])),
        )).order_by(Job.id).limit(limit)
    ))


_jobs_t, _items_t, _renders_t = Job.__table__, JobItem.__table__, Render.__table__
PLAN_STATE = select(_jobs_t.c.status, _jobs_t.c.plan_cursor, _jobs_t.c.source).where(
    _jobs_t.c.id == bindparam("job"))
ITEMS_AFTER = (
    select(_items_t.c.id, _items_t.c.line, _items_t.c.custom_id, _items_t.c.body,
           _items_t.c.metadata.label("meta"))
    .where(_items_t.c.job_id == bindparam("job"), _items_t.c.line > bindparam("cursor"),
           _items_t.c.status == ItemStatus.PENDING.value)
    .order_by(_items_t.c.line).limit(bindparam("chunk"))
)
ITEM_PLANNED = update(_items_t).where(_items_t.c.id == bindparam("item")).values(
    status=bindparam("new_status"), error=bindparam("reason"))
INSERT_RENDERS = insert(_renders_t)
JOB_PLANNED = (
    update(_jobs_t).where(_jobs_t.c.id == bindparam("job"))
    .values(status=bindparam("new_status"), plan_cursor=bindparam("cursor"),
            open_renders=_jobs_t.c.open_renders + bindparam("added"),
            started_at=func.coalesce(_jobs_t.c.started_at, bindparam("now")))
    .returning(_jobs_t.c.open_renders)
)
REPEATED_IDS = (
    select(_items_t.c.custom_id, func.min(_items_t.c.line))
    .where(_items_t.c.job_id == bindparam("job"), _items_t.c.custom_id.is_not(None))
    .group_by(_items_t.c.custom_id).having(func.count() > 1)
)
FAIL_REPEATS = update(_items_t).where(
    _items_t.c.job_id == bindparam("job"), _items_t.c.custom_id == bindparam("cid"),
    _items_t.c.line != bindparam("first"), _items_t.c.status == ItemStatus.PENDING.value,
).values(status=ItemStatus.FAILED.value, error=bindparam("reason"))


def _to_plan(db: Any, job_id: int) -> Any:
    """The job's planning state (status, plan_cursor, source) when it has items to plan and
    this transaction may plan them (PostgreSQL: no other dispatcher holds the job's advisory
    lock); else None."""
    if db.dialect.name == "postgresql" and not db.execute(
            select(func.pg_try_advisory_xact_lock(PLAN_LOCK_NAMESPACE, job_id))).scalar():
        return None  # another dispatcher is planning it
    state = db.execute(PLAN_STATE, {"job": job_id}).one_or_none()
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
    rows = db.execute(ITEMS_AFTER, {"job": job_id, "cursor": 0 if starting else
                                    state.plan_cursor, "chunk": chunk}).all()
    plan = plan_lines([_line_of(row) for row in rows], caps)
    ids = {row.line: row.id for row in rows}
    now = utcnow()
    changes = [{"item": ids[e.line], "new_status": ItemStatus.FAILED.value, "reason": e.reason}
               for e in plan.errors]
    renders: list[tuple[Any, ...]] = []
    for planned in plan.items:
        item_id = ids[planned.line.line]
        changes.append({"item": item_id, "new_status": ItemStatus.RUNNING.value,
                        "reason": None})
        renders.extend(render_rows(job_id, item_id, planned))
    _write_plan(db, changes, renders)
    more = len(rows) == chunk
    open_renders = db.execute(JOB_PLANNED, {
        "job": job_id, "new_status": JobStatus.RUNNING.value if starting else state.status,
        "cursor": rows[-1].line if more else None, "added": len(renders), "now": now,
    }).scalar_one()
    if starting:
        # A job planned again (`retry`) may have renders of its own queued: count them all.
        db.execute(update(_jobs_t).where(_jobs_t.c.id == job_id).values(finished_at=None))
        open_renders = recount_open_renders(session, job_id)
    if starting:
        recount_items(session, job_id)
    elif plan.errors:
        db.execute(ADD_FAILED, {"job": job_id, "failed": len(plan.errors)})
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
    row = db.execute(ITEMS_AFTER, {"job": job_id, "cursor": 0 if starting else
                                   state.plan_cursor, "chunk": 1}).first()
    if row is None:
        return 0
    db.execute(ITEM_PLANNED, {"item": row.id, "new_status": ItemStatus.FAILED.value,
                              "reason": reason})
    if not starting:  # a job that starts planning counts its items then
        db.execute(ADD_FAILED, {"job": job_id, "failed": 1})
    return 1


# SQLite through the driver's own executemany: SQLAlchemy's handling of 2,000 parameter
# dicts cost a third of a chunk's time (1M items: 100 s of planning on a loaded machine).
SQLITE_ITEM_PLANNED = "UPDATE job_items SET status = ?, error = ? WHERE id = ?"
# PostgreSQL: a chunk's items in one statement from arrays, not a statement per item (a
# 1,000,000-item job written with SQL was planned in 54.7 s).
POSTGRES_ITEMS_PLANNED = (
    "UPDATE job_items SET status = u.status, error = u.reason "
    "FROM unnest(%(ids)s::int[], %(statuses)s::text[], %(reasons)s::text[]) "
    "AS u(id, status, reason) WHERE job_items.id = u.id")
RENDER_COLUMNS = ("job_id", "item_id", "render_index", "model", "n", "seed",
                  "price_per_image_cents", "status", "enqueued_at")
SQLITE_INSERT_RENDERS = (f"INSERT INTO renders ({', '.join(RENDER_COLUMNS)}) "
                         f"VALUES ({', '.join('?' * len(RENDER_COLUMNS))})")


def render_rows(job_id: int, item_id: int, planned: PlannedItem) -> list[tuple[Any, ...]]:
    """The item's renders as rows (RENDER_COLUMNS), queued and waiting in SQL."""
    return [(job_id, item_id, spec.index, planned.line.model, spec.n, spec.seed,
             planned.price_per_image_cents, RenderStatus.QUEUED.value, None)
            for spec in planned.renders]


def insert_renders(db: Any, rows: list[tuple[Any, ...]]) -> None:
    """Renders in bulk: the driver's own executemany on SQLite, COPY on PostgreSQL (Core's
    executemany of one dict a row was 40 % of a submission there)."""
    if not rows:
        return
    if db.dialect.name == "sqlite":
        db.exec_driver_sql(SQLITE_INSERT_RENDERS, rows)
    elif db.dialect.name == "postgresql" and db.dialect.driver == "psycopg":
        statement = f"COPY renders ({', '.join(RENDER_COLUMNS)}) FROM STDIN"
        with db.connection.driver_connection.cursor() as cursor, \
                cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        db.execute(INSERT_RENDERS, [dict(zip(RENDER_COLUMNS, row, strict=True))
                                    for row in rows])


def _write_plan(db: Any, changes: list[dict[str, Any]], renders: list[tuple[Any, ...]]
                ) -> None:
    if changes and db.dialect.name == "sqlite":
        db.exec_driver_sql(SQLITE_ITEM_PLANNED, [
            (c["new_status"], c["reason"], c["item"]) for c in changes])
    elif changes and db.dialect.name == "postgresql":
        db.exec_driver_sql(POSTGRES_ITEMS_PLANNED, {
            "ids": [c["item"] for c in changes], "statuses": [c["new_status"] for c in changes],
            "reasons": [c["reason"] for c in changes]})
    elif changes:
        db.execute(ITEM_PLANNED, changes)
    insert_renders(db, renders)


def _fail_repeated_ids(session: Session, job_id: int) -> None:
    """A job written by another program's INSERTs: a custom_id used twice keeps its first
    line; the others fail, as the CLI would have refused them."""
    db = session.connection()
    for cid, first in db.execute(REPEATED_IDS, {"job": job_id}).all():
        db.execute(FAIL_REPEATS, {"job": job_id, "cid": cid, "first": first,
                                  "reason": f"custom_id {cid!r} repeats line {first}"})


def _line_of(item: Any) -> JobLine | LineError:
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


_renders, _items = Render.__table__, JobItem.__table__


def _settle_items_where(which: ColumnElement[bool]) -> Any:
    """One UPDATE giving each chosen item with renders, none of them open, its final status:
    succeeded when all its renders did, failed when any failed, else cancelled.

    The item's renders are counted by status inside aggregates, never filtered by status in
    a WHERE: PostgreSQL could then serve `status IN (open...)` from the status index, and
    did whenever its statistics (taken before a job was planned) said few renders were open.
    Each settlement then read every open render of the database, 3,160 index entries a
    settlement in a 4,000-render job, and more the bigger the job."""
    def renders_of_item(condition: ColumnElement[bool]) -> Any:
        counted = func.coalesce(func.sum(case((condition, 1), else_=0)), 0)
        return select(counted).where(_renders.c.item_id == _items.c.id).scalar_subquery()

    final = case(
        (renders_of_item(_renders.c.status != RenderStatus.SUCCEEDED.value) == 0,
         ItemStatus.SUCCEEDED.value),
        (renders_of_item(_renders.c.status == RenderStatus.FAILED.value) > 0,
         ItemStatus.FAILED.value),
        else_=ItemStatus.CANCELLED.value,
    )
    has_renders = exists().where(_renders.c.item_id == _items.c.id)
    open_renders = renders_of_item(_renders.c.status.in_([s.value for s in OPEN_RENDER]))
    # An item reaches its final status once: the job's counters count it then.
    not_final = _items.c.status.in_([ItemStatus.RUNNING.value, ItemStatus.PENDING.value])
    return (update(_items).where(which, not_final, has_renders, open_renders == 0)
            .values(status=final))


SETTLE_ITEM = _settle_items_where(_items.c.id == bindparam("item")).returning(_items.c.status)
SETTLE_JOB_ITEMS = _settle_items_where(_items.c.job_id == bindparam("job"))
_jobs = Job.__table__
# FOR NO KEY UPDATE, not FOR UPDATE: every ledger, attempt or image insert takes a KEY SHARE
# lock on its job row (the foreign key), which FOR UPDATE waits for; a transaction holding
# the job row that then asked for FOR UPDATE deadlocked with the renders queueing on it.
LOCK_JOB = select(_jobs.c.id).where(_jobs.c.id == bindparam("job")).with_for_update(key_share=True)
RECOUNT_OPEN = (
    update(_jobs).where(_jobs.c.id == bindparam("job"))
    .values(open_renders=select(func.count()).select_from(_renders).where(
        _renders.c.job_id == _jobs.c.id,
        _renders.c.status.in_([s.value for s in OPEN_RENDER])).scalar_subquery())
    .returning(_jobs.c.open_renders)
)


def recount_open_renders(session: Session, job_id: int) -> int:
    """Count the job's open renders anew (after planning, cancelling, or to repair).

    The job's row is locked by a statement of its own first. A recount that had to wait for
    the lock inside its UPDATE would still count with the snapshot it started with, so the
    renders that ended (and took themselves off the count) meanwhile would be counted again,
    and the job would close only at the next sweep's recount."""
    db = session.connection()
    db.execute(LOCK_JOB, {"job": job_id})
    return db.execute(RECOUNT_OPEN, {"job": job_id}).scalar_one()


def settle_item(session: Session, item_id: int) -> str | None:
    """An item's final status once none of its renders is open; None while one is (or when
    it had its final status already). The caller counts it on the job (ledger.item_ended)."""
    return session.connection().execute(SETTLE_ITEM, {"item": item_id}).scalar()


ITEMS_BY_STATUS = (select(_items.c.status, func.count()).where(_items.c.job_id == bindparam("job"))
                   .group_by(_items.c.status))
SET_SHOWN = update(_jobs).where(_jobs.c.id == bindparam("job")).values(
    items_total=bindparam("total"), items_succeeded=bindparam("succeeded"),
    items_failed=bindparam("failed"), items_cancelled=bindparam("cancelled"),
    images=select(func.count()).select_from(Image.__table__)
    .where(Image.__table__.c.job_id == bindparam("job")).scalar_subquery())


def recount_items(session: Session, job_id: int) -> None:
    """Count the job's items by status and its files anew, onto the counters `status` shows
    (after planning starts, cancelling, retrying, resuming: whole-job changes). Reads the
    whole job, so never per render."""
    db = session.connection()
    counts = dict(db.execute(ITEMS_BY_STATUS, {"job": job_id}).all())
    db.execute(SET_SHOWN, {
        "job": job_id, "total": sum(counts.values()),
        "succeeded": counts.get(ItemStatus.SUCCEEDED.value, 0),
        "failed": counts.get(ItemStatus.FAILED.value, 0),
        "cancelled": counts.get(ItemStatus.CANCELLED.value, 0)})


ADD_FAILED = update(_jobs).where(_jobs.c.id == bindparam("job")).values(
    items_failed=_jobs.c.items_failed + bindparam("failed"))


def _close_drained(session: Session, job_id: int) -> None:
    close_job_if_done(session, job_id, 0)


ledger.when_drained(_close_drained)


def close_job_if_done(session: Session, job_id: int, open_renders: int) -> bool:
    """Close the job when none of its renders is open. `open_renders` must come from a
    statement that holds the job's row lock in this transaction (ledger.Moves or
    recount_open_renders)."""
    if open_renders > 0:
        return False
    job = session.get_one(Job, job_id)
    if (job.finished_at is not None or job.plan_cursor is not None
            or job.status in (JobStatus.PENDING, JobStatus.SUBMITTING)):
        return False
    counts = item_counts(session, job_id)
    if job.status != JobStatus.CANCELLED:
        job.status = final_status(counts)
    job.finished_at = utcnow()
    # Exact at the end whatever happened on the way (one read of the job, once).
    session.flush()
    recount_items(session, job_id)
    return True


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
ALL = 2**31 - 1  # "no chunks": one transaction does it all (cancel_job, small jobs and tests)
RETRY_CHOICES = ("failed", "cancelled", "budget", "unknown")


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


JOB_STATE = select(_jobs.c.status, _jobs.c.finished_at, _jobs.c.started_at,
                   _jobs.c.plan_cursor).where(_jobs.c.id == bindparam("job"))
SET_JOB = update(_jobs).where(_jobs.c.id == bindparam("job"))
HOLD_OPEN = SET_JOB.values(open_renders=_jobs.c.open_renders + 1)


SET_CAP = update(_jobs).where(
    _jobs.c.id == bindparam("job"),
    _jobs.c.spent_cents + _jobs.c.reserved_cents <= bindparam("cap"),
).values(budget_cents=bindparam("cap"))
HELD = select(_jobs.c.spent_cents, _jobs.c.reserved_cents).where(_jobs.c.id == bindparam("job"))


def set_job_cap(session: Session, job_id: int, cap_cents: int) -> None:
    """Set the job's cap, in one conditional UPDATE: refused (LimitBelowSpent, nothing
    changed once the caller rolls back) below what the job has already spent and reserved,
    since spent + reserved <= cap must hold at every instant."""
    db = session.connection()
    if db.execute(SET_CAP, {"job": job_id, "cap": cap_cents}).rowcount:
        return
    held = db.execute(HELD, {"job": job_id}).one_or_none()
    if held is None:
        raise JobNotFound(f"no job {job_id}")
    raise LimitBelowSpent(
        f"job {job_id}: a cap of {format_dollars(cap_cents)} is below what it has already "
        f"spent ({format_dollars(held.spent_cents)}, {format_dollars(held.reserved_cents)} "
        "more reserved by renders in flight): set at least "
        f"{format_dollars(held.spent_cents + held.reserved_cents)}")


def lock_job_state(session: Session, job_id: int) -> Any:
    """The job's status, its row locked for the rest of the transaction, and no chunk of its
    planning under way (PostgreSQL: planning reads the status when its chunk starts and
    writes it back when it ends, under the advisory lock taken here too; SQLite's BEGIN
    IMMEDIATE already excludes it). Then a status set here is the one planning sees next."""
    db = session.connection()
    if db.dialect.name == "postgresql":
        db.execute(select(func.pg_advisory_xact_lock(PLAN_LOCK_NAMESPACE, job_id)))
    db.execute(LOCK_JOB, {"job": job_id})
    state = db.execute(JOB_STATE, {"job": job_id}).one_or_none()
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    return state


# The job's error while it is paused because storage refused a paid result (render.py).
STORAGE_FAILING = "storage: "
UNPAUSE = SET_JOB.where(_jobs.c.status == JobStatus.PAUSED.value,
                        _jobs.c.error.startswith(bindparam("cause")))


def pause_job(session: Session, job_id: int, reason: str | None = None) -> bool:
    """Send nothing new: the job's renders go back to waiting in SQL when they are delivered
    or about to call (render.py), renders in flight finish and settle. `reason` is kept as
    the job's error while it is paused (None: a person paused it). False when the job was
    neither running nor pending (paused already, ended, or still being submitted)."""
    state = lock_job_state(session, job_id)
    db = session.connection()
    if state.status == JobStatus.PAUSED and reason is None:
        # Paused by a person now, whatever paused it before: nothing unpauses it but resume.
        db.execute(SET_JOB, {"job": job_id, "error": None})
    if state.status not in (JobStatus.RUNNING, JobStatus.PENDING):
        return False
    db.execute(SET_JOB, {"job": job_id, "status": JobStatus.PAUSED.value, "error": reason})
    return True


def unpause_job(session: Session, job_id: int, cause: str) -> bool:
    """Run again a job paused for `cause` (the start of its error) once that cause is gone;
    a job paused by a person, or for another cause, stays paused."""
    done = session.connection().execute(UNPAUSE, {
        "job": job_id, "cause": cause, "status": JobStatus.RUNNING.value, "error": None})
    return done.rowcount == 1


_QUEUED, _CANCELLED = RenderStatus.QUEUED.value, RenderStatus.CANCELLED.value
RUNNING_RENDERS = select(func.count()).select_from(_renders).where(
    _renders.c.job_id == bindparam("job"), status_is(_renders.c.status, RenderStatus.RUNNING.value))


def renders_running(session: Session, job_id: int) -> int:
    """The job's renders holding a lease (in flight, or waiting to retry), from the index."""
    return session.connection().execute(RUNNING_RENDERS, {"job": job_id}).scalar_one()


def unfinished_job_of(session: Session, digest: str) -> Job | None:
    """The latest job submitted from a file with this sha256 that has not ended (a job still
    being submitted is not one: there is nothing to continue)."""
    return session.scalars(
        select(Job).where(Job.source_digest == digest,
                          Job.status.not_in([*TERMINAL_JOB, JobStatus.SUBMITTING]))
        .order_by(Job.id.desc()).limit(1)
    ).first()


# Each chunk picks its rows through ix_renders_job_queue (job_id, status); the outer WHERE
# checks the status again, so a render that started meanwhile is left alone (PostgreSQL
# re-reads a row changed under it against the outer WHERE only).
def _renders_of_job(status: str, *conditions: ColumnElement[bool]) -> Any:
    chosen = (select(_renders.c.id)
              .where(_renders.c.job_id == bindparam("job"), status_is(_renders.c.status, status),
                     *conditions)
              .limit(bindparam("chunk")))
    return update(_renders).where(_renders.c.id.in_(chosen), _renders.c.status == status)


CANCEL_QUEUED = _renders_of_job(_QUEUED).values(
    status=_CANCELLED, error="cancelled")
# Items go by ranges of lines: (job_id, status, line) and (job_id, line) are both indexed, so
# each chunk reads its own rows only, whatever the job's size.
LINE_RANGE = select(func.min(_items.c.line), func.max(_items.c.line)).where(
    _items.c.job_id == bindparam("job"))
_IN_RANGE = and_(_items.c.job_id == bindparam("job"), _items.c.line >= bindparam("lo"),
                 _items.c.line < bindparam("hi"))
CANCEL_PENDING_ITEMS = update(_items).where(
    _IN_RANGE, _items.c.status == ItemStatus.PENDING.value,
).values(status=ItemStatus.CANCELLED.value, error="cancelled")
SETTLE_RUNNING_ITEMS = _settle_items_where(
    and_(_IN_RANGE, _items.c.status == ItemStatus.RUNNING.value))


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
    db.execute(SET_JOB, {"job": job_id, "status": JobStatus.CANCELLED.value,
                         "plan_cursor": None})
    db.execute(HOLD_OPEN, {"job": job_id})
    return True


def finish_cancel(transactions: Callable[[], AbstractContextManager[Session]], job_id: int,
                  chunk: int = CHUNK) -> None:
    """The rest of a cancel, each step a transaction of `transactions()`: queued renders
    cancelled, `chunk` at a time; pending items cancelled and items whose renders have all
    ended settled, by ranges of `chunk` lines; then the job recounted (its open renders and
    the counters `status` shows) and closed if nothing of it is in flight (else its last
    render closes it)."""
    while True:
        with transactions() as session:
            done = session.connection().execute(
                CANCEL_QUEUED, {"job": job_id, "chunk": chunk, "now": utcnow()}).rowcount
        if done < chunk:
            break
    for lo, hi in _line_ranges(transactions, job_id, chunk):
        with transactions() as session:
            db = session.connection()
            db.execute(CANCEL_PENDING_ITEMS, {"job": job_id, "lo": lo, "hi": hi})
            db.execute(SETTLE_RUNNING_ITEMS, {"job": job_id, "lo": lo, "hi": hi})
    with transactions() as session:
        _recount_and_close(session, job_id)


FAIL_QUEUED = _renders_of_job(_QUEUED).values(
    status=RenderStatus.FAILED.value, error=bindparam("reason"))


def fail_queued_renders(transactions: Callable[[], AbstractContextManager[Session]],
                        job_id: int, reason: str, chunk: int = CHUNK) -> int:
    """Every queued render of the job failed with `reason`, `chunk` a transaction of
    `transactions()`; then its items settled by ranges of lines and the job recounted and
    closed if nothing of it is in flight (else its last render closes it). Renders in flight
    end as usual. Returns how many renders it failed."""
    failed = 0
    while True:
        with transactions() as session:
            done = session.connection().execute(FAIL_QUEUED, {
                "job": job_id, "chunk": chunk, "reason": reason, "now": utcnow()}).rowcount
        failed += done
        if done < chunk:
            break
    for lo, hi in _line_ranges(transactions, job_id, chunk):
        with transactions() as session:
            session.connection().execute(SETTLE_RUNNING_ITEMS, {"job": job_id, "lo": lo,
                                                                "hi": hi})
    with transactions() as session:
        _recount_and_close(session, job_id)
    return failed


def _recount_and_close(session: Session, job_id: int) -> None:
    """After a whole-job change: open renders and the counters `status` shows counted anew
    (under the job's row lock, taken first), and the job closed if nothing of it is open."""
    open_renders = recount_open_renders(session, job_id)
    session.get(Job, job_id, populate_existing=True)  # what the statements above wrote
    if not close_job_if_done(session, job_id, open_renders):  # closing recounts items itself
        recount_items(session, job_id)


def _line_ranges(transactions: Callable[[], AbstractContextManager[Session]], job_id: int,
                 chunk: int) -> list[tuple[int, int]]:
    with transactions() as session:
        lo, hi = session.connection().execute(LINE_RANGE, {"job": job_id}).one()
    if lo is None:
        return []
    return [(start, min(start + chunk, hi + 1)) for start in range(lo, hi + 1, chunk)]


def cancel_job(session: Session, job_id: int) -> bool:
    """Cancel in this one transaction (small jobs, tests): nothing new is sent, queued renders
    and pending items are cancelled, in-flight renders finish and settle as usual (a
    reservation is only ever held by an attempt in flight). `cancel_in_chunks` does the same
    in short transactions, for jobs of any size."""
    if not begin_cancel(session, job_id):
        return False
    finish_cancel(lambda: nullcontext(session), job_id, ALL)
    return True


def cancel_in_chunks(sessions: sessionmaker[Session], job_id: int, chunk: int = CHUNK) -> bool:
    """`cancel_job` for jobs of any size: the status first, in a short transaction of its
    own, then the rest `chunk` rows a transaction. Interrupted, it is taken up again by
    running it again."""
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


RESTORE_CANCELLED = _renders_of_job(
    _CANCELLED,
    # Renders of items that did not end otherwise: a failed item stays failed (`retry`).
    select(_items.c.status).where(_items.c.id == _renders.c.item_id).scalar_subquery().in_(
        [ItemStatus.CANCELLED.value, ItemStatus.RUNNING.value]),
).values(status=_QUEUED, retry_from=_renders.c.attempts, deliveries=0, error=None,
         enqueued_at=None, lease_until=None)
FORGET_SENT = _renders_of_job(_QUEUED, _renders.c.enqueued_at.is_not(None)).values(
    enqueued_at=None)
REOPEN_ITEMS = update(_items).where(
    _IN_RANGE, _items.c.status == ItemStatus.CANCELLED.value,
).values(status=case((exists().where(_renders.c.item_id == _items.c.id),
                      ItemStatus.RUNNING.value), else_=ItemStatus.PENDING.value), error=None)
ANY_PENDING_ITEM = select(_items.c.id).where(
    _items.c.job_id == bindparam("job"), status_is(_items.c.status, ItemStatus.PENDING.value)
).limit(1)


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
            db.execute(SET_JOB, {"job": job_id, "status": JobStatus.PAUSED.value,
                                 "finished_at": None})
            db.execute(HOLD_OPEN, {"job": job_id})
    done = Resumed(before, before)
    done.renders = _repeat(sessions, RESTORE_CANCELLED, job_id, chunk)
    if in_process:
        _repeat(sessions, FORGET_SENT, job_id, chunk)
    for lo, hi in _line_ranges(lambda: transaction(sessions), job_id, chunk):
        with transaction(sessions) as session:
            done.items += session.connection().execute(
                REOPEN_ITEMS, {"job": job_id, "lo": lo, "hi": hi}).rowcount
    with transaction(sessions) as session:
        state = lock_job_state(session, job_id)
        if held and state.status != JobStatus.PAUSED:
            done.status = state.status  # cancelled (or ended) meanwhile: left so
            _recount_and_close(session, job_id)  # the hold let go
            return done
        db = session.connection()
        values: dict[str, Any] = {"finished_at": None, "error": None}
        if state.started_at is None:  # never planned: the dispatcher plans it from the start
            values["status"] = JobStatus.PENDING.value
        else:
            values["status"] = JobStatus.RUNNING.value
            if db.execute(ANY_PENDING_ITEM, {"job": job_id}).first() is not None:
                values["plan_cursor"] = 0  # planned again from its first line: pending ones
        db.execute(SET_JOB, {"job": job_id, **values})
        done.status = values["status"]
        # The hold let go; with nothing left to send (a cancelled job whose every item had
        # ended meanwhile), the job closes.
        _recount_and_close(session, job_id)
    return done


def _repeat(sessions: sessionmaker[Session], statement: Any, job_id: int, chunk: int) -> int:
    """Run a chunked statement until a chunk finds fewer rows than `chunk`; how many rows."""
    total = 0
    while True:
        with transaction(sessions) as session:
            done = session.connection().execute(
                statement, {"job": job_id, "chunk": chunk, "now": utcnow()}).rowcount
        total += done
        if done < chunk:
            return total


_attempts = Attempt.__table__
_RETRY_ITEMS: dict[str, ColumnElement[bool]] = {
    "failed": status_is(_items.c.status, ItemStatus.FAILED.value),
    "cancelled": status_is(_items.c.status, ItemStatus.CANCELLED.value),
    "budget": and_(status_is(_items.c.status, ItemStatus.FAILED.value), exists().where(
        _renders.c.item_id == _items.c.id, _renders.c.status == RenderStatus.FAILED.value,
        _renders.c.error.like("budget:%"))),
    "unknown": and_(
        or_(status_is(_items.c.status, ItemStatus.FAILED.value),
            status_is(_items.c.status, ItemStatus.CANCELLED.value)),
        exists().where(_renders.c.item_id == _items.c.id, _attempts.c.render_id == _renders.c.id,
                       _attempts.c.number == _renders.c.attempts,
                       _attempts.c.outcome == AttemptOutcome.UNKNOWN.value)),
}
REQUEUE_RENDERS = update(_renders).where(
    _renders.c.item_id.in_(bindparam("items", expanding=True)),
    _renders.c.status.in_([RenderStatus.FAILED.value, _CANCELLED]),
).values(status=_QUEUED, retry_from=_renders.c.attempts, deliveries=0, error=None,
         enqueued_at=None, lease_until=None)
REOPEN_CHOSEN_ITEMS = update(_items).where(
    _items.c.id.in_(bindparam("items", expanding=True)),
).values(status=case((exists().where(_renders.c.item_id == _items.c.id),
                      ItemStatus.RUNNING.value), else_=ItemStatus.PENDING.value), error=None)


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
    items = sorted(set(db.execute(
        select(_items.c.id).where(_items.c.job_id == job_id,
                                  or_(*(_RETRY_ITEMS[c] for c in chosen)))).scalars()))
    if not items:  # nothing goes again: the job stays as it ended
        return 0
    if budget_cents is not None:
        set_job_cap(session, job_id, budget_cents)
    now = utcnow()
    for start in range(0, len(items), 1000):
        batch = {"items": items[start:start + 1000], "now": now}
        db.execute(REQUEUE_RENDERS, batch)
        db.execute(REOPEN_CHOSEN_ITEMS, batch)
    # The error goes: a job ended for budget (exhaustion.py) is marked by it.
    values: dict[str, Any] = {"status": JobStatus.PENDING.value, "finished_at": None,
                              "error": None}
    # Pending lets the dispatcher plan the re-opened items and count the queued renders.
    db.execute(SET_JOB, {"job": job_id, **values})
    recount_items(session, job_id)
    session.get(Job, job_id, populate_existing=True)
    return len(items)


# --- reading -------------------------------------------------------------------------------


def job_state(session: Session, job_id: int) -> Any:
    """The job's status and finished_at (one row, no counting)."""
    state = session.connection().execute(JOB_STATE, {"job": job_id}).one_or_none()
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    return state


def job_is_finished(session: Session, job_id: int) -> bool:
    row = session.execute(select(Job.finished_at).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return row.finished_at is not None


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
        # Why a paused job is paused, when something other than a person paused it.
        "error": job.error,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


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
