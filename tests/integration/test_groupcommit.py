"""The group committer: works queued together share one transaction, a failing work stays
its own, and nothing is answered before its COMMIT."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

from sqlalchemy import select

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.groupcommit import GroupCommit
from pipeline.ledger import job_ledger_totals
from pipeline.models import Job, Render, Team
from pipeline.render import Begun, begin_attempt, finish_attempt
from pipeline.teams import set_team, team_state
from pipeline.upstream import Refused
from tests.helpers import assert_books_balance, submit, summary

ONE = {"model": "flux-2-klein-4b", "prompt": "p"}


def _queue_behind_a_busy_committer(svc, works):
    """Run `works` through one committer while its thread is held on a first work, so they
    all queue up and are taken as one group. Returns each work's result or exception."""
    gate = threading.Event()
    commits = GroupCommit(svc.sessions, committers=1)

    def hold(session):
        assert gate.wait(10)

    async def main():
        first = asyncio.ensure_future(commits.run(hold))
        await asyncio.sleep(0.05)  # the committer is now inside `hold`
        rest = [asyncio.ensure_future(commits.run(work)) for work in works]
        await asyncio.sleep(0)  # each has queued its work
        gate.set()
        await first
        return await asyncio.gather(*rest, return_exceptions=True)

    try:
        return svc.io.run(main())
    finally:
        commits.stop()


def _add_team(name, connections, session):
    connections.append(session.connection())
    session.add(Team(name=name))
    return name


def test_works_queued_together_share_one_transaction_and_get_their_own_results(svc):
    connections = []
    works = [partial(_add_team, f"team-{i}", connections) for i in range(20)]
    results = _queue_behind_a_busy_committer(svc, works)
    assert results == [f"team-{i}" for i in range(20)]
    assert len({id(c) for c in connections}) == 1  # one group, one transaction
    with svc.sessions() as session:
        assert len(session.scalars(select(Team.name)).all()) == 20


def test_a_failing_work_raises_its_own_error_and_the_others_still_commit(svc):
    class Broken(Exception):
        pass

    def broken(session):
        session.add(Team(name="half-written"))
        session.flush()
        raise Broken("this work fails")

    connections = []
    works = [partial(_add_team, "before", connections), broken,
             partial(_add_team, "after", connections)]
    before, failed, after = _queue_behind_a_busy_committer(svc, works)
    assert (before, after) == ("before", "after")
    assert isinstance(failed, Broken)
    with svc.sessions() as session:
        assert sorted(session.scalars(select(Team.name))) == ["after", "before"]
    # "before" ran in the group, which rolled back at `broken`; then each ran again alone.
    assert len(connections) == 3


def test_attempts_begun_in_one_group_each_hold_their_own_price(svc, fake):
    renders = 12
    job_id = submit(svc, [ONE] * renders, budget_cents=renders * 10)
    render_ids = dispatch_pending(svc)
    works = [partial(begin_attempt, svc, render_id, None) for render_id in render_ids]
    begun = _queue_behind_a_busy_committer(svc, works)
    assert all(isinstance(step, Begun) for step in begun)
    assert sorted(step.render_id for step in begun) == sorted(render_ids)
    assert len({step.attempt_id for step in begun}) == renders
    with svc.sessions() as session:
        job = session.get_one(Job, job_id)
        totals = job_ledger_totals(session, job_id)
        price = begun[0].amount_cents
        assert job.reserved_cents == totals.reserved_cents == renders * price
        assert job.spent_cents == 0
    assert fake.requests() == []  # reserving calls nobody


def test_several_committers_commit_every_work_once(svc):
    commits = GroupCommit(svc.sessions, committers=4)

    async def main():
        return await asyncio.gather(*(
            commits.run(partial(_add_team, f"team-{i}", [])) for i in range(60)))

    try:
        results = svc.io.run(main())
    finally:
        commits.stop()
    assert results == [f"team-{i}" for i in range(60)]
    with svc.sessions() as session:
        assert sorted(session.scalars(select(Team.name))) == sorted(results)


def test_holds_refused_at_the_end_of_a_group_are_redone_with_the_holds_first(svc, fake):
    """In a group the holds are its last statements; when one is refused the group rolls
    back, and every render is tried again alone with its holds first: those the budget
    still covers start, the others fail with the reason, and nothing is held twice."""
    renders, fits = 8, 5
    job_id = submit(svc, [ONE] * renders)
    render_ids = dispatch_pending(svc)
    with transaction(svc.sessions) as session:
        price = session.get_one(Render, render_ids[0]).price_per_image_cents
        session.get_one(Job, job_id).budget_cents = fits * price
    works = [partial(begin_attempt, svc, render_id, None) for render_id in render_ids]
    results = _queue_behind_a_busy_committer(svc, works)
    begun = [r for r in results if isinstance(r, Begun)]
    assert len(begun) == fits
    assert sorted(r for r in results if not isinstance(r, Begun)) == ["budget"] * (renders - fits)
    with svc.sessions() as session:
        job = session.get_one(Job, job_id)
        totals = job_ledger_totals(session, job_id)
        assert job.reserved_cents == totals.reserved_cents == sum(b.amount_cents for b in begun)
        assert job.reserved_cents == fits * price == job.budget_cents


def _begin_alone(svc, render_ids):
    begun = []
    for render_id in render_ids:
        with transaction(svc.sessions) as session:
            begun.append(begin_attempt(svc, render_id, None, session))
    return begun


REFUSED = Refused("content policy", 400, retryable=False)


def test_a_hold_fits_on_money_a_settlement_frees_in_the_same_group(svc, fake):
    """The job's cap covers four renders, all four hold it; in one group a fifth render
    begins (queued first) while one of the four is refused (released): the group's holds
    and settlements move the job's row as one, so the fifth starts at once."""
    job_id = submit(svc, [ONE] * 5)
    *first_four, fifth = dispatch_pending(svc)
    with transaction(svc.sessions) as session:
        price = session.get_one(Render, fifth).price_per_image_cents
        session.get_one(Job, job_id).budget_cents = 4 * price
    begun = _begin_alone(svc, first_four)
    assert all(isinstance(step, Begun) for step in begun)
    started, retry = _queue_behind_a_busy_committer(svc, [
        partial(begin_attempt, svc, fifth, None),
        partial(finish_attempt, svc, begun[0], REFUSED, None),
    ])
    assert isinstance(started, Begun) and retry.retry_in is None
    s = summary(svc, job_id)
    assert (s["reserved_cents"], s["spent_cents"]) == (4 * price, 0)
    assert_books_balance(svc, job_id)
    assert fake.requests() == []


def test_the_last_renders_ending_in_one_group_close_the_job_and_move_the_team(svc, fake):
    with transaction(svc.sessions) as session:
        set_team(session, "grouped", 1_000, "month")
    job_id = submit(svc, [ONE] * 6, team="grouped")
    begun = _begin_alone(svc, dispatch_pending(svc))
    with svc.sessions() as session:
        assert team_state(session, "grouped").reserved_cents == 6 * begun[0].amount_cents
    results = _queue_behind_a_busy_committer(
        svc, [partial(finish_attempt, svc, step, REFUSED, None) for step in begun])
    assert [r.retry_in for r in results] == [None] * 6
    s = summary(svc, job_id)
    assert s["status"] == "failed" and s["finished_at"] is not None
    assert (s["reserved_cents"], s["spent_cents"], s["items_failed"]) == (0, 0, 6)
    assert_books_balance(svc, job_id)
    with svc.sessions() as session:
        team = team_state(session, "grouped")
        assert (team.reserved_cents, team.spent_cents, team.left_cents) == (0, 0, 1_000)
