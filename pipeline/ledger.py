"""Money: atomic reservations on every budget a render draws on, and exactly-once settlement.

Every function here runs inside the caller's transaction, so a reservation or a settlement
commits together with the render state it belongs to. Counters on `jobs` and `team_budgets`
move in the same transaction as the append-only `ledger` row that explains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from pipeline.models import (
    Attempt,
    AttemptOutcome,
    Job,
    JobStatus,
    LedgerEntry,
    LedgerKind,
    Render,
    Team,
    TeamBudget,
    utcnow,
)
from pipeline.teams import current_team_budget


@dataclass(frozen=True)
class Reservation:
    attempt_id: int
    number: int
    amount_cents: int
    team_budget_id: int | None


def render_price(render: Render) -> int:
    return render.n * render.price_per_image_cents


def reserve(session: Session, render: Render, team: str, now: datetime | None = None
            ) -> Reservation | None:
    """Hold the render's full price on its job and on its team's period, or on neither.

    Each hold is one conditional UPDATE (`spent + reserved + amount <= limit`), so the
    invariant holds with any number of workers; on PostgreSQL the UPDATE's row lock and on
    SQLite the BEGIN IMMEDIATE write lock keep the two holds one atomic step.
    """
    now = now or utcnow()
    amount = render_price(render)
    # Always the job row first, then the team row (as settle does): one lock order, no deadlock.
    if not _hold_job(session, render.job_id, amount):
        return None
    team_budget_id = current_team_budget(session, team, now)
    if team_budget_id is not None and not _hold_team(session, team_budget_id, team, amount):
        # Still inside the caller's transaction: nobody has seen the job hold; take it back.
        session.execute(
            update(Job)
            .where(Job.id == render.job_id)
            .values(reserved_cents=Job.reserved_cents - amount)
        )
        return None
    number = render.attempts + 1
    attempt_id = session.execute(
        insert(Attempt)
        .values(render_id=render.id, number=number, amount_cents=amount, started_at=now,
                team=team, team_budget_id=team_budget_id,
                price_per_image_cents=render.price_per_image_cents)
        .returning(Attempt.id)
    ).scalar_one()
    _append(session, render, team, attempt_id, team_budget_id, LedgerKind.RESERVE, amount)
    return Reservation(attempt_id, number, amount, team_budget_id)


def _hold_job(session: Session, job_id: int, amount: int) -> bool:
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING,
            Job.spent_cents + Job.reserved_cents + amount <= Job.budget_cents,
        )
        .values(reserved_cents=Job.reserved_cents + amount)
    )
    return result.rowcount == 1


def _hold_team(session: Session, team_budget_id: int, team: str, amount: int) -> bool:
    # The limit is read inside the statement, so lowering it takes effect at once.
    limit = select(Team.budget_cents).where(Team.name == team).scalar_subquery()
    result = session.execute(
        update(TeamBudget)
        .where(
            TeamBudget.id == team_budget_id,
            TeamBudget.spent_cents + TeamBudget.reserved_cents + amount <= limit,
        )
        .values(reserved_cents=TeamBudget.reserved_cents + amount)
    )
    return result.rowcount == 1


def _move_team(session: Session, team_budget_id: int, **deltas: int) -> None:
    values = {name: getattr(TeamBudget, f"{name}_cents") + d for name, d in deltas.items()}
    session.execute(
        update(TeamBudget)
        .where(TeamBudget.id == team_budget_id)
        .values({f"{k}_cents": v for k, v in values.items()})
    )


SETTLE_KIND = {
    AttemptOutcome.CHARGED: LedgerKind.CHARGE,
    AttemptOutcome.RELEASED: LedgerKind.RELEASE,
    AttemptOutcome.UNKNOWN: LedgerKind.UNKNOWN,
}


def settle(
    session: Session,
    attempt_id: int,
    outcome: AttemptOutcome,
    *,
    http_status: int | None = None,
    error: str | None = None,
) -> bool:
    """Turn an attempt's reservation into spend or give it back. False if already settled.

    The guard `outcome = 'reserved'` makes this exactly-once: a redelivered task, the sweeper
    and the worker itself can all try, and only the first moves money.
    """
    claimed = session.execute(
        update(Attempt)
        .where(Attempt.id == attempt_id, Attempt.outcome == AttemptOutcome.RESERVED)
        .values(outcome=outcome, settled_at=utcnow(), http_status=http_status, error=error)
        .returning(Attempt.render_id, Attempt.amount_cents, Attempt.team,
                   Attempt.team_budget_id, Attempt.price_per_image_cents)
    ).one_or_none()
    if claimed is None:
        return False
    render_id, amount, team, team_budget_id, price = claimed
    render = session.get_one(Render, render_id)  # the caller's, from the identity map
    spent = 0 if outcome == AttemptOutcome.RELEASED else amount
    unknown = amount if outcome == AttemptOutcome.UNKNOWN else 0
    session.execute(
        update(Job)
        .where(Job.id == render.job_id)
        .values(
            reserved_cents=Job.reserved_cents - amount,
            spent_cents=Job.spent_cents + spent,
            unknown_cents=Job.unknown_cents + unknown,
        )
    )
    if team_budget_id is not None:
        _move_team(session, team_budget_id, reserved=-amount, spent=spent, unknown=unknown)
    _append(session, render, team, attempt_id, team_budget_id, SETTLE_KIND[outcome], amount,
            price=price)
    return True


def _append(
    session: Session,
    render: Render,
    team: str,
    attempt_id: int,
    team_budget_id: int | None,
    kind: LedgerKind,
    amount: int,
    *,
    price: int | None = None,
) -> None:
    session.execute(
        insert(LedgerEntry).values(
            job_id=render.job_id,
            render_id=render.id,
            attempt_id=attempt_id,
            team_budget_id=team_budget_id,
            team=team,
            model=render.model,
            kind=kind,
            amount_cents=amount,
            images=render.n,
            price_per_image_cents=render.price_per_image_cents if price is None else price,
            created_at=utcnow(),
        )
    )


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
