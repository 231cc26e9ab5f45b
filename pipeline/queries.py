"""The state-changing SQL, grouped by table: each statement built once, behind a typed function.

Statements are Core, built at import: on the hot path (three transactions a render) building
and compiling one each time cost more than running it. Every function takes the caller's
connection (`db`, from `session.connection()`), so it runs in the caller's transaction, and
returns what the caller needs: a bool (did the conditional UPDATE find its row?), a count,
or a row typed by a Protocol below (a Row has these attributes; nothing is copied).
The ORM stays for admin and reporting (teams, schedules, caps, reports, exports).

Statements that must use a partial index on PostgreSQL name the status as a literal
(`models.status_is`): a generic plan of `status = $1` cannot prove the index applies.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)

from pipeline.models import (
    Attempt,
    AttemptOutcome,
    Image,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    LedgerEntry,
    Render,
    RenderStatus,
    Team,
    TeamBudget,
    Worker,
    status_is,
)

_jobs, _items, _renders = Job.__table__, JobItem.__table__, Render.__table__
_attempts, _ledger, _images = Attempt.__table__, LedgerEntry.__table__, Image.__table__
_teams, _budgets = Team.__table__, TeamBudget.__table__
_workers = Worker.__table__

# --- jobs -------------------------------------------------------------------------------------

# A render is open (counted in jobs.open_renders) while it is queued or running.
_OPEN_RENDER = [RenderStatus.QUEUED.value, RenderStatus.RUNNING.value]
# Planning locks a job with a PostgreSQL advisory lock in this namespace, not its row: the
# row is the job's hot row, written by every render that settles meanwhile.
PLAN_LOCK_NAMESPACE = 0x1B0B
# The job's error while the rest of it is being ended for budget (a marker: the render that
# set it ends the rest, and the sweep finishes what a dead worker left half done).
OUT_OF_BUDGET = "budget: "


class Keep(enum.Enum):
    """`set_job`'s default: the column is left as it is (None sets it NULL)."""

    KEEP = "keep"


KEEP = Keep.KEEP


class PlanState(Protocol):
    """A job's planning state (`plan_state`)."""

    status: str
    plan_cursor: int | None
    source: str


class JobState(Protocol):
    """A job's status and where it is in its life (`job_state`)."""

    status: str
    finished_at: datetime | None
    started_at: datetime | None
    plan_cursor: int | None
    sample_lines: int | None  # set while a `run --sample` job renders its sample (see jobs)


class JobSpending(Protocol):
    spent_cents: int
    reserved_cents: int


class MarkedJob(Protocol):
    """A running job marked out of budget (`marked_out_of_budget`): `error` is the reason."""

    id: int
    error: str


_TRY_PLAN_LOCK = select(func.pg_try_advisory_xact_lock(
    PLAN_LOCK_NAMESPACE, bindparam("job", type_=Integer)))
_WAIT_PLAN_LOCK = select(func.pg_advisory_xact_lock(
    PLAN_LOCK_NAMESPACE, bindparam("job", type_=Integer)))
_PLAN_STATE = select(_jobs.c.status, _jobs.c.plan_cursor, _jobs.c.source).where(
    _jobs.c.id == bindparam("job"))
_JOB_PLANNED = (
    update(_jobs).where(_jobs.c.id == bindparam("job"))
    .values(status=bindparam("new_status"), plan_cursor=bindparam("cursor"),
            open_renders=_jobs.c.open_renders + bindparam("added"),
            started_at=func.coalesce(_jobs.c.started_at, bindparam("now")))
    .returning(_jobs.c.open_renders)
)
# FOR NO KEY UPDATE, not FOR UPDATE: every ledger, attempt or image insert takes a KEY SHARE
# lock on its job row (the foreign key), which FOR UPDATE waits for; a transaction holding
# the job row that then asked for FOR UPDATE deadlocked with the renders queueing on it.
_LOCK_JOB = select(_jobs.c.id).where(_jobs.c.id == bindparam("job")).with_for_update(
    key_share=True)
_RECOUNT_OPEN = (
    update(_jobs).where(_jobs.c.id == bindparam("job"))
    .values(open_renders=select(func.count()).select_from(_renders).where(
        _renders.c.job_id == _jobs.c.id,
        _renders.c.status.in_(_OPEN_RENDER)).scalar_subquery())
    .returning(_jobs.c.open_renders)
)
_SET_SHOWN = update(_jobs).where(_jobs.c.id == bindparam("job")).values(
    items_total=bindparam("total"), items_succeeded=bindparam("succeeded"),
    items_failed=bindparam("failed"), items_cancelled=bindparam("cancelled"),
    images=select(func.count()).select_from(_images)
    .where(_images.c.job_id == bindparam("job")).scalar_subquery())
_ADD_FAILED = update(_jobs).where(_jobs.c.id == bindparam("job")).values(
    items_failed=_jobs.c.items_failed + bindparam("failed"))
_JOB_STATE = select(_jobs.c.status, _jobs.c.finished_at, _jobs.c.started_at,
                    _jobs.c.plan_cursor, _jobs.c.sample_lines).where(_jobs.c.id == bindparam("job"))
# Sets the columns named by the parameters given with it (`set_job`).
_SET_JOB = update(_jobs).where(_jobs.c.id == bindparam("job"))
_KEEP_OPEN = _SET_JOB.values(open_renders=_jobs.c.open_renders + 1)
_SET_CAP = update(_jobs).where(
    _jobs.c.id == bindparam("job"),
    _jobs.c.spent_cents + _jobs.c.reserved_cents <= bindparam("cap"),
).values(budget_cents=bindparam("cap"))
_SPENDING = select(_jobs.c.spent_cents, _jobs.c.reserved_cents).where(
    _jobs.c.id == bindparam("job"))
_UNPAUSE = _SET_JOB.where(_jobs.c.status == JobStatus.PAUSED.value,
                          _jobs.c.error.startswith(bindparam("cause")))
_MARK_OUT_OF_BUDGET = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("job"), _jobs.c.status == JobStatus.RUNNING.value,
           _jobs.c.error.is_(None))
    .values(error=bindparam("reason")))
_MARKED_OUT_OF_BUDGET = (select(_jobs.c.id, _jobs.c.error)
                         .where(_jobs.c.status == JobStatus.RUNNING.value,
                                _jobs.c.error.startswith(OUT_OF_BUDGET)))


def try_plan_lock(db: Connection, job_id: int) -> bool:
    """The job's planning lock for this transaction, unless another one holds it (then
    False). Only PostgreSQL needs one: SQLite's BEGIN IMMEDIATE already excludes others."""
    if db.dialect.name != "postgresql":
        return True
    return bool(db.execute(_TRY_PLAN_LOCK, {"job": job_id}).scalar())


def wait_plan_lock(db: Connection, job_id: int) -> None:
    """The job's planning lock for this transaction, waiting for it (PostgreSQL only)."""
    if db.dialect.name == "postgresql":
        db.execute(_WAIT_PLAN_LOCK, {"job": job_id})


def plan_state(db: Connection, job_id: int) -> PlanState | None:
    return cast("PlanState | None", db.execute(_PLAN_STATE, {"job": job_id}).one_or_none())


def job_planned(db: Connection, job_id: int, *, status: str, plan_cursor: int | None,
                added: int, now: datetime) -> int:
    """A chunk of the job planned: its status and cursor set, `added` renders opened, its
    start recorded once. Returns its open renders."""
    return int(db.execute(_JOB_PLANNED, {
        "job": job_id, "new_status": status, "cursor": plan_cursor, "added": added,
        "now": now}).scalar_one())


def lock_job(db: Connection, job_id: int) -> None:
    db.execute(_LOCK_JOB, {"job": job_id})


def recount_open(db: Connection, job_id: int) -> int:
    """The job's open renders counted anew onto its row (lock it first: `lock_job`)."""
    return int(db.execute(_RECOUNT_OPEN, {"job": job_id}).scalar_one())


def set_shown(db: Connection, job_id: int, *, total: int, succeeded: int, failed: int,
              cancelled: int) -> None:
    """The item counters `status` shows set, and the job's files counted anew."""
    db.execute(_SET_SHOWN, {"job": job_id, "total": total, "succeeded": succeeded,
                            "failed": failed, "cancelled": cancelled})


def add_failed_items(db: Connection, job_id: int, count: int) -> None:
    db.execute(_ADD_FAILED, {"job": job_id, "failed": count})


def job_state(db: Connection, job_id: int) -> JobState | None:
    return cast("JobState | None", db.execute(_JOB_STATE, {"job": job_id}).one_or_none())


def set_job(db: Connection, job_id: int, *, status: str | Keep = KEEP,
            error: str | Keep | None = KEEP, finished_at: datetime | Keep | None = KEEP,
            plan_cursor: int | Keep | None = KEEP, sample_lines: int | Keep | None = KEEP
            ) -> None:
    """Set the job's columns given (a JobStatus value for `status`); the others stay."""
    given = {"status": status, "error": error, "finished_at": finished_at,
             "plan_cursor": plan_cursor, "sample_lines": sample_lines}
    db.execute(_SET_JOB, {"job": job_id,
                          **{column: value for column, value in given.items()
                             if value is not KEEP}})


def keep_open(db: Connection, job_id: int) -> None:
    """One more open render on the job: nothing closes it until a recount lets it go."""
    db.execute(_KEEP_OPEN, {"job": job_id})


def set_cap(db: Connection, job_id: int, cap_cents: int) -> bool:
    """The job's cap set, if it holds what the job has spent and reserved (else False)."""
    return bool(db.execute(_SET_CAP, {"job": job_id, "cap": cap_cents}).rowcount)


def spending(db: Connection, job_id: int) -> JobSpending | None:
    return cast("JobSpending | None", db.execute(_SPENDING, {"job": job_id}).one_or_none())


def unpause(db: Connection, job_id: int, cause: str) -> bool:
    """Running again, if it is paused with an error starting with `cause`."""
    return db.execute(_UNPAUSE, {"job": job_id, "cause": cause,
                                 "status": JobStatus.RUNNING.value,
                                 "error": None}).rowcount == 1


def mark_out_of_budget(db: Connection, job_id: int, reason: str) -> bool:
    """The running job's error set to `reason` (an OUT_OF_BUDGET one), unless it has one."""
    return db.execute(_MARK_OUT_OF_BUDGET, {"job": job_id, "reason": reason}).rowcount == 1


def marked_out_of_budget(db: Connection) -> list[MarkedJob]:
    return cast("list[MarkedJob]", list(db.execute(_MARKED_OUT_OF_BUDGET).all()))


# --- job_items --------------------------------------------------------------------------------


class ItemToPlan(Protocol):
    """A pending item as planning reads it (`items_after`); `meta` is its metadata."""

    id: int
    line: int
    custom_id: str | None
    body: str
    meta: str | None


class ItemChange(NamedTuple):
    """An item planned: its new status, and the reason when it failed."""

    item_id: int
    status: str
    reason: str | None


_ITEMS_AFTER = (
    select(_items.c.id, _items.c.line, _items.c.custom_id, _items.c.body,
           _items.c.metadata.label("meta"))
    .where(_items.c.job_id == bindparam("job"), _items.c.line > bindparam("cursor"),
           _items.c.status == ItemStatus.PENDING.value)
    .order_by(_items.c.line).limit(bindparam("chunk"))
)
_ITEM_PLANNED = update(_items).where(_items.c.id == bindparam("item")).values(
    status=bindparam("new_status"), error=bindparam("reason"))
# SQLite through the driver's own executemany: SQLAlchemy's handling of 2,000 parameter
# dicts cost a third of a chunk's time (1M items: 100 s of planning on a loaded machine).
_SQLITE_ITEM_PLANNED = "UPDATE job_items SET status = ?, error = ? WHERE id = ?"
# PostgreSQL: a chunk's items in one statement from arrays, not a statement per item (a
# 1,000,000-item job written with SQL was planned in 54.7 s).
_POSTGRES_ITEMS_PLANNED = (
    "UPDATE job_items SET status = u.status, error = u.reason "
    "FROM unnest(%(ids)s::int[], %(statuses)s::text[], %(reasons)s::text[]) "
    "AS u(id, status, reason) WHERE job_items.id = u.id")
_REPEATED_IDS = (
    select(_items.c.custom_id, func.min(_items.c.line))
    .where(_items.c.job_id == bindparam("job"), _items.c.custom_id.is_not(None))
    .group_by(_items.c.custom_id).having(func.count() > 1)
)
_FAIL_REPEATS = update(_items).where(
    _items.c.job_id == bindparam("job"), _items.c.custom_id == bindparam("cid"),
    _items.c.line != bindparam("first"), _items.c.status == ItemStatus.PENDING.value,
).values(status=ItemStatus.FAILED.value, error=bindparam("reason"))


def _close_items_where(which: ColumnElement[bool]) -> Any:
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
    open_renders = renders_of_item(_renders.c.status.in_(_OPEN_RENDER))
    # An item reaches its final status once: the job's counters count it then.
    not_final = _items.c.status.in_([ItemStatus.RUNNING.value, ItemStatus.PENDING.value])
    return (update(_items).where(which, not_final, has_renders, open_renders == 0)
            .values(status=final))


_CLOSE_ITEM = _close_items_where(_items.c.id == bindparam("item")).returning(_items.c.status)
_ITEMS_BY_STATUS = (select(_items.c.status, func.count())
                    .where(_items.c.job_id == bindparam("job")).group_by(_items.c.status))
# Items go by ranges of lines: (job_id, status, line) and (job_id, line) are both indexed, so
# each chunk reads its own rows only, whatever the job's size.
_LINE_RANGE = select(func.min(_items.c.line), func.max(_items.c.line)).where(
    _items.c.job_id == bindparam("job"))
_IN_RANGE = and_(_items.c.job_id == bindparam("job"), _items.c.line >= bindparam("lo"),
                 _items.c.line < bindparam("hi"))
_CANCEL_PENDING_ITEMS = update(_items).where(
    _IN_RANGE, _items.c.status == ItemStatus.PENDING.value,
).values(status=ItemStatus.CANCELLED.value, error="cancelled")
_CLOSE_RUNNING_ITEMS = _close_items_where(
    and_(_IN_RANGE, _items.c.status == ItemStatus.RUNNING.value))
# An item opened again: running when it has renders (queued again with it), else pending
# (it failed validation: it is planned again).
_REOPENED = case((exists().where(_renders.c.item_id == _items.c.id), ItemStatus.RUNNING.value),
                 else_=ItemStatus.PENDING.value)
_REOPEN_CANCELLED_ITEMS = update(_items).where(
    _IN_RANGE, _items.c.status == ItemStatus.CANCELLED.value,
).values(status=_REOPENED, error=None)
_REOPEN_ITEMS = update(_items).where(
    _items.c.id.in_(bindparam("items", expanding=True)),
).values(status=_REOPENED, error=None)
_ANY_PENDING_ITEM = select(_items.c.id).where(
    _items.c.job_id == bindparam("job"), status_is(_items.c.status, ItemStatus.PENDING.value)
).limit(1)
# The items each `retry` choice puts back.
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
RETRY_CHOICES = tuple(_RETRY_ITEMS)


def items_after(db: Connection, job_id: int, *, cursor: int, chunk: int
                ) -> Sequence[ItemToPlan]:
    """The job's next `chunk` pending items past line `cursor`, by line."""
    return cast("Sequence[ItemToPlan]", db.execute(_ITEMS_AFTER, {
        "job": job_id, "cursor": cursor, "chunk": chunk}).all())


def item_planned(db: Connection, item_id: int, status: str, reason: str | None) -> None:
    db.execute(_ITEM_PLANNED, {"item": item_id, "new_status": status, "reason": reason})


def items_planned(db: Connection, changes: Sequence[ItemChange]) -> None:
    """A chunk's items planned, in one round trip where the driver allows."""
    if not changes:
        return
    if db.dialect.name == "sqlite":
        db.exec_driver_sql(_SQLITE_ITEM_PLANNED, [
            (c.status, c.reason, c.item_id) for c in changes])
    elif db.dialect.name == "postgresql":
        db.exec_driver_sql(_POSTGRES_ITEMS_PLANNED, {
            "ids": [c.item_id for c in changes], "statuses": [c.status for c in changes],
            "reasons": [c.reason for c in changes]})
    else:
        db.execute(_ITEM_PLANNED, [{"item": c.item_id, "new_status": c.status,
                                    "reason": c.reason} for c in changes])


def repeated_custom_ids(db: Connection, job_id: int) -> list[tuple[str, int]]:
    """Each custom_id the job's items use more than once, with the first line using it."""
    return [(cid, first) for cid, first in db.execute(_REPEATED_IDS, {"job": job_id}).all()]


def fail_repeats(db: Connection, job_id: int, custom_id: str, *, first_line: int,
                 reason: str) -> None:
    """The job's pending items using `custom_id`, but for the one at `first_line`, failed."""
    db.execute(_FAIL_REPEATS, {"job": job_id, "cid": custom_id, "first": first_line,
                               "reason": reason})


def close_item(db: Connection, item_id: int) -> str | None:
    """The item's final status, once none of its renders is open (else None)."""
    return cast("str | None", db.execute(_CLOSE_ITEM, {"item": item_id}).scalar())


def items_by_status(db: Connection, job_id: int) -> dict[str, int]:
    return {status: count for status, count in
            db.execute(_ITEMS_BY_STATUS, {"job": job_id}).all()}


def line_range(db: Connection, job_id: int) -> tuple[int | None, int | None]:
    """The job's first and last item lines (None, None: it has no items)."""
    first, last = db.execute(_LINE_RANGE, {"job": job_id}).one()
    return first, last


def cancel_pending_items(db: Connection, job_id: int, lo: int, hi: int) -> None:
    """The job's pending items of lines lo <= line < hi cancelled."""
    db.execute(_CANCEL_PENDING_ITEMS, {"job": job_id, "lo": lo, "hi": hi})


def close_running_items(db: Connection, job_id: int, lo: int, hi: int) -> None:
    """The job's running items of lines lo <= line < hi whose renders all ended: closed."""
    db.execute(_CLOSE_RUNNING_ITEMS, {"job": job_id, "lo": lo, "hi": hi})


def reopen_cancelled_items(db: Connection, job_id: int, lo: int, hi: int) -> int:
    """The job's cancelled items of lines lo <= line < hi opened again; how many."""
    return db.execute(_REOPEN_CANCELLED_ITEMS, {"job": job_id, "lo": lo, "hi": hi}).rowcount


def reopen_items(db: Connection, item_ids: Sequence[int]) -> None:
    db.execute(_REOPEN_ITEMS, {"items": list(item_ids)})


def any_pending_item(db: Connection, job_id: int) -> bool:
    return db.execute(_ANY_PENDING_ITEM, {"job": job_id}).first() is not None


def items_to_retry(db: Connection, job_id: int, choices: Iterable[str]) -> list[int]:
    """The ids of the job's items any of `choices` (RETRY_CHOICES) puts back, in order."""
    chosen = set(choices)
    which = or_(*(_RETRY_ITEMS[c] for c in RETRY_CHOICES if c in chosen))
    return sorted(set(db.execute(
        select(_items.c.id).where(_items.c.job_id == job_id, which)).scalars()))


# --- renders ----------------------------------------------------------------------------------


class RenderRow(Protocol):
    """A renders row, as every statement here reads it."""

    id: int
    job_id: int
    item_id: int
    render_index: int
    model: str
    n: int
    seed: int | None
    price_per_image_cents: int
    status: str
    attempts: int
    retry_from: int
    lease_until: datetime | None
    enqueued_at: datetime | None
    deliveries: int
    error: str | None


class StartFacts(RenderRow, Protocol):
    """What an attempt needs to start, in one read (`start_facts`)."""

    job_status: str
    job_reuse: bool  # False: submitted with --no-reuse
    team: str
    line: int
    custom_id: str | None
    body: str
    team_period: str | None  # None: the team has no budget


class JobMoneyState(Protocol):
    status: str
    team: str
    budget_cents: int
    spent_cents: int
    reserved_cents: int


# FOR UPDATE locks the rows on PostgreSQL; SQLite's BEGIN IMMEDIATE already holds the
# database's one write lock. The render's item is locked with it: two renders of one item
# ending at once are ordered by it, so the later one's item status sees the earlier one's
# render committed.
_LOCK_RENDER_AND_ITEM = (
    select(_renders).join(_items, _items.c.id == _renders.c.item_id)
    .where(_renders.c.id == bindparam("render")).with_for_update(of=[_renders, _items])
)
_LOCK_ITEM = select(_items.c.id).where(_items.c.id == bindparam("item")).with_for_update()
_JOB_MONEY_STATE = select(_jobs.c.status, _jobs.c.team, _jobs.c.budget_cents,
                          _jobs.c.spent_cents, _jobs.c.reserved_cents
                          ).where(_jobs.c.id == bindparam("job"))
# Everything an attempt needs to start, in one read: the render (locked), its job's state,
# its item's request and its team's budget period (NULL: no team budget). FOR UPDATE OF
# locks the render's row only, never the hot job row.
_START_FACTS = (
    select(_renders, _jobs.c.status.label("job_status"), _jobs.c.reuse.label("job_reuse"),
           _jobs.c.team, _items.c.line,
           _items.c.custom_id, _items.c.body, _teams.c.period.label("team_period"))
    .join_from(_renders, _jobs, _jobs.c.id == _renders.c.job_id)
    .join(_items, _items.c.id == _renders.c.item_id)
    .outerjoin(_teams, and_(_teams.c.name == _jobs.c.team, _teams.c.budget_cents.is_not(None)))
    .where(_renders.c.id == bindparam("render"))
    .with_for_update(of=_renders)
)
# The request's key rides on the same UPDATE (NULL for a copy: only originals are reused).
_START_ATTEMPT = update(_renders).where(_renders.c.id == bindparam("render")).values(
    attempts=bindparam("number"), status=RenderStatus.RUNNING.value,
    lease_until=bindparam("lease"), deliveries=bindparam("delivered"),
    request_key=bindparam("key"))
_COUNT_DELIVERY = update(_renders).where(_renders.c.id == bindparam("render")).values(
    deliveries=bindparam("delivered"))
# The render its files were copied from (reuse.py) rides on the same UPDATE.
_END_RENDER = update(_renders).where(_renders.c.id == bindparam("render")).values(
    status=bindparam("new_status"), error=bindparam("message"), lease_until=None,
    reused_from=bindparam("reused_from"), request_id=bindparam("request_id"))
# `forgiven` (0 or 1): a 429 takes back its attempt, as a pause does (attempts.py).
_WAIT_FOR_RETRY = update(_renders).where(_renders.c.id == bindparam("render")).values(
    error=bindparam("message"), lease_until=bindparam("lease"),
    retry_from=_renders.c.retry_from + bindparam("forgiven"))
# Back in the SQL queue: the dispatcher sends it again once its job runs. `forgiven` (0 or 1)
# takes back an attempt released unsent and the delivery that began it: a pause costs the
# render neither an attempt of its MAX_ATTEMPTS (counted from retry_from) nor a delivery.
_BACK_TO_SQL_QUEUE = update(_renders).where(_renders.c.id == bindparam("render")).values(
    status=RenderStatus.QUEUED.value, enqueued_at=None, lease_until=None,
    retry_from=_renders.c.retry_from + bindparam("forgiven"),
    deliveries=_renders.c.deliveries - bindparam("forgiven"))
# Rows another transaction has locked are skipped, not waited for (PostgreSQL): a group
# commit settling several renders locks them in its own order, and waiting here deadlocked
# with it ("renewing render leases failed: deadlock detected" at 64 in flight). A render
# skipped is ending, or is renewed at the next beat, two more before its lease runs out.
_RENEW_LEASES = update(_renders).where(_renders.c.id.in_(
    select(_renders.c.id)
    .where(_renders.c.id.in_(bindparam("held", expanding=True)),
           _renders.c.status == RenderStatus.RUNNING.value)
    .with_for_update(skip_locked=True).scalar_subquery(),
)).values(lease_until=bindparam("until"))
# The status as a literal: it is the partial index's own condition (ix_renders_status_lease),
# which SQLite only matches written out.
_EXPIRED_LEASES = (select(_renders.c.id)
                   .where(status_is(_renders.c.status, RenderStatus.RUNNING.value),
                          _renders.c.lease_until < bindparam("now"))
                   .limit(bindparam("limit")))
# A render revived by the sweeper: back in the SQL queue, as if never sent.
_REQUEUE = update(_renders).where(_renders.c.id == bindparam("render")).values(
    status=RenderStatus.QUEUED.value, lease_until=None, enqueued_at=None)


def lock_render_and_item(db: Connection, render_id: int) -> RenderRow | None:
    return cast("RenderRow | None",
                db.execute(_LOCK_RENDER_AND_ITEM, {"render": render_id}).one_or_none())


def lock_item(db: Connection, item_id: int) -> None:
    db.execute(_LOCK_ITEM, {"item": item_id})


def job_money_state(db: Connection, job_id: int) -> JobMoneyState:
    return cast("JobMoneyState", db.execute(_JOB_MONEY_STATE, {"job": job_id}).one())


def start_facts(db: Connection, render_id: int) -> StartFacts | None:
    return cast("StartFacts | None",
                db.execute(_START_FACTS, {"render": render_id}).one_or_none())


def start_attempt(db: Connection, render_id: int, number: int, *, delivered: int,
                  lease_until: datetime, request_key: int | None = None) -> None:
    db.execute(_START_ATTEMPT, {"render": render_id, "number": number,
                                "delivered": delivered, "lease": lease_until,
                                "key": request_key})


def count_delivery(db: Connection, render_id: int, delivered: int) -> None:
    db.execute(_COUNT_DELIVERY, {"render": render_id, "delivered": delivered})


def end_render(db: Connection, render_id: int, status: RenderStatus, error: str | None, *,
               reused_from: int | None = None, request_id: str | None = None) -> None:
    db.execute(_END_RENDER, {"render": render_id, "new_status": status.value,
                             "message": error, "reused_from": reused_from,
                             "request_id": request_id})


def wait_for_retry(db: Connection, render_id: int, error: str, *, lease_until: datetime,
                   forgiven: bool) -> None:
    db.execute(_WAIT_FOR_RETRY, {"render": render_id, "message": error,
                                 "lease": lease_until, "forgiven": int(forgiven)})


def back_to_sql_queue(db: Connection, render_id: int, *, forgiven: bool) -> None:
    db.execute(_BACK_TO_SQL_QUEUE, {"render": render_id, "forgiven": int(forgiven)})


def renew_leases(db: Connection, render_ids: Sequence[int], until: datetime) -> int:
    """The running renders among `render_ids` leased until `until`; how many."""
    return db.execute(_RENEW_LEASES, {"held": list(render_ids), "until": until}).rowcount


def expired_leases(db: Connection, now: datetime, limit: int) -> list[int]:
    return list(db.execute(_EXPIRED_LEASES, {"now": now, "limit": limit}).scalars())


def requeue_render(db: Connection, render_id: int) -> None:
    db.execute(_REQUEUE, {"render": render_id})


# --- renders: seeded reuse (reuse.py) ---------------------------------------------------------


class ReuseCandidate(Protocol):
    """A render that succeeded with a request key, and what rebuilds its request."""

    id: int
    job_id: int
    render_index: int
    n: int
    seed: int | None
    body: str
    price_per_image_cents: int  # what its delivering attempt was charged per image


class StoredImage(Protocol):
    image_index: int
    key: str
    content_type: str
    bytes: int
    sha256: str
    width: int | None
    height: int | None
    seed: int | None
    revised_prompt: str | None


# The condition of ix_renders_request_key written out (SQLite matches a partial index only
# from its own terms); newest first: its files are the likeliest to be still stored.
_REUSE_CANDIDATES = (
    select(_renders.c.id, _renders.c.job_id, _renders.c.render_index, _renders.c.n,
           _renders.c.seed, _items.c.body, _attempts.c.price_per_image_cents)
    .join(_items, _items.c.id == _renders.c.item_id)
    .join(_attempts, and_(_attempts.c.render_id == _renders.c.id,
                          _attempts.c.number == _renders.c.attempts))
    .where(_renders.c.request_key == bindparam("key"),
           status_is(_renders.c.status, RenderStatus.SUCCEEDED.value),
           _renders.c.request_key.is_not(None), _renders.c.id != bindparam("render"))
    .order_by(_renders.c.id.desc()).limit(bindparam("limit", type_=Integer))
)
_IMAGES_OF_RENDER = (
    select(_images.c.image_index, _images.c.key, _images.c.content_type, _images.c.bytes,
           _images.c.sha256, _images.c.width, _images.c.height, _images.c.seed,
           _images.c.revised_prompt)
    .where(_images.c.render_id == bindparam("render")).order_by(_images.c.image_index)
)


def reuse_candidates(db: Connection, key: int, render_id: int, limit: int
                     ) -> list[ReuseCandidate]:
    """Up to `limit` succeeded renders other than `render_id` whose request key is `key`."""
    return cast("list[ReuseCandidate]", list(db.execute(_REUSE_CANDIDATES, {
        "key": key, "render": render_id, "limit": limit}).all()))


def images_of_render(db: Connection, render_id: int) -> list[StoredImage]:
    return cast("list[StoredImage]",
                list(db.execute(_IMAGES_OF_RENDER, {"render": render_id}).all()))


# --- renders: planning, pause, cancel, resume, retry (in chunks of a job) ---------------------

# The columns of a planned render, in the order of the rows `insert_renders` takes.
RENDER_COLUMNS = ("job_id", "item_id", "render_index", "model", "n", "seed",
                  "price_per_image_cents", "status", "enqueued_at")
_INSERT_RENDERS = insert(_renders)
_SQLITE_INSERT_RENDERS = (f"INSERT INTO renders ({', '.join(RENDER_COLUMNS)}) "
                          f"VALUES ({', '.join('?' * len(RENDER_COLUMNS))})")
_COPY_RENDERS = f"COPY renders ({', '.join(RENDER_COLUMNS)}) FROM STDIN"
_QUEUED, _CANCELLED = RenderStatus.QUEUED.value, RenderStatus.CANCELLED.value


# Each chunk picks its rows through ix_renders_job_queue (job_id, status); the outer WHERE
# checks the status again, so a render that started meanwhile is left alone (PostgreSQL
# re-reads a row changed under it against the outer WHERE only).
def _renders_of_job(status: str, *conditions: ColumnElement[bool]) -> Any:
    chosen = (select(_renders.c.id)
              .where(_renders.c.job_id == bindparam("job"), status_is(_renders.c.status, status),
                     *conditions)
              .limit(bindparam("chunk")))
    return update(_renders).where(_renders.c.id.in_(chosen), _renders.c.status == status)


_CANCEL_QUEUED = _renders_of_job(_QUEUED).values(status=_CANCELLED, error="cancelled")
_FAIL_QUEUED = _renders_of_job(_QUEUED).values(
    status=RenderStatus.FAILED.value, error=bindparam("reason"))
# Queued again as new: a fresh attempt budget (the limit counts from `retry_from`), no
# deliveries, no message sent.
_AS_NEW = {"status": _QUEUED, "retry_from": _renders.c.attempts, "deliveries": 0,
           "error": None, "enqueued_at": None, "lease_until": None}
_RESTORE_CANCELLED = _renders_of_job(
    _CANCELLED,
    # Renders of items that did not end otherwise: a failed item stays failed (`retry`).
    select(_items.c.status).where(_items.c.id == _renders.c.item_id).scalar_subquery().in_(
        [ItemStatus.CANCELLED.value, ItemStatus.RUNNING.value]),
).values(**_AS_NEW)
_FORGET_SENT = _renders_of_job(_QUEUED, _renders.c.enqueued_at.is_not(None)).values(
    enqueued_at=None)
_REQUEUE_RENDERS_OF_ITEMS = update(_renders).where(
    _renders.c.item_id.in_(bindparam("items", expanding=True)),
    _renders.c.status.in_([RenderStatus.FAILED.value, _CANCELLED]),
).values(**_AS_NEW)
_RUNNING_RENDERS = select(func.count()).select_from(_renders).where(
    _renders.c.job_id == bindparam("job"), status_is(_renders.c.status, RenderStatus.RUNNING.value))
_QUEUED_OF_JOB = (_renders.c.job_id == bindparam("job"), status_is(_renders.c.status, _QUEUED))
_ANY_QUEUED = select(exists().where(*_QUEUED_OF_JOB))
_ANY_QUEUED_FITS = select(exists().where(
    *_QUEUED_OF_JOB, _renders.c.n * _renders.c.price_per_image_cents <= bindparam("left")))


def insert_renders(db: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Renders in bulk, each row in RENDER_COLUMNS' order: the driver's own executemany on
    SQLite, COPY on PostgreSQL (Core's executemany of one dict a row was 40 % of a
    submission there)."""
    if not rows:
        return
    if db.dialect.name == "sqlite":
        db.exec_driver_sql(_SQLITE_INSERT_RENDERS, list(rows))
    elif db.dialect.name == "postgresql" and db.dialect.driver == "psycopg":
        with db.connection.driver_connection.cursor() as cursor, \
                cursor.copy(_COPY_RENDERS) as copy:
            for row in rows:
                copy.write_row(row)
    else:
        db.execute(_INSERT_RENDERS, [dict(zip(RENDER_COLUMNS, row, strict=True))
                                     for row in rows])


def cancel_queued_renders(db: Connection, job_id: int, *, chunk: int) -> int:
    """Up to `chunk` of the job's queued renders cancelled; how many."""
    return db.execute(_CANCEL_QUEUED, {"job": job_id, "chunk": chunk}).rowcount


def fail_queued_renders(db: Connection, job_id: int, reason: str, *, chunk: int) -> int:
    """Up to `chunk` of the job's queued renders failed with `reason`; how many."""
    return db.execute(_FAIL_QUEUED, {"job": job_id, "chunk": chunk, "reason": reason}).rowcount


def restore_cancelled_renders(db: Connection, job_id: int, *, chunk: int) -> int:
    """Up to `chunk` cancelled renders of the job's unfinished items queued again as new."""
    return db.execute(_RESTORE_CANCELLED, {"job": job_id, "chunk": chunk}).rowcount


def forget_sent_renders(db: Connection, job_id: int, *, chunk: int) -> int:
    """Up to `chunk` of the job's queued renders whose message was sent back to unsent."""
    return db.execute(_FORGET_SENT, {"job": job_id, "chunk": chunk}).rowcount


def requeue_renders_of_items(db: Connection, item_ids: Sequence[int]) -> None:
    """The failed and cancelled renders of these items queued again as new."""
    db.execute(_REQUEUE_RENDERS_OF_ITEMS, {"items": list(item_ids)})


def renders_running(db: Connection, job_id: int) -> int:
    return int(db.execute(_RUNNING_RENDERS, {"job": job_id}).scalar_one())


def any_queued(db: Connection, job_id: int) -> bool:
    return bool(db.execute(_ANY_QUEUED, {"job": job_id}).scalar())


def any_queued_fits(db: Connection, job_id: int, left_cents: int) -> bool:
    """Some queued render of the job costs at most `left_cents`."""
    return bool(db.execute(_ANY_QUEUED_FITS, {"job": job_id, "left": left_cents}).scalar())


# --- renders: the SQL queue -------------------------------------------------------------------


class LatestStart(Protocol):
    """When the latest attempt started, and when its render was sent (`latest_start`)."""

    started_at: datetime
    enqueued_at: datetime | None


_RUNNING_JOBS = (select(_jobs.c.id).where(_jobs.c.status == JobStatus.RUNNING.value)
                 .order_by(_jobs.c.id))
_RUNNING_JOB = _RUNNING_JOBS.where(_jobs.c.id == bindparam("job"))
_SENT_NOT_STARTED = (
    select(func.count()).select_from(_renders)
    .where(_renders.c.job_id.in_(bindparam("jobs", expanding=True)),
           status_is(_renders.c.status, _QUEUED), _renders.c.enqueued_at.is_not(None))
)
_NEXT_UNSENT = (
    select(_renders.c.id)
    .where(_renders.c.job_id == bindparam("job"), status_is(_renders.c.status, _QUEUED),
           _renders.c.enqueued_at.is_(None))
    # In the index's own order (the same as by id under these equalities): ordered by id
    # alone, PostgreSQL walked the primary key and filtered out every render already done
    # (33.6 ms a feed at 300,000 done, against 0.18 ms through ix_renders_job_queue).
    .order_by(_renders.c.job_id, _renders.c.status, _renders.c.enqueued_at, _renders.c.id)
    .limit(bindparam("take"))
)
# PostgreSQL: two feeders at once take different renders instead of waiting on each other.
_NEXT_UNSENT_SKIP_LOCKED = _NEXT_UNSENT.with_for_update(skip_locked=True)
# By id alone: the transaction that read them as unsent holds them (SQLite's write lock,
# PostgreSQL's row locks). A status condition here made SQLite walk every queued render of
# the status index (180 ms for 20 renders behind a 1,000,000-render job).
_MARK_SENT = (update(_renders).where(_renders.c.id.in_(bindparam("ids", expanding=True)))
              .values(enqueued_at=bindparam("now")))
_LATEST_START = (
    select(_attempts.c.started_at, _renders.c.enqueued_at)
    .join(_renders, _renders.c.id == _attempts.c.render_id)
    .order_by(_attempts.c.id.desc()).limit(1)
)
_LOST = (select(_renders.c.id)
         .where(status_is(_renders.c.status, _QUEUED),
                _renders.c.enqueued_at < bindparam("cutoff"),
                _renders.c.job_id.in_(_RUNNING_JOBS.scalar_subquery()))
         .limit(bindparam("limit", type_=Integer)).scalar_subquery())
_UNSEND_LOST = (update(_renders).where(_renders.c.id.in_(_LOST), _renders.c.status == _QUEUED)
                .values(enqueued_at=None))
# The live workers' render slots size the broker's window.
_LIVE_SLOTS = (select(func.coalesce(func.sum(_workers.c.slots), 0))
               .where(_workers.c.seen_at >= bindparam("since")))
_SEEN_WORKER = (update(_workers).where(_workers.c.name == bindparam("worker"))
                .values(slots=bindparam("n_slots"), seen_at=bindparam("now")))
_NEW_WORKER = insert(_workers).values(name=bindparam("worker"), slots=bindparam("n_slots"),
                                      seen_at=bindparam("now"))
_FORGET_WORKER = delete(_workers).where(_workers.c.name == bindparam("worker"))


def running_jobs(db: Connection, only_job: int | None = None) -> list[int]:
    """The running jobs' ids, oldest first (with `only_job`, that one if it runs)."""
    if only_job is None:
        return list(db.execute(_RUNNING_JOBS).scalars())
    return list(db.execute(_RUNNING_JOB, {"job": only_job}).scalars())


def sent_not_started(db: Connection, job_ids: Sequence[int]) -> int:
    """These jobs' renders whose message is sent and not started: the broker's share."""
    return int(db.execute(_SENT_NOT_STARTED, {"jobs": list(job_ids)}).scalar_one())


def next_unsent(db: Connection, job_id: int, take: int) -> list[int]:
    """The job's first `take` queued renders not sent yet, locked where the database can
    skip the rows another feeder holds."""
    query = _NEXT_UNSENT_SKIP_LOCKED if db.dialect.name == "postgresql" else _NEXT_UNSENT
    return list(db.execute(query, {"job": job_id, "take": take}).scalars())


def mark_sent(db: Connection, render_ids: Sequence[int], now: datetime) -> None:
    db.execute(_MARK_SENT, {"ids": list(render_ids), "now": now})


def latest_start(db: Connection) -> LatestStart | None:
    return cast("LatestStart | None", db.execute(_LATEST_START).one_or_none())


def unsend_lost(db: Connection, *, sent_before: datetime, limit: int) -> int:
    """Up to `limit` queued renders of running jobs sent before `sent_before` back to
    unsent; how many."""
    return db.execute(_UNSEND_LOST, {"cutoff": sent_before, "limit": limit}).rowcount


def live_slots(db: Connection, since: datetime) -> int:
    """The render slots of the workers seen since `since`."""
    return int(db.execute(_LIVE_SLOTS, {"since": since}).scalar() or 0)


def announce_worker(db: Connection, name: str, slots: int, now: datetime) -> None:
    """The worker seen now with `slots` render slots (its row made if new)."""
    values = {"worker": name, "n_slots": slots, "now": now}
    if not db.execute(_SEEN_WORKER, values).rowcount:
        db.execute(_NEW_WORKER, values)


def forget_worker(db: Connection, name: str) -> None:
    db.execute(_FORGET_WORKER, {"worker": name})


# --- attempts ---------------------------------------------------------------------------------


class ClaimedAttempt(Protocol):
    render_id: int
    amount_cents: int
    team: str
    team_budget_id: int | None
    price_per_image_cents: int


class AttemptRow(Protocol):
    id: int
    number: int
    outcome: str
    sent_at: datetime | None


_INSERT_ATTEMPT = insert(_attempts).returning(_attempts.c.id)
# The guard `outcome = 'reserved'` makes settling exactly-once.
_CLAIM_ATTEMPT = (
    update(_attempts)
    .where(_attempts.c.id == bindparam("attempt"),
           _attempts.c.outcome == AttemptOutcome.RESERVED.value)
    .values(outcome=bindparam("new_outcome"), settled_at=bindparam("now"),
            http_status=bindparam("status"), error=bindparam("message"))
    .returning(_attempts.c.render_id, _attempts.c.amount_cents, _attempts.c.team,
               _attempts.c.team_budget_id, _attempts.c.price_per_image_cents)
)
# The send, recorded before the call, in one statement while the job still runs (one round
# trip for every render that goes on). No row: the job is not running, or the attempt was
# settled already (its lease ran out and the sweeper took it).
_RECORD_SEND = (
    update(_attempts)
    .where(_attempts.c.id == bindparam("attempt"),
           _attempts.c.outcome == AttemptOutcome.RESERVED.value,
           select(_jobs.c.status).where(_jobs.c.id == bindparam("job")).scalar_subquery()
           == JobStatus.RUNNING.value)
    .values(sent_at=bindparam("now"))
)
# The row is locked before its send is read: see ledger.settle_abandoned_attempt.
_LOCK_LAST_ATTEMPT = (
    select(_attempts.c.id, _attempts.c.number, _attempts.c.outcome, _attempts.c.sent_at)
    .where(_attempts.c.render_id == bindparam("render"))
    .order_by(_attempts.c.number.desc()).limit(1).with_for_update()
)


def insert_attempt(db: Connection, *, render_id: int, number: int, amount_cents: int,
                   started_at: datetime, sent_at: datetime | None, team: str,
                   team_budget_id: int | None, price_per_image_cents: int) -> int:
    """A reserved attempt's row; its id."""
    return int(db.execute(_INSERT_ATTEMPT, {
        "render_id": render_id, "number": number, "amount_cents": amount_cents,
        "started_at": started_at, "sent_at": sent_at, "team": team,
        "team_budget_id": team_budget_id, "price_per_image_cents": price_per_image_cents,
    }).scalar_one())


def claim_attempt(db: Connection, attempt_id: int, outcome: AttemptOutcome, now: datetime, *,
                  http_status: int | None, error: str | None) -> ClaimedAttempt | None:
    """The attempt settled as `outcome`, or None if it was settled already."""
    return cast("ClaimedAttempt | None", db.execute(_CLAIM_ATTEMPT, {
        "attempt": attempt_id, "new_outcome": outcome.value, "now": now,
        "status": http_status, "message": error}).one_or_none())


def record_send(db: Connection, attempt_id: int, job_id: int, now: datetime) -> bool:
    """The send recorded, if the attempt is still reserved and its job still running."""
    return db.execute(_RECORD_SEND, {"attempt": attempt_id, "job": job_id,
                                     "now": now}).rowcount == 1


def lock_last_attempt(db: Connection, render_id: int) -> AttemptRow | None:
    return cast("AttemptRow | None",
                db.execute(_LOCK_LAST_ATTEMPT, {"render": render_id}).one_or_none())


# --- ledger and the budgets' counters (jobs, team_budgets) ------------------------------------

# The job's counters that `status` shows, moved with its money (ledger.item_ended,
# ledger.files_stored).
SHOWN = ("items_succeeded", "items_failed", "items_cancelled", "images")


def _moved(table: Table) -> dict[str, ColumnElement[Any]]:
    """The counters of a job or team budget row, each moved by its delta."""
    return {"reserved_cents": table.c.reserved_cents + bindparam("d_reserved"),
            "spent_cents": table.c.spent_cents + bindparam("d_spent"),
            "unknown_cents": table.c.unknown_cents + bindparam("d_unknown")}


def _fits(table: Table, limit: ColumnElement[Any]) -> ColumnElement[bool]:
    """The budget condition, the only one: spent + reserved, as the row's moves leave it,
    within `limit`. A settlement never raises spent + reserved, so with holds among the
    moves it is what they need; alone, a hold is a move of its amount into reserved."""
    return (table.c.spent_cents + table.c.reserved_cents + bindparam("d_spent")
            + bindparam("d_reserved")) <= limit


# The job's row is every render's hot row: on PostgreSQL each UPDATE of it leaves a dead
# version behind, so a settlement that also ends its render takes the render off the job's
# open count in the same UPDATE (d_open) rather than in one more. The UPDATE takes the
# row's lock (FOR NO KEY UPDATE, as any UPDATE of non-key columns), which orders the last
# renders of a job: the later sees the earlier's count, so exactly one finds zero and
# closes the job.
_MOVE_JOB = (
    update(_jobs).where(_jobs.c.id == bindparam("job"))
    .values(**_moved(_jobs), open_renders=_jobs.c.open_renders + bindparam("d_open"),
            # What `status` shows rides on the same UPDATE: items ended, files stored.
            **{column: _jobs.c[column] + bindparam(f"d_{column}") for column in SHOWN})
    # Spent and cap after the move: a spend crossing (pipeline/webhooks.py) is computed
    # from them, with no read of its own.
    .returning(_jobs.c.open_renders, _jobs.c.spent_cents, _jobs.c.budget_cents)
)
_MOVE_TEAM = update(_budgets).where(_budgets.c.id == bindparam("budget")).values(
    **_moved(_budgets)).returning(
    _budgets.c.spent_cents,
    select(_teams.c.budget_cents).where(_teams.c.name == _budgets.c.team).scalar_subquery())
# Holds with the moves, in one statement, conditional on the row's state after all of them
# (and, for a job, on it running).
_HOLD_AND_MOVE_JOB = _MOVE_JOB.where(
    _jobs.c.status == JobStatus.RUNNING.value, _fits(_jobs, _jobs.c.budget_cents))
# The team's limit is read inside the statement, so lowering it takes effect at once.
_HOLD_AND_MOVE_TEAM = _MOVE_TEAM.where(_fits(
    _budgets,
    # Not "team": an UPDATE of team_budgets keeps its columns' names for its SET clause.
    select(_teams.c.budget_cents).where(_teams.c.name == bindparam("team_name"))
    .scalar_subquery()))
_INSERT_LEDGER = insert(_ledger)
_RENDER_FACTS = select(_renders.c.job_id, _renders.c.model, _renders.c.n).where(
    _renders.c.id == bindparam("render"))
_TEAM_LIMIT = select(_teams.c.budget_cents, _teams.c.period).where(
    _teams.c.name == bindparam("team"))
_PERIOD_ROW = select(_budgets.c.id).where(
    _budgets.c.team == bindparam("team"), _budgets.c.period_start == bindparam("start"))


class TeamLimit(Protocol):
    budget_cents: int | None
    period: str


class Moved(NamedTuple):
    """A job's or team budget's row after a move: `open_renders` (a job's; 0 for a team's),
    what it has spent, and its limit (a job's cap, a team's period budget; None: none)."""

    open_renders: int
    spent_cents: int
    limit_cents: int | None


def move_job(db: Connection, job_id: int, *, reserved: int = 0, spent: int = 0,
             unknown: int = 0, open_renders: int = 0, shown: Mapping[str, int] | None = None,
             holds: bool = False) -> int | None:
    """Move the job's counters by these deltas; its open renders after. With `holds`, only
    if the job runs and its cap holds spent + reserved after the moves: None when not."""
    moved = moved_job(db, job_id, reserved=reserved, spent=spent, unknown=unknown,
                      open_renders=open_renders, shown=shown, holds=holds)
    return None if moved is None else moved.open_renders


def moved_job(db: Connection, job_id: int, *, reserved: int = 0, spent: int = 0,
              unknown: int = 0, open_renders: int = 0, shown: Mapping[str, int] | None = None,
              holds: bool = False) -> Moved | None:
    """`move_job`, returning the job's row after it (None when a hold did not fit)."""
    shown = shown or {}
    row = db.execute(_HOLD_AND_MOVE_JOB if holds else _MOVE_JOB, {
        "job": job_id, "d_reserved": reserved, "d_spent": spent, "d_unknown": unknown,
        "d_open": open_renders, **{f"d_{column}": shown.get(column, 0) for column in SHOWN},
    }).first()
    return None if row is None else Moved(row[0], row[1], row[2])


def move_team_budget(db: Connection, budget_id: int, team: str, *, reserved: int = 0,
                     spent: int = 0, unknown: int = 0, holds: bool = False) -> bool:
    """Move the team budget row's counters; with `holds`, only if the team's limit holds
    spent + reserved after the moves (False when not)."""
    return moved_team_budget(db, budget_id, team, reserved=reserved, spent=spent,
                             unknown=unknown, holds=holds) is not None


def moved_team_budget(db: Connection, budget_id: int, team: str, *, reserved: int = 0,
                      spent: int = 0, unknown: int = 0, holds: bool = False) -> Moved | None:
    """`move_team_budget`, returning the row after it (None when a hold did not fit)."""
    row = db.execute(_HOLD_AND_MOVE_TEAM if holds else _MOVE_TEAM, {
        "budget": budget_id, "team_name": team, "d_reserved": reserved, "d_spent": spent,
        "d_unknown": unknown}).first()
    return None if row is None else Moved(0, row[0], row[1])


def ledger_entry(*, job_id: int, render_id: int, attempt_id: int, team_budget_id: int | None,
                 team: str, model: str, kind: str, amount_cents: int, images: int,
                 price_per_image_cents: int, created_at: datetime) -> dict[str, Any]:
    """A ledger row, for `insert_ledger`."""
    return {"job_id": job_id, "render_id": render_id, "attempt_id": attempt_id,
            "team_budget_id": team_budget_id, "team": team, "model": model, "kind": kind,
            "amount_cents": amount_cents, "images": images,
            "price_per_image_cents": price_per_image_cents, "created_at": created_at}


def insert_ledger(db: Connection, entries: list[dict[str, Any]]) -> None:
    """Rows of `ledger_entry`, in one INSERT: the ledger is only ever appended to."""
    db.execute(_INSERT_LEDGER, entries)


def render_facts(db: Connection, render_id: int) -> tuple[int, str, int]:
    """The render's job id, model and n."""
    job_id, model, n = db.execute(_RENDER_FACTS, {"render": render_id}).one()
    return job_id, model, n


def team_limit(db: Connection, team: str) -> TeamLimit | None:
    return cast("TeamLimit | None", db.execute(_TEAM_LIMIT, {"team": team}).first())


def period_row(db: Connection, team: str, start: datetime, end: datetime | None) -> int:
    """The id of the team's budget row for the period starting at `start`, made if new."""
    found = db.execute(_PERIOD_ROW, {"team": team, "start": start}).scalar()
    if found is not None:
        return int(found)
    if db.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    # Two workers opening the same new period at once: one insert wins, both read its id.
    db.execute(upsert(_budgets).values(team=team, period_start=start, period_end=end)
               .on_conflict_do_nothing(index_elements=["team", "period_start"]))
    return int(db.execute(_PERIOD_ROW, {"team": team, "start": start}).scalar_one())


# --- images -----------------------------------------------------------------------------------

_INSERT_IMAGES = insert(_images)
_DELETE_IMAGES = delete(_images).where(_images.c.render_id == bindparam("render")).returning(
    _images.c.key)


def image_row(*, job_id: int, render_id: int, image_index: int, key: str, content_type: str,
              size: int, sha256: str, width: int | None, height: int | None, seed: int | None,
              revised_prompt: str | None, cost_cents: int) -> dict[str, Any]:
    """An images row, for `insert_images`."""
    return {"job_id": job_id, "render_id": render_id, "image_index": image_index, "key": key,
            "content_type": content_type, "bytes": size, "sha256": sha256, "width": width,
            "height": height, "seed": seed, "revised_prompt": revised_prompt,
            "cost_cents": cost_cents}


def insert_images(db: Connection, rows: list[dict[str, Any]]) -> None:
    db.execute(_INSERT_IMAGES, rows)


def delete_images(db: Connection, render_id: int) -> list[str]:
    """The render's image rows deleted; the storage keys they described."""
    return list(db.execute(_DELETE_IMAGES, {"render": render_id}).scalars())


# --- workers ----------------------------------------------------------------------------------
