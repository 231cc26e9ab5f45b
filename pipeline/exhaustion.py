"""A job whose cap, or its team's period budget, can no longer fit any of its renders: the rest
of it ends at once, in bulk, with reason `budget`, instead of render by render."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline import queries
from pipeline.db import transaction
from pipeline.jobs import CHUNK, fail_queued_renders
from pipeline.models import Job, Team, TeamBudget, utcnow
from pipeline.queries import OUT_OF_BUDGET
from pipeline.teams import current_team_budget


def mark_if_exhausted(session: Session, job_id: int, team: str) -> str | None:
    """After a render's hold was refused for budget: when what is left to spend (cap minus
    spent, which only grows; reserved money may come back, spent money never does) fits none
    of the job's queued renders, mark the job and return why; None when some render may
    still fit, none is queued, or another render marked it first. A job still being planned
    is never marked (its unplanned lines may cost less)."""
    job = session.get_one(Job, job_id, populate_existing=True)
    if job.plan_cursor is not None or job.error is not None:
        return None
    left, whose = job.budget_cents - job.spent_cents, "the job's cap"
    team_left = _team_left(session, team)
    if team_left is not None and team_left < left:
        left, whose = team_left, "its team's period budget"
    db = session.connection()
    if (not queries.any_queued(db, job_id)
            or queries.any_queued_fits(db, job_id, max(left, 0))):
        return None
    reason = (f"{OUT_OF_BUDGET}{whose} has {max(left, 0)}¢ left, less than any render of the "
              "job costs: the rest of the job ended")
    return reason if queries.mark_out_of_budget(db, job_id, reason) else None


def _team_left(session: Session, team: str) -> int | None:
    limit = session.scalar(select(Team.budget_cents).where(Team.name == team))
    if limit is None:
        return None
    budget_id = current_team_budget(session, team, utcnow())
    spent = session.scalar(select(TeamBudget.spent_cents).where(TeamBudget.id == budget_id))
    return limit - (spent or 0)


def end_rest_for_budget(sessions: sessionmaker[Session], job_id: int, reason: str,
                        chunk: int = CHUNK) -> int:
    """Every queued render of the job failed with `reason`, `chunk` a transaction, its items
    settled and the job closed once nothing of it is in flight; how many renders it ended.
    Safe to run twice at once, and again after an interruption."""
    return fail_queued_renders(lambda: transaction(sessions), job_id, reason, chunk)


def end_marked_jobs(sessions: sessionmaker[Session]) -> int:
    """The sweep's backstop: finish ending jobs marked out of budget (their marking worker
    may have died half way)."""
    with sessions() as session:
        marked = queries.marked_out_of_budget(session.connection())
    return sum(end_rest_for_budget(sessions, job_id, error) for job_id, error in marked)
