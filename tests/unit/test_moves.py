"""`ledger.Moves`: the counter moves a group of renders makes to its job and team budget rows.

What a user sees as a job's and a team's spent, reserved and unknown cents is the sum of
these moves, so each is checked to the cent: a hold raises reserved; a settlement turns the
reservation into spend (delivered), into spend counted as unknown (cut, timed out, killed),
or gives it back (definite refusal); many renders of one job become one move of its row."""

from __future__ import annotations

import random

import pytest

from pipeline.ledger import SHOWN, Moves, Settlement
from pipeline.models import AttemptOutcome


def settlement(outcome: AttemptOutcome, cents: int, *, job: int = 1, budget: int | None = 7,
               attempt: int = 1) -> Settlement:
    return Settlement(attempt_id=attempt, outcome=outcome, render_id=attempt, job_id=job,
                      model="flux-2-dev", images=1, team="data", team_budget_id=budget,
                      amount_cents=cents, price_per_image_cents=cents)


def money(row: object) -> tuple[int, int, int]:
    """A row's moves of reserved, spent and unknown cents."""
    return row.d_reserved, row.d_spent, row.d_unknown  # type: ignore[attr-defined]


def test_a_hold_reserves_on_the_job_and_on_the_team_budget() -> None:
    moves = Moves()
    moves.hold(1, "data", 7, 30)
    assert money(moves.jobs[1]) == (30, 0, 0)
    assert money(moves.budgets[7]) == (30, 0, 0)


def test_a_hold_names_the_team_whose_limit_the_budget_row_is_checked_against() -> None:
    moves = Moves()
    moves.hold(1, "data", 7, 30)
    assert moves.budgets[7].team == "data"


def test_a_team_with_no_period_budget_is_held_on_the_job_alone() -> None:
    moves = Moves()
    moves.hold(1, "data", None, 30)
    assert moves.jobs[1].d_reserved == 30
    assert moves.budgets == {}


def test_holds_make_the_moves_conditional_on_the_budgets() -> None:
    moves = Moves()
    moves.hold(1, "data", 7, 30)
    assert moves.jobs[1].holds and moves.budgets[7].holds


def test_a_settlement_alone_is_never_conditional_so_it_is_never_refused() -> None:
    moves = Moves()
    moves.settle(settlement(AttemptOutcome.CHARGED, 30))
    assert not moves.jobs[1].holds and not moves.budgets[7].holds


def test_a_delivered_result_turns_the_reservation_into_spend() -> None:
    moves = Moves()
    moves.settle(settlement(AttemptOutcome.CHARGED, 30))
    for row in (moves.jobs[1], moves.budgets[7]):
        assert money(row) == (-30, 30, 0)


def test_a_definite_refusal_gives_the_reservation_back_and_spends_nothing() -> None:
    moves = Moves()
    moves.settle(settlement(AttemptOutcome.RELEASED, 30))
    for row in (moves.jobs[1], moves.budgets[7]):
        assert money(row) == (-30, 0, 0)


def test_an_unknown_outcome_is_spent_and_counted_as_unknown() -> None:
    moves = Moves()
    moves.settle(settlement(AttemptOutcome.UNKNOWN, 30))
    for row in (moves.jobs[1], moves.budgets[7]):
        assert money(row) == (-30, 30, 30)


def test_a_hold_and_its_settlement_in_one_group_leave_nothing_reserved() -> None:
    moves = Moves()
    moves.hold(1, "data", 7, 30)
    moves.settle(settlement(AttemptOutcome.CHARGED, 30))
    assert money(moves.jobs[1]) == (0, 30, 0)
    assert money(moves.budgets[7]) == (0, 30, 0)
    assert moves.jobs[1].holds  # the group still holds: its row is checked against the cap


def test_a_settlement_of_a_team_without_budget_moves_the_job_only() -> None:
    moves = Moves()
    moves.settle(settlement(AttemptOutcome.CHARGED, 30, budget=None))
    assert moves.jobs[1].d_spent == 30
    assert moves.budgets == {}


def test_renders_of_one_job_become_one_move_of_its_row() -> None:
    moves = Moves()
    for attempt in range(1, 6):
        moves.hold(1, "data", 7, 6)
        moves.settle(settlement(AttemptOutcome.CHARGED, 6, attempt=attempt))
    assert list(moves.jobs) == [1] and list(moves.budgets) == [7]
    assert money(moves.jobs[1]) == (0, 30, 0)


def test_jobs_and_budgets_of_a_group_move_apart() -> None:
    moves = Moves()
    moves.hold(1, "data", 7, 10)
    moves.hold(2, "art", 8, 25)
    moves.settle(settlement(AttemptOutcome.UNKNOWN, 10, job=1, budget=7))
    assert money(moves.jobs[1]) == (0, 10, 10)
    assert money(moves.jobs[2]) == (25, 0, 0)
    assert moves.budgets[7].d_spent == 10 and moves.budgets[8].d_reserved == 25
    assert moves.budgets[8].team == "art"


def test_an_ended_render_lowers_the_open_count_and_marks_its_job_for_closing() -> None:
    moves = Moves()
    moves.render_ended(1)
    moves.render_ended(1)
    moves.hold(2, "data", None, 5)
    assert moves.jobs[1].d_open == -2
    assert moves.jobs[2].d_open == 0
    assert moves.ended == {1}


def test_shown_counters_add_up() -> None:
    moves = Moves()
    moves.count(1, "images", 4)
    moves.count(1, "images", 2)
    moves.count(1, "items_succeeded", 1)
    assert moves.jobs[1].shown == {"images": 6, "items_succeeded": 1}
    assert set(moves.jobs[1].shown) <= set(SHOWN)


def test_counting_moves_no_money() -> None:
    moves = Moves()
    moves.count(1, "items_failed", 1)
    assert money(moves.jobs[1]) == (0, 0, 0)
    assert not moves.jobs[1].holds


@pytest.mark.parametrize("seed", range(5))
def test_any_mix_of_outcomes_balances_to_the_cent(seed: int) -> None:
    """Every reservation is settled once: nothing stays reserved, spent is what was charged
    or unknown, unknown is what was unknown, on the job and its team budget alike."""
    rng = random.Random(seed)
    moves = Moves()
    spent = unknown = 0
    for attempt in range(1, 101):
        cents = rng.randint(1, 500)
        outcome = rng.choice([AttemptOutcome.CHARGED, AttemptOutcome.RELEASED,
                              AttemptOutcome.UNKNOWN])
        moves.hold(1, "data", 7, cents)
        moves.settle(settlement(outcome, cents, attempt=attempt))
        spent += 0 if outcome == AttemptOutcome.RELEASED else cents
        unknown += cents if outcome == AttemptOutcome.UNKNOWN else 0
    assert money(moves.jobs[1]) == (0, spent, unknown)
    assert money(moves.budgets[7]) == (0, spent, unknown)
