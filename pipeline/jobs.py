"""Jobs and their items: creating, planning into renders, closing, cancelling, retrying."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
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
from sqlalchemy.orm import Session

from pipeline.caps import Caps
from pipeline.models import (
    TERMINAL_JOB,
    Image,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    Render,
    RenderStatus,
    utcnow,
)
from pipeline.plan import JobLine, LineError, line_from_object, plan_lines

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
) -> int:
    """Write a pending job and its items; the dispatcher plans it. Invalid entries become
    failed items carrying their reason (callers refuse invalid files unless told not to)."""
    job = Job(team=team, name=name, budget_cents=budget_cents, status=JobStatus.PENDING,
              source="cli")
    session.add(job)
    session.flush()
    rows = [_item_row(job.id, entry) for entry in entries]
    if rows:
        session.execute(insert(JobItem), rows)
    return job.id


def _item_row(job_id: int, entry: JobLine | LineError) -> dict[str, Any]:
    if isinstance(entry, LineError):
        return {"job_id": job_id, "line": entry.line, "custom_id": entry.custom_id,
                "body": entry.raw, "meta": None, "status": ItemStatus.FAILED,
                "error": entry.reason}
    return {"job_id": job_id, "line": entry.line, "custom_id": entry.custom_id,
            "body": json.dumps(entry.body, ensure_ascii=False), "model": entry.model,
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
    status=bindparam("new_status"), model=bindparam("model"), error=bindparam("reason"))
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


def plan_job(session: Session, job_id: int, caps: Mapping[str, Caps],
             chunk: int = PLAN_CHUNK) -> int:
    """Plan the job's next `chunk` pending items: validate them, write their renders (they
    wait in SQL for the broker's window), fail the invalid ones with their reason. Returns
    how many items it took; 0 when there is nothing (left) to plan. The job runs from its
    first chunk on; it cannot close until its last chunk is planned."""
    db = session.connection()
    if db.dialect.name == "postgresql" and not db.execute(
            select(func.pg_try_advisory_xact_lock(PLAN_LOCK_NAMESPACE, job_id))).scalar():
        return 0  # another dispatcher is planning it
    state = db.execute(PLAN_STATE, {"job": job_id}).one_or_none()
    if state is None:
        return 0
    starting = state.status == JobStatus.PENDING
    if not starting and (state.plan_cursor is None
                         or state.status not in (JobStatus.RUNNING, JobStatus.PAUSED)):
        return 0
    if starting and state.source != "cli":  # the CLI refused repeated ids when it submitted
        _fail_repeated_ids(session, job_id)
    rows = db.execute(ITEMS_AFTER, {"job": job_id, "cursor": 0 if starting else
                                    state.plan_cursor, "chunk": chunk}).all()
    plan = plan_lines([_line_of(row) for row in rows], caps)
    ids = {row.line: row.id for row in rows}
    now = utcnow()
    changes = [{"item": ids[e.line], "new_status": ItemStatus.FAILED.value, "model": None,
                "reason": e.reason} for e in plan.errors]
    renders = []
    for planned in plan.items:
        item_id = ids[planned.line.line]
        changes.append({"item": item_id, "new_status": ItemStatus.RUNNING.value,
                        "model": planned.line.model, "reason": None})
        renders.extend(
            {"job_id": job_id, "item_id": item_id, "render_index": spec.index,
             "model": planned.line.model, "n": spec.n, "seed": spec.seed,
             "price_per_image_cents": planned.price_per_image_cents,
             "status": RenderStatus.QUEUED.value, "enqueued_at": None}
            for spec in planned.renders
        )
    if changes:
        db.execute(ITEM_PLANNED, changes)
    if renders:
        db.execute(INSERT_RENDERS, renders)
    more = len(rows) == chunk
    open_renders = db.execute(JOB_PLANNED, {
        "job": job_id, "new_status": JobStatus.RUNNING.value if starting else state.status,
        "cursor": rows[-1].line if more else None, "added": len(renders), "now": now,
    }).scalar_one()
    if starting:
        # A job planned again (`retry`) may have renders of its own queued: count them all.
        db.execute(update(_jobs_t).where(_jobs_t.c.id == job_id).values(finished_at=None))
        open_renders = recount_open_renders(session, job_id)
    if not more:
        close_job_if_done(session, job_id, open_renders)
    return len(rows)


def _fail_repeated_ids(session: Session, job_id: int) -> None:
    """A job written by another program's INSERTs: a custom_id used twice keeps its first
    line; the others fail, as the CLI would have refused them."""
    db = session.connection()
    for cid, first in db.execute(REPEATED_IDS, {"job": job_id}).all():
        db.execute(FAIL_REPEATS, {"job": job_id, "cid": cid, "first": first,
                                  "reason": f"custom_id {cid!r} repeats line {first}"})


def _line_of(item: Any) -> JobLine | LineError:
    """An item row (ours or another program's INSERT) back as a job line, checked."""
    try:
        body = json.loads(item.body)
        metadata = json.loads(item.meta) if item.meta else None
    except (json.JSONDecodeError, TypeError) as exc:
        return LineError(item.line, f"body or metadata is not valid JSON ({exc})", item.custom_id)
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
    return update(_items).where(which, has_renders, open_renders == 0).values(status=final)


SETTLE_ITEM = _settle_items_where(_items.c.id == bindparam("item"))
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


def settle_item(session: Session, item_id: int) -> None:
    """An item's status once none of its renders is open."""
    session.connection().execute(SETTLE_ITEM, {"item": item_id})


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


# --- cancel and retry ----------------------------------------------------------------------


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def cancel_job(session: Session, job_id: int) -> bool:
    """Stop sending anything new: queued renders are cancelled at once, in-flight ones finish
    and settle as usual (a reservation is only ever held by an attempt in flight)."""
    job = get_job(session, job_id, lock=True)
    if job.status in TERMINAL_JOB:
        return False
    job.status = JobStatus.CANCELLED
    now = utcnow()
    session.execute(
        update(Render)
        .where(Render.job_id == job_id, Render.status == RenderStatus.QUEUED)
        .values(status=RenderStatus.CANCELLED, error="cancelled", updated_at=now)
    )
    session.execute(
        update(JobItem)
        .where(JobItem.job_id == job_id, JobItem.status == ItemStatus.PENDING)
        .values(status=ItemStatus.CANCELLED, error="cancelled")
    )
    session.connection().execute(SETTLE_JOB_ITEMS, {"job": job_id})
    close_job_if_done(session, job_id, recount_open_renders(session, job_id))
    return True


def retry_job(session: Session, job_id: int, budget_cents: int | None = None) -> int:
    """Put the job's failed items back: failed renders queued again (each retry attempt gets
    its own reservation), items that failed validation planned again. Returns how many items."""
    job = get_job(session, job_id, lock=True)
    if job.status not in TERMINAL_JOB:
        raise ValueError(f"job {job_id} is still {job.status}; retry it once it has ended")
    failed_items = session.scalars(
        select(JobItem).where(JobItem.job_id == job_id, JobItem.status == ItemStatus.FAILED)
    ).all()
    if budget_cents is not None:
        job.budget_cents = budget_cents
    now = utcnow()
    for item in failed_items:
        has_renders = session.scalars(
            select(Render.id).where(Render.item_id == item.id).limit(1)
        ).first()
        item.status = ItemStatus.RUNNING if has_renders else ItemStatus.PENDING
        item.error = None
    session.execute(
        update(Render)
        .where(Render.job_id == job_id, Render.status == RenderStatus.FAILED)
        .values(status=RenderStatus.QUEUED, retry_from=Render.attempts, deliveries=0,
                error=None, enqueued_at=None, lease_until=None, updated_at=now)
    )
    # Pending lets the dispatcher plan the re-opened items and enqueue the queued renders.
    job.status = JobStatus.PENDING
    job.finished_at = None
    return len(failed_items)


# --- reading -------------------------------------------------------------------------------


def job_is_finished(session: Session, job_id: int) -> bool:
    row = session.execute(select(Job.finished_at).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return row.finished_at is not None


def job_summary(session: Session, job_id: int) -> dict[str, Any]:
    job = get_job(session, job_id)
    counts = item_counts(session, job_id)
    images = session.scalar(select(func.count()).where(Image.job_id == job_id)) or 0
    return {
        "id": job.id,
        "name": job.name,
        "status": job.status,
        "team": job.team,
        "budget_cents": job.budget_cents,
        "spent_cents": job.spent_cents,
        "reserved_cents": job.reserved_cents,
        "unknown_cents": job.unknown_cents,
        "items_total": sum(counts.values()),
        "items_succeeded": counts.get(ItemStatus.SUCCEEDED, 0),
        "items_failed": counts.get(ItemStatus.FAILED, 0),
        "items_cancelled": counts.get(ItemStatus.CANCELLED, 0),
        "images": images,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def item_errors(session: Session, job_id: int, limit: int = 50) -> list[dict[str, Any]]:
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
