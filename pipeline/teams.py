"""Team period budgets: which period a moment falls in, and that period's budget row."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session


def current_team_budget(session: Session, team: str, now: datetime) -> int | None:
    """The id of the team's budget row for the period holding `now`, or None (no budget)."""
    return None
