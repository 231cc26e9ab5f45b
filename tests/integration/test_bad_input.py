"""Caps lowered below what a job has spent and reserved are refused while a render is in
flight, and the books still balance."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import resume_job, retry_job
from pipeline.render import run_render
from pipeline.teams import LimitBelowSpent, set_team, team_state
from tests.acceptance.test_bad_input import FLUX
from tests.helpers import assert_books_balance, submit, summary


def test_caps_below_spent_and_reserved_are_refused_while_a_render_is_in_flight(svc, fake):
    """On both databases, with 3 cents spent and 3 reserved by a render still calling: a
    job's cap (resume --budget) and its team's limit cannot go below 6 cents, and nothing
    changes; at 6 they can, and the books balance to the cent."""
    with transaction(svc.sessions) as session:
        set_team(session, "t", 100, "month")
    slow = {**FLUX, "fake": {"latency": 1.5}}
    job_id = submit(svc, [FLUX, slow, FLUX], budget_cents=100, team="t")
    first, second, third = dispatch_pending(svc)
    run_render(svc, first)
    in_flight = threading.Thread(target=run_render, args=(svc, second))
    in_flight.start()
    deadline = time.monotonic() + 5
    while summary(svc, job_id)["reserved_cents"] != 3:
        assert time.monotonic() < deadline, "the slow render never reserved"
        time.sleep(0.02)
    with pytest.raises(LimitBelowSpent, match=r"job \d+: a cap of \$0\.05 is below what it "
                                              r"has already spent \(\$0\.03, \$0\.03 more"):
        resume_job(svc.sessions, job_id, budget_cents=5, in_process=False)
    with pytest.raises(LimitBelowSpent, match=r"a limit of \$0\.05 is below what it has spent "
                                              r"this month \(\$0\.03, \$0\.03 more"), \
            transaction(svc.sessions) as session:
        set_team(session, "t", 5, "month")
    s = summary(svc, job_id)
    assert (s["status"], s["budget_cents"], s["spent_cents"], s["reserved_cents"]) == (
        "running", 100, 3, 3)
    with svc.sessions() as session:
        assert team_state(session, "t").limit_cents == 100
    resume_job(svc.sessions, job_id, budget_cents=6, in_process=False)  # = spent + reserved
    with transaction(svc.sessions) as session:
        set_team(session, "t", 6, "month")
    in_flight.join(timeout=20)
    run_render(svc, third)  # 6 of 6 spent: no room
    s = summary(svc, job_id)
    assert (s["status"], s["spent_cents"], s["items_failed"]) == ("partial", 6, 1)
    assert fake.stats()["billed_cents"] == 6
    assert_books_balance(svc, job_id)
    with transaction(svc.sessions) as session:
        set_team(session, "t", 9, "month")
        assert retry_job(session, job_id, budget_cents=9) == 1
