"""Money: every reservation and every settlement, on the job's cap and its team's period.

A reservation (`reserve`) holds an attempt's full price (n x price per image) on the job and
on its team's current period budget, or on neither: each hold is one conditional UPDATE,
`spent + reserved + amount <= limit` (`queries._fits`, the one budget condition), and it writes the
attempt's row and a `reserve` ledger row in the same transaction.

A settlement is claimed once (`claim_settlement`: the attempt's UPDATE guarded by
`outcome = 'reserved'`, so whoever comes second finds nothing) and applied
(`apply_settlement`): a `charge`, `release` or `unknown` ledger row and the counters it
explains. Where each path settles:
- usual: render.finish_attempt claims the attempt it called for (charged when a result came
  back, released on a definite refusal, unknown otherwise) and applies it with the render's
  end or its wait for a retry;
- grouped: inside a committer's group (groupcommit.py) the holds and the counter moves of all
  its works gather in one `Moves`, applied at the group's end: one UPDATE per hot row; a hold
  that does not fit there rolls the group back (`HoldRefused`), and each work runs alone;
- not sent: render.record_send releases the attempt when its job was paused or cancelled
  before the call;
- lost worker: `settle_abandoned_attempt` (from render.begin_attempt and sweep.py) releases
  an attempt whose send was never recorded, and charges one that was as unknown;
- cancel: jobs.begin_cancel stops new sends (record_send then releases); the attempts in
  flight settle on the usual path;
- reused (reuse.py): an attempt that copies an earlier render's files holds nothing
  (`reserve_nothing`: a 0-cent reservation, no budget touched) and settles `reused` at 0
  cents once its files are copied, or is released (0) if the copy fails.

Every function here runs inside the caller's transaction, so the money commits with the
render state it belongs to. Counters on `jobs` and `team_budgets` move in the same
transaction as the append-only `ledger` row that explains them. A job whose last open render
ends here is handed to the jobs module (`when_drained`): closing a job is its business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline import queries
from pipeline.groupcommit import at_group_end
from pipeline.models import (
    AttemptOutcome,
    LedgerEntry,
    LedgerKind,
    utcnow,
)
from pipeline.teams import UNREAD, current_team_budget


@dataclass(frozen=True)
class Reservation:
    attempt_id: int
    number: int
    amount_cents: int
    team_budget_id: int | None


# The job's counters that `status` shows, and the item counter for each final status.
SHOWN = queries.SHOWN
ITEM_COUNTER = {"succeeded": "items_succeeded", "failed": "items_failed",
                "cancelled": "items_cancelled"}


class RenderLike(Protocol):
    """What the ledger needs of a render: an ORM Render or a row of the renders table."""

    id: int
    job_id: int
    model: str
    n: int
    price_per_image_cents: int
    attempts: int


# Who closes a job whose last open render ended (jobs.close_job_if_done, registered by the
# jobs module): given the session and the job's id, with the job's row locked.
_drained: list[Callable[[Session, int], object]] = []


def when_drained(close: Callable[[Session, int], object]) -> None:
    """Have `close(session, job_id)` called, in the same transaction, for every job whose
    open renders reach zero in a move of this module."""
    _drained.append(close)


@dataclass(frozen=True)
class SpendMoved:
    """A budget's spend went up in a move: the job's cap (`team_budget_id` None) or a team's
    period budget (`jobs`: the jobs whose settlements moved it). Read from the row the move's
    own UPDATE returned: watching spend costs no statement."""

    job_id: int  # the job (for a team's budget: the first of `jobs`)
    team_budget_id: int | None
    before_cents: int
    after_cents: int
    limit_cents: int | None
    jobs: tuple[int, ...] = ()


# Who watches spend (pipeline/webhooks.py tells crossings of 50/80/100 %): called in the
# same transaction as the move, after the rows moved.
_spent: list[Callable[[Session, SpendMoved], object]] = []


def when_spent(watch: Callable[[Session, SpendMoved], object]) -> None:
    """Have `watch(session, moved)` called, in the same transaction, for every move of this
    module that raises a job's or a team period's spend."""
    _spent.append(watch)


class HoldRefused(Exception):
    """A budget could not hold a group's holds at its end: the group must roll back, and
    its renders be tried again one by one, each with its holds first."""


@dataclass
class _RowMove:
    d_reserved: int = 0
    d_spent: int = 0
    d_unknown: int = 0
    d_open: int = 0
    holds: bool = False  # conditional on the budget (and, for a job, on it running)
    team: str = ""
    shown: dict[str, int] = field(default_factory=dict)  # a job's SHOWN counters' deltas
    spenders: set[int] = field(default_factory=set)  # a team budget's: jobs that spent on it


@dataclass
class Moves:
    """Ledger rows and the counter moves they explain, applied together: one INSERT of the
    rows, then one UPDATE per job row and per team budget row (jobs, then teams, each in
    id order: one lock order for every transaction). A committer's group gathers all its
    works' moves in one (see `at_group_end`), so each hot row is written once a group;
    anywhere else a move is applied at once."""

    ledger_rows: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[int, _RowMove] = field(default_factory=dict)
    budgets: dict[int, _RowMove] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)  # jobs that had a render end

    def hold(self, job_id: int, team: str, team_budget_id: int | None, amount: int) -> None:
        job = self.jobs.setdefault(job_id, _RowMove())
        job.d_reserved += amount
        job.holds = True
        if team_budget_id is not None:
            budget = self.budgets.setdefault(team_budget_id, _RowMove())
            budget.d_reserved += amount
            budget.holds = True
            budget.team = team  # its limit is read by name, inside the statement

    def settle(self, claim: Settlement) -> None:
        amount = claim.amount_cents
        spent = 0 if claim.outcome == AttemptOutcome.RELEASED else amount
        unknown = amount if claim.outcome == AttemptOutcome.UNKNOWN else 0
        rows = [self.jobs.setdefault(claim.job_id, _RowMove())]
        if claim.team_budget_id is not None:
            rows.append(self.budgets.setdefault(claim.team_budget_id, _RowMove()))
        for row in rows:
            row.d_reserved -= amount
            row.d_spent += spent
            row.d_unknown += unknown
        if spent and claim.team_budget_id is not None:
            rows[-1].spenders.add(claim.job_id)

    def render_ended(self, job_id: int) -> None:
        self.jobs.setdefault(job_id, _RowMove()).d_open -= 1
        self.ended.add(job_id)

    def count(self, job_id: int, column: str, delta: int) -> None:
        shown = self.jobs.setdefault(job_id, _RowMove()).shown
        shown[column] = shown.get(column, 0) + delta

    def apply(self, session: Session) -> None:
        """Raises HoldRefused if a hold does not fit (the caller's transaction must then roll
        back). A job whose last open render ended here goes to `when_drained`'s closer."""
        db = session.connection()
        if self.ledger_rows:
            queries.insert_ledger(db, self.ledger_rows)
        drained: list[int] = []
        for job_id in sorted(self.jobs):
            move = self.jobs[job_id]
            moved = queries.moved_job(
                db, job_id, reserved=move.d_reserved, spent=move.d_spent,
                unknown=move.d_unknown, open_renders=move.d_open, shown=move.shown,
                holds=move.holds)
            if moved is None:  # only a conditional UPDATE finds no row
                raise HoldRefused(job_id)
            if move.d_spent > 0:
                _spend_moved(session, SpendMoved(
                    job_id, None, moved.spent_cents - move.d_spent, moved.spent_cents,
                    moved.limit_cents, (job_id,)))
            if job_id in self.ended and moved.open_renders == 0:
                drained.append(job_id)
        for budget_id in sorted(self.budgets):
            move = self.budgets[budget_id]
            moved = queries.moved_team_budget(
                db, budget_id, move.team, reserved=move.d_reserved, spent=move.d_spent,
                unknown=move.d_unknown, holds=move.holds)
            if moved is None:
                raise HoldRefused(budget_id)
            if move.d_spent > 0 and move.spenders:
                spenders = tuple(sorted(move.spenders))
                _spend_moved(session, SpendMoved(
                    spenders[0], budget_id, moved.spent_cents - move.d_spent,
                    moved.spent_cents, moved.limit_cents, spenders))
        # Closed once every row has moved: what a job's closing tells comes after what its
        # spend told (pipeline/webhooks.py). It touches only job rows this move locked.
        for job_id in drained:
            for close in _drained:
                close(session, job_id)


def _spend_moved(session: Session, moved: SpendMoved) -> None:
    for watch in _spent:
        watch(session, moved)


def _moves(session: Session) -> tuple[Moves, bool]:
    """The moves of the session's committer group, or new ones that the caller applies at
    once (True) in any other session."""
    group = at_group_end(session, "ledger", Moves)
    return (Moves(), True) if group is None else (group, False)


def reserve(session: Session, render: RenderLike, team: str, now: datetime | None = None,
            *, team_period: str | None = UNREAD, sent: bool = True) -> Reservation | None:
    """Hold the render's full price on its job and on its team's period, or on neither.

    Each hold is one conditional UPDATE (`spent + reserved + amount <= limit`), so the
    invariant holds with any number of workers; on PostgreSQL the UPDATE's row lock and on
    SQLite the BEGIN IMMEDIATE write lock keep the two holds one atomic step.

    Alone, the holds come first: a refused hold returns None having written nothing (a
    job hold taken before a refused team hold is given back in the same transaction). In a
    committer's group the attempt's rows are written now and the holds join the group's
    moves at its end (`Moves`), so the job's hot row is locked only from there to the
    COMMIT; a refused hold then raises HoldRefused there. `team_period`: see
    `current_team_budget`.

    `sent`: whether the attempt is taken as sent from the start. A render (`begin_attempt`)
    reserves with False and records the send just before its call, so an attempt whose worker
    died before it is released; anywhere else an attempt is taken as possibly sent, so a lost
    one is charged unknown, never under-charged.
    """
    now = now or utcnow()
    amount = render.n * render.price_per_image_cents
    team_budget_id = current_team_budget(session, team, now, team_period)
    moves, alone = _moves(session)
    if alone and not _hold(session, render.job_id, team, team_budget_id, amount):
        return None
    number = render.attempts + 1
    attempt_id = queries.insert_attempt(
        session.connection(), render_id=render.id, number=number, amount_cents=amount,
        started_at=now, sent_at=now if sent else None, team=team,
        team_budget_id=team_budget_id, price_per_image_cents=render.price_per_image_cents)
    moves.ledger_rows.append(_ledger_row(
        render.job_id, render.id, render.model, render.n, team, attempt_id, team_budget_id,
        LedgerKind.RESERVE, amount, render.price_per_image_cents))
    if alone:
        moves.apply(session)  # the ledger row: the holds came first
    else:
        moves.hold(render.job_id, team, team_budget_id, amount)
    return Reservation(attempt_id, number, amount, team_budget_id)


def reserve_nothing(session: Session, render: RenderLike, team: str, now: datetime, *,
                    price_per_image_cents: int) -> Reservation:
    """A 0-cent reservation for an attempt that calls nobody (its files are copied from an
    earlier render: reuse.py). No budget is held, so none has to fit: a job at its cap still
    gets its copies. Recorded like any attempt (an attempt row, a `reserve` row of 0 cents
    and 0 images: no call is asked for), so it settles exactly once, `reused` or released.
    `price_per_image_cents` is the original's: the `reused` row says what the copy saved."""
    moves, alone = _moves(session)
    number = render.attempts + 1
    attempt_id = queries.insert_attempt(
        session.connection(), render_id=render.id, number=number, amount_cents=0,
        started_at=now, sent_at=None, team=team, team_budget_id=None,
        price_per_image_cents=price_per_image_cents)
    moves.ledger_rows.append(_ledger_row(
        render.job_id, render.id, render.model, 0, team, attempt_id, None,
        LedgerKind.RESERVE, 0, price_per_image_cents))
    if alone:
        moves.apply(session)
    return Reservation(attempt_id, number, 0, None)


def _hold(session: Session, job_id: int, team: str, team_budget_id: int | None,
          amount: int) -> bool:
    """Both holds or neither. The job row first, then the team row (as settling does): one
    lock order, no deadlock."""
    db = session.connection()  # Core statements go straight to the connection
    if queries.move_job(db, job_id, reserved=amount, holds=True) is None:
        return False
    if team_budget_id is None or queries.move_team_budget(db, team_budget_id, team,
                                                          reserved=amount, holds=True):
        return True
    queries.move_job(db, job_id, reserved=-amount)
    return False


SETTLE_KIND = {
    AttemptOutcome.CHARGED: LedgerKind.CHARGE,
    AttemptOutcome.RELEASED: LedgerKind.RELEASE,
    AttemptOutcome.UNKNOWN: LedgerKind.UNKNOWN,
    AttemptOutcome.REUSED: LedgerKind.REUSED,
}


@dataclass(frozen=True)
class Settlement:
    """An attempt's settlement, claimed (exactly once) but not yet applied to the budgets."""

    attempt_id: int
    outcome: AttemptOutcome
    render_id: int
    job_id: int
    model: str
    images: int
    team: str
    team_budget_id: int | None
    amount_cents: int
    price_per_image_cents: int


def claim_settlement(
    session: Session,
    attempt_id: int,
    outcome: AttemptOutcome,
    *,
    http_status: int | None = None,
    error: str | None = None,
    render: RenderLike | None = None,
) -> Settlement | None:
    """Record the attempt's outcome, or None if it was already settled.

    The guard `outcome = 'reserved'` makes this exactly-once: a redelivered task, the sweeper
    and the worker itself can all try, and only the first moves money.
    """
    db = session.connection()
    claimed = queries.claim_attempt(db, attempt_id, outcome, utcnow(), http_status=http_status,
                                    error=error)
    if claimed is None:
        return None
    render_id = claimed.render_id
    if render is not None and render.id == render_id:  # the caller's row: no second read
        job_id, model, n = render.job_id, render.model, render.n
    else:
        job_id, model, n = queries.render_facts(db, render_id)
    return Settlement(attempt_id, outcome, render_id, job_id, model, n, claimed.team,
                      claimed.team_budget_id, claimed.amount_cents,
                      claimed.price_per_image_cents)


def apply_settlement(session: Session, claim: Settlement, *, render_ended: bool = False
                     ) -> None:
    """Move the money: the ledger row, then the counters (the job's hot row) last. With
    `render_ended` the render is also taken off its job's open count, and the job closed if
    it was the last. In a committer's group this happens at the group's end."""
    moves, alone = _moves(session)
    moves.ledger_rows.append(_ledger_row(
        claim.job_id, claim.render_id, claim.model, claim.images, claim.team,
        claim.attempt_id, claim.team_budget_id, SETTLE_KIND[claim.outcome],
        claim.amount_cents, claim.price_per_image_cents))
    moves.settle(claim)
    if render_ended:
        moves.render_ended(claim.job_id)
    if alone:
        moves.apply(session)


def render_ended(session: Session, job_id: int) -> None:
    """A render of the job ended with no money to move: one open render less, and the job
    closed if it was the last. In a committer's group this happens at the group's end."""
    moves, alone = _moves(session)
    moves.render_ended(job_id)
    if alone:
        moves.apply(session)


def item_ended(session: Session, job_id: int, status: str) -> None:
    """An item of the job reached its final status: counted for `status`, with the money."""
    moves, alone = _moves(session)
    moves.count(job_id, ITEM_COUNTER[status], 1)
    if alone:
        moves.apply(session)


def files_stored(session: Session, job_id: int, count: int) -> None:
    """`count` files of the job were recorded (negative: removed), counted for `status`."""
    moves, alone = _moves(session)
    moves.count(job_id, "images", count)
    if alone:
        moves.apply(session)


def settle(
    session: Session,
    attempt_id: int,
    outcome: AttemptOutcome,
    *,
    http_status: int | None = None,
    error: str | None = None,
) -> bool:
    """Claim and apply a settlement at once. False if the attempt was already settled."""
    claim = claim_settlement(session, attempt_id, outcome, http_status=http_status, error=error)
    if claim is None:
        return False
    apply_settlement(session, claim)
    return True


def settle_abandoned_attempt(session: Session, render: RenderLike) -> None:
    """An attempt still 'reserved' whose lease has run out lost its worker. With its send
    recorded it is charged unknown (the provider may have billed it); with none it never
    reached the upstream (its worker died between the reservation and `record_send`), so it
    is released.

    The attempt's row is locked before its send is read (PostgreSQL; SQLite's BEGIN
    IMMEDIATE already excludes every other writer): a worker recording the send just as its
    lease is swept either commits first, and the send is seen here, or finds the attempt
    settled and calls nobody."""
    last = queries.lock_last_attempt(session.connection(), render.id)
    if last is None or last.outcome != AttemptOutcome.RESERVED:
        return
    if last.sent_at is None:
        settle(session, last.id, AttemptOutcome.RELEASED,
                      error="the worker was lost before the call was sent; nothing was billed")
    else:
        settle(session, last.id, AttemptOutcome.UNKNOWN,
                      error="the worker was lost during the call; the provider may have billed it")


def _ledger_row(job_id: int, render_id: int, model: str, images: int, team: str,
                attempt_id: int, team_budget_id: int | None, kind: LedgerKind, amount: int,
                price: int) -> dict[str, Any]:
    return queries.ledger_entry(
        job_id=job_id, render_id=render_id, attempt_id=attempt_id,
        team_budget_id=team_budget_id, team=team, model=model, kind=kind.value,
        amount_cents=amount, images=images, price_per_image_cents=price, created_at=utcnow())


@dataclass(frozen=True)
class LedgerTotals:
    reserved_cents: int
    spent_cents: int
    unknown_cents: int
    released_cents: int


def job_ledger_totals(session: Session, job_id: int) -> LedgerTotals:
    """The job's totals recomputed from the ledger alone (the counters must equal these)."""
    rows = dict(
        session.execute(
            select(LedgerEntry.kind, func.coalesce(func.sum(LedgerEntry.amount_cents), 0))
            .where(LedgerEntry.job_id == job_id)
            .group_by(LedgerEntry.kind)
        ).all()
    )
    reserve = int(rows.get(LedgerKind.RESERVE, 0))
    charge = int(rows.get(LedgerKind.CHARGE, 0))
    unknown = int(rows.get(LedgerKind.UNKNOWN, 0))
    release = int(rows.get(LedgerKind.RELEASE, 0))
    return LedgerTotals(
        reserved_cents=reserve - charge - unknown - release,
        spent_cents=charge + unknown,
        unknown_cents=unknown,
        released_cents=release,
    )
