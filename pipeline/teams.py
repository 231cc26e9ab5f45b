"""Team period budgets: which period a moment falls in, and that period's budget row.

A period's row is keyed by (team, period start): a new period starts from zero simply by
being a new key, so there is no reset job that could be missed or run twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline import queries
from pipeline.models import Team, TeamBudget, utcnow
from pipeline.plan import format_dollars

PERIODS = ("day", "week", "month", "none")
EPOCH = datetime(1970, 1, 1)


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """[start, end) of the UTC period holding `now` (naive UTC datetimes)."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else \
            start.replace(month=start.month + 1)
        return start, end
    if period == "none":
        return EPOCH, None
    raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")


# What `current_team_budget` is told when the caller has not read the team's row itself.
UNREAD = "unread"


def current_team_budget(session: Session, team: str, now: datetime, period: str | None = UNREAD
                        ) -> int | None:
    """The id of the team's budget row for the period holding `now`, or None (no budget).

    `period` is the team's budget period when the caller read it already (None: the team
    has no budget), saving a read per render."""
    if period == UNREAD:
        row = queries.team_limit(session.connection(), team)
        period = None if row is None or row.budget_cents is None else row.period
    if period is None:
        return None
    start, end = period_bounds(period, now)
    return queries.period_row(session.connection(), team, start, end)


class LimitBelowSpent(ValueError):
    """A team limit (or a job cap) below what its budget has already spent and reserved."""


def set_team(session: Session, team: str, budget_cents: int | None, period: str) -> Team:
    """Create or change the team's limit and period. A limit below what the period it
    now applies to has already spent and reserved is refused (LimitBelowSpent): spent +
    reserved <= limit must hold at every instant, and that money is gone or promised."""
    start, _ = period_bounds(period, utcnow())  # validates the period's name
    row = session.get(Team, team, with_for_update=True) or Team(name=team)
    if budget_cents is not None:
        refuse_below_held(session, team, budget_cents, period, start)
    row.budget_cents = budget_cents
    row.period = period
    row.updated_at = utcnow()
    session.add(row)
    return row


def refuse_below_held(session: Session, team: str, limit_cents: int, period: str,
                      start: datetime) -> None:
    """LimitBelowSpent when the team's budget row for the period starting at `start` has
    spent and reserved more than `limit_cents`. The row is locked (PostgreSQL) until the
    caller commits, so no reservation moves it meanwhile."""
    held = session.execute(
        select(TeamBudget.spent_cents, TeamBudget.reserved_cents)
        .where(TeamBudget.team == team, TeamBudget.period_start == start)
        .with_for_update()).first()
    if held is None or held.spent_cents + held.reserved_cents <= limit_cents:
        return
    which = "in all" if period == "none" else f"this {period}"
    raise LimitBelowSpent(
        f"team {team}: a limit of {format_dollars(limit_cents)} is below what it has spent "
        f"{which} ({format_dollars(held.spent_cents)}, "
        f"{format_dollars(held.reserved_cents)} more reserved by renders in flight): set at "
        f"least {format_dollars(held.spent_cents + held.reserved_cents)}, or pause its jobs")


@dataclass(frozen=True)
class TeamState:
    team: str
    period: str
    limit_cents: int | None
    spent_cents: int
    reserved_cents: int
    unknown_cents: int
    period_start: datetime | None
    period_end: datetime | None

    @property
    def left_cents(self) -> int | None:
        if self.limit_cents is None:
            return None
        return max(self.limit_cents - self.spent_cents - self.reserved_cents, 0)

    def as_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat() + "Z"

        return {
            "team": self.team, "period": self.period, "limit_cents": self.limit_cents,
            "spent_cents": self.spent_cents, "reserved_cents": self.reserved_cents,
            "unknown_cents": self.unknown_cents, "left_cents": self.left_cents,
            "period_start": iso(self.period_start), "period_end": iso(self.period_end),
        }


def team_state(session: Session, team: str, now: datetime | None = None) -> TeamState:
    row = session.get(Team, team)
    if row is None:
        raise LookupError(f"no team {team!r} (create it with: imagebatch team set {team} ...)")
    start, end = period_bounds(row.period, now or utcnow())
    budget = session.scalars(
        select(TeamBudget).where(TeamBudget.team == team, TeamBudget.period_start == start)
    ).first()
    return TeamState(
        team=team, period=row.period, limit_cents=row.budget_cents,
        spent_cents=budget.spent_cents if budget else 0,
        reserved_cents=budget.reserved_cents if budget else 0,
        unknown_cents=budget.unknown_cents if budget else 0,
        period_start=None if row.period == "none" else start, period_end=end,
    )


def list_teams(session: Session) -> list[TeamState]:
    names = session.scalars(select(Team.name).order_by(Team.name)).all()
    return [team_state(session, name) for name in names]
