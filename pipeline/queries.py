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

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    insert,
    select,
    update,
)

from pipeline.models import (
    Attempt,
    AttemptOutcome,
    Image,
    Job,
    JobItem,
    JobStatus,
    LedgerEntry,
    Render,
    RenderStatus,
    Team,
    TeamBudget,
    status_is,
)

_jobs, _items, _renders = Job.__table__, JobItem.__table__, Render.__table__
_attempts, _ledger, _images = Attempt.__table__, LedgerEntry.__table__, Image.__table__
_teams, _budgets = Team.__table__, TeamBudget.__table__

# --- jobs -------------------------------------------------------------------------------------

# --- job_items --------------------------------------------------------------------------------

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
    select(_renders, _jobs.c.status.label("job_status"), _jobs.c.team, _items.c.line,
           _items.c.custom_id, _items.c.body, _teams.c.period.label("team_period"))
    .join_from(_renders, _jobs, _jobs.c.id == _renders.c.job_id)
    .join(_items, _items.c.id == _renders.c.item_id)
    .outerjoin(_teams, and_(_teams.c.name == _jobs.c.team, _teams.c.budget_cents.is_not(None)))
    .where(_renders.c.id == bindparam("render"))
    .with_for_update(of=_renders)
)
_START_ATTEMPT = update(_renders).where(_renders.c.id == bindparam("render")).values(
    attempts=bindparam("number"), status=RenderStatus.RUNNING.value,
    lease_until=bindparam("lease"), deliveries=bindparam("delivered"))
_COUNT_DELIVERY = update(_renders).where(_renders.c.id == bindparam("render")).values(
    deliveries=bindparam("delivered"))
_END_RENDER = update(_renders).where(_renders.c.id == bindparam("render")).values(
    status=bindparam("new_status"), error=bindparam("message"), lease_until=None)
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
                  lease_until: datetime) -> None:
    db.execute(_START_ATTEMPT, {"render": render_id, "number": number,
                                "delivered": delivered, "lease": lease_until})


def count_delivery(db: Connection, render_id: int, delivered: int) -> None:
    db.execute(_COUNT_DELIVERY, {"render": render_id, "delivered": delivered})


def end_render(db: Connection, render_id: int, status: RenderStatus, error: str | None) -> None:
    db.execute(_END_RENDER, {"render": render_id, "new_status": status.value,
                             "message": error})


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


# --- renders: planning, pause, cancel, resume, retry (in chunks of a job) ---------------------

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
    .returning(_jobs.c.open_renders)
)
_MOVE_TEAM = update(_budgets).where(_budgets.c.id == bindparam("budget")).values(
    **_moved(_budgets))
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


def move_job(db: Connection, job_id: int, *, reserved: int = 0, spent: int = 0,
             unknown: int = 0, open_renders: int = 0, shown: Mapping[str, int] | None = None,
             holds: bool = False) -> int | None:
    """Move the job's counters by these deltas; its open renders after. With `holds`, only
    if the job runs and its cap holds spent + reserved after the moves: None when not."""
    shown = shown or {}
    return db.execute(_HOLD_AND_MOVE_JOB if holds else _MOVE_JOB, {
        "job": job_id, "d_reserved": reserved, "d_spent": spent, "d_unknown": unknown,
        "d_open": open_renders, **{f"d_{column}": shown.get(column, 0) for column in SHOWN},
    }).scalar()


def move_team_budget(db: Connection, budget_id: int, team: str, *, reserved: int = 0,
                     spent: int = 0, unknown: int = 0, holds: bool = False) -> bool:
    """Move the team budget row's counters; with `holds`, only if the team's limit holds
    spent + reserved after the moves (False when not)."""
    return db.execute(_HOLD_AND_MOVE_TEAM if holds else _MOVE_TEAM, {
        "budget": budget_id, "team_name": team, "d_reserved": reserved, "d_spent": spent,
        "d_unknown": unknown}).rowcount == 1


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
              revised_prompt: str | None, cost_cents: int, created_at: datetime
              ) -> dict[str, Any]:
    """An images row, for `insert_images`."""
    return {"job_id": job_id, "render_id": render_id, "image_index": image_index, "key": key,
            "content_type": content_type, "bytes": size, "sha256": sha256, "width": width,
            "height": height, "seed": seed, "revised_prompt": revised_prompt,
            "cost_cents": cost_cents, "created_at": created_at}


def insert_images(db: Connection, rows: list[dict[str, Any]]) -> None:
    db.execute(_INSERT_IMAGES, rows)


def delete_images(db: Connection, render_id: int) -> list[str]:
    """The render's image rows deleted; the storage keys they described."""
    return list(db.execute(_DELETE_IMAGES, {"render": render_id}).scalars())


# --- workers ----------------------------------------------------------------------------------
