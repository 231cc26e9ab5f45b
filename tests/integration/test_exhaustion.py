"""A spent cap ends the rest of its job at once, in bulk, with reason `budget` (SQLite and
PostgreSQL, the fake upstream over HTTP)."""

from __future__ import annotations

from sqlalchemy import func, select

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.exhaustion import mark_if_exhausted
from pipeline.models import JobItem, Render
from pipeline.queue import IDLE_WINDOW
from pipeline.sweep import sweep
from pipeline.teams import set_team
from tests.helpers import assert_books_balance, render_all, submit, summary

FLUX = {"model": "flux-2-dev", "prompt": "a heron"}  # 3 cents an image


def render_until_nothing_is_sent(svc, first: int = 0) -> list[str]:
    """What the feeders do: send the window, render it, again, until nothing is left. The
    `first` renders are rendered to the end before any other starts: what a slow machine
    does by chance (every other render refused while they are in flight, their money
    reserved, not spent) must not decide what a test sees."""
    outcomes: list[str] = []
    while render_ids := dispatch_pending(svc):
        ahead, render_ids = render_ids[:first], render_ids[first:]
        outcomes += render_all(svc, ahead, concurrency=8)
        outcomes += render_all(svc, render_ids, concurrency=8)
        first = 0
    return outcomes


def item_errors(svc, job_id: int) -> dict[str, int]:
    with svc.sessions() as session:
        rows = session.execute(
            select(Render.error, func.count()).where(Render.job_id == job_id)
            .group_by(Render.error)).all()
    found: dict[str, int] = {}
    for error, count in rows:
        kind = str(error).split(":")[0]
        found[kind] = found.get(kind, 0) + count
    return found


def test_a_spent_cap_ends_the_rest_of_the_job_at_once(svc, fake):
    job_id = submit(svc, [FLUX] * 3000, budget_cents=5)
    outcomes = render_until_nothing_is_sent(svc, first=1)
    s = summary(svc, job_id)
    assert fake.stats()["calls"] == 1
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 1, 2999)
    assert (s["spent_cents"], s["reserved_cents"]) == (3, 0)
    assert s["error"] == ("budget: the job's cap has 2¢ left, less than any render of the job "
                          "costs: the rest of the job ended")
    assert item_errors(svc, job_id) == {"None": 1, "budget": 2999}
    # Ended in bulk: one window was delivered, and its last renders found themselves ended.
    assert len(outcomes) <= IDLE_WINDOW and "terminal" in outcomes
    assert_books_balance(svc, job_id)


def test_a_spent_team_budget_ends_the_rest_of_its_jobs(svc, fake):
    with transaction(svc.sessions) as session:
        set_team(session, "lab", 7, "month")
    job_id = submit(svc, [FLUX] * 500, budget_cents=10_000, team="lab")
    render_until_nothing_is_sent(svc, first=2)
    s = summary(svc, job_id)
    assert fake.stats()["calls"] == 2
    assert (s["items_succeeded"], s["items_failed"], s["spent_cents"]) == (2, 498, 6)
    assert str(s["error"]).startswith("budget: its team's period budget has 1¢ left")
    assert_books_balance(svc, job_id)


def test_a_cheaper_render_left_keeps_the_job_going(svc, fake):
    """Spent money never comes back, but a cheaper render may still fit: nothing is ended
    in bulk while one does."""
    klein = {"model": "flux-2-klein-4b", "prompt": "a wren"}  # 1 cent
    job_id = submit(svc, [FLUX, FLUX, klein, klein], budget_cents=5)
    render_until_nothing_is_sent(svc)
    s = summary(svc, job_id)
    assert s["error"] is None
    assert (s["spent_cents"], s["items_succeeded"]) == (5, 3)
    assert_books_balance(svc, job_id)


def test_the_sweep_finishes_ending_a_job_whose_worker_died_after_marking_it(svc, fake):
    job_id = submit(svc, [FLUX] * 50, budget_cents=2)
    dispatch_pending(svc)
    with transaction(svc.sessions) as session:  # what a render did before its worker died
        reason = mark_if_exhausted(session, job_id, "t")
    assert reason is not None and "2¢ left" in reason
    sweep(svc.sessions, svc.settings)
    s = summary(svc, job_id)
    assert (s["status"], s["items_failed"], s["spent_cents"]) == ("failed", 50, 0)
    with svc.sessions() as session:
        errors = set(session.scalars(select(JobItem.status).where(JobItem.job_id == job_id)))
    assert errors == {"failed"}
    assert fake.stats()["calls"] == 0
    assert_books_balance(svc, job_id)
