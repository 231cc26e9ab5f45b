"""Jobs and their items: creating, planning into renders, closing, cancelling, retrying."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, bindparam, case, exists, func, insert, select, update
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
from pipeline.plan import JobLine, LineError, line_from_object, plan_lines, reject_duplicate_ids

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


def claim_pending_jobs(session: Session, limit: int = 20) -> list[int]:
    """Pending jobs this dispatcher may plan. On PostgreSQL the rows stay locked (SKIP LOCKED)
    until the transaction ends, so two dispatchers never plan one job twice."""
    query = select(Job.id).where(Job.status == JobStatus.PENDING).order_by(Job.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def plan_job(session: Session, job_id: int, caps: Mapping[str, Caps]) -> list[int]:
    """Validate the job's pending items, write their renders, and return every render of the
    job that is queued (to enqueue). Invalid items fail with their reason; the rest goes on."""
    job = session.get_one(Job, job_id, with_for_update=True)
    if job.status != JobStatus.PENDING:
        return []
    items = session.scalars(
        select(JobItem)
        .where(JobItem.job_id == job_id, JobItem.status == ItemStatus.PENDING)
        .order_by(JobItem.line)
    ).all()
    entries = reject_duplicate_ids(_line_of(item) for item in items)
    plan = plan_lines(entries, caps)
    by_line = {item.line: item for item in items}
    for error in plan.errors:
        item = by_line[error.line]
        item.status, item.error = ItemStatus.FAILED, error.reason
    now = utcnow()
    rows = []
    for planned in plan.items:
        item = by_line[planned.line.line]
        item.status, item.model, item.error = ItemStatus.RUNNING, planned.line.model, None
        rows.extend(
            {"job_id": job_id, "item_id": item.id, "render_index": spec.index,
             "model": planned.line.model, "n": spec.n, "seed": spec.seed,
             "price_per_image_cents": planned.price_per_image_cents,
             "status": RenderStatus.QUEUED, "enqueued_at": now}
            for spec in planned.renders
        )
    if rows:
        session.execute(insert(Render), rows)
    job.status = JobStatus.RUNNING
    job.started_at = job.started_at or now
    job.finished_at = None
    session.flush()
    close_job_if_done(session, job_id, recount_open_renders(session, job_id))
    return list(
        session.scalars(
            select(Render.id)
            .where(Render.job_id == job_id, Render.status == RenderStatus.QUEUED)
            .order_by(Render.id)
        )
    )


def _line_of(item: JobItem) -> JobLine | LineError:
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
    if job.finished_at is not None or job.status == JobStatus.PENDING:
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
                error=None, enqueued_at=now, lease_until=None, updated_at=now)
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
