"""Team period budgets: one atomic hold on job and team, periods by their own key."""

from __future__ import annotations

from datetime import datetime

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.models import LedgerEntry, TeamBudget
from pipeline.teams import set_team, team_state
from tests.helpers import assert_books_balance, render_all, submit, summary

ONE = {"model": "flux-2-klein-4b", "prompt": "p"}  # 1 cent an image


def set_budget(svc, team: str, cents: int, period: str = "month") -> None:
    with transaction(svc.sessions) as session:
        set_team(session, team, cents, period)


def test_two_jobs_race_for_the_last_cents_of_their_team(svc, fake):
    set_budget(svc, "data", 30)
    first = submit(svc, [ONE] * 25, budget_cents=100, team="data")
    second = submit(svc, [ONE] * 25, budget_cents=100, team="data")
    render_all(svc, dispatch_pending(svc), concurrency=24)
    a, b = summary(svc, first), summary(svc, second)
    assert a["spent_cents"] + b["spent_cents"] == 30 == fake.stats()["billed_cents"]
    assert a["items_succeeded"] + b["items_succeeded"] == 30
    with svc.sessions() as session:
        state = team_state(session, "data")
    assert (state.spent_cents, state.reserved_cents, state.left_cents) == (30, 0, 0)
    assert_books_balance(svc, first)
    assert_books_balance(svc, second)


def test_a_job_whose_team_has_no_budget_runs_on_its_cap_alone(svc, fake):
    job = submit(svc, [ONE] * 3, budget_cents=2, team="nobody")
    render_all(svc, dispatch_pending(svc))
    assert summary(svc, job)["spent_cents"] == 2


def test_a_period_boundary_mid_job_moves_later_renders_to_the_new_period(svc, fake):
    set_budget(svc, "night", 3, period="day")
    job = submit(svc, [ONE] * 5, budget_cents=100, team="night")
    first, second, *rest = dispatch_pending(svc)
    svc.clock = lambda: datetime(2026, 11, 24, 23, 59, 59)
    render_all(svc, [first, second])
    svc.clock = lambda: datetime(2026, 11, 25, 0, 0, 1)
    render_all(svc, rest)
    with svc.sessions() as session:
        periods = {b.period_start.day: b.spent_cents for b in session.query(TeamBudget)}
        entries = session.query(LedgerEntry).filter_by(kind="charge").all()
    assert periods == {24: 2, 25: 3}
    assert len({e.team_budget_id for e in entries}) == 2
    assert summary(svc, job)["spent_cents"] == 5


def test_lowering_a_team_budget_stops_new_reservations(svc, fake):
    set_budget(svc, "shrink", 100)
    job = submit(svc, [ONE] * 4, budget_cents=100, team="shrink")
    first, *rest = dispatch_pending(svc)
    render_all(svc, [first])
    set_budget(svc, "shrink", 1)  # what it has spent: the lowest a limit can go
    render_all(svc, rest)
    s = summary(svc, job)
    assert (s["spent_cents"], s["items_failed"]) == (1, 3)
