"""A job whose cap, or its team's period budget, can no longer fit any of its renders: the rest
of it ends at once, in bulk, with reason `budget`, instead of render by render."""

from __future__ import annotations

from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.jobs import CHUNK, fail_queued_renders
from pipeline.models import (
    Job,
    JobStatus,
    Render,
    RenderStatus,
    Team,
    TeamBudget,
    status_is,
    utcnow,
)
from pipeline.teams import current_team_budget

# The job's error while the rest of it is being ended for budget (a marker: the render that
# set it ends the rest, and the sweep finishes what a dead worker left half done).
OUT_OF_BUDGET = "budget: "

_renders, _jobs = Render.__table__, Job.__table__
_QUEUED_OF_JOB = (_renders.c.job_id == bindparam("job"),
                  status_is(_renders.c.status, RenderStatus.QUEUED.value))
ANY_QUEUED = select(exists().where(*_QUEUED_OF_JOB))
ANY_RENDER_FITS = select(exists().where(
    *_QUEUED_OF_JOB, _renders.c.n * _renders.c.price_per_image_cents <= bindparam("left")))
MARK = (update(_jobs)
        .where(_jobs.c.id == bindparam("job"), _jobs.c.status == JobStatus.RUNNING.value,
               _jobs.c.error.is_(None))
        .values(error=bindparam("reason")))
MARKED = (select(_jobs.c.id, _jobs.c.error)
          .where(_jobs.c.status == JobStatus.RUNNING.value,
                 _jobs.c.error.startswith(OUT_OF_BUDGET)))


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
    if (not db.execute(ANY_QUEUED, {"job": job_id}).scalar()
            or db.execute(ANY_RENDER_FITS, {"job": job_id, "left": max(left, 0)}).scalar()):
        return None
    reason = (f"{OUT_OF_BUDGET}{whose} has {max(left, 0)}¢ left, less than any render of the "
              "job costs: the rest of the job ended")
    return reason if db.execute(MARK, {"job": job_id, "reason": reason}).rowcount == 1 else None


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
        marked = list(session.execute(MARKED).all())
    return sum(end_rest_for_budget(sessions, job_id, error) for job_id, error in marked)
