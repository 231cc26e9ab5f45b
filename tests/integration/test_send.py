"""The send, recorded before the call, and paused jobs: a render that has sent nothing never
costs more than its reservation for a while, on both databases.

- A render holding its reservation while it waits for a call slot records its send (a
  committed `attempts.sent_at`) only once its job is still running; a paused job's render
  releases its reservation and goes back to the SQL queue instead, without losing an
  attempt; a cancelled job's render ends cancelled.
- A task delivered for a paused job's render reserves nothing and puts it back in SQL.
- A worker killed with reservations not yet sent: those attempts are released by the
  sweeper, only the sent ones are charged unknown (tested on real worker processes).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.pool import NullPool

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.models import (
    Attempt,
    Job,
    JobItem,
    JobStatus,
    LedgerEntry,
    Render,
)
from pipeline.render import begin_attempt, run_render
from pipeline.runtime import Services, start_services
from tests.helpers import assert_books_balance, render_all, submit, summary, wait_until_blocked

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image


def set_job_status(svc: Services, job_id: int, status: JobStatus) -> None:
    """What `pause` / `resume` do to the job's row (any program may write it)."""
    with transaction(svc.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))


def renders_of(svc: Services, job_id: int) -> dict[int, Render]:
    with svc.sessions() as session:
        return {r.id: r for r in session.scalars(select(Render).where(Render.job_id == job_id))}


def attempts_of(svc: Services, render_id: int) -> list[Attempt]:
    with svc.sessions() as session:
        return list(session.scalars(
            select(Attempt).where(Attempt.render_id == render_id).order_by(Attempt.number)))


def ledger_kinds(svc: Services, render_id: int) -> list[str]:
    with svc.sessions() as session:
        return list(session.scalars(select(LedgerEntry.kind).where(
            LedgerEntry.render_id == render_id).order_by(LedgerEntry.id)))


def open_renders(svc: Services, job_id: int) -> int:
    with svc.sessions() as session:
        return session.get_one(Job, job_id).open_renders


def test_renders_waiting_for_a_call_slot_when_the_job_is_paused_go_back_to_sql(settings, fake):
    """One call slot, three renders ahead holding their reservations while the first call
    runs. The job is paused: the call in flight finishes and is charged; the three release
    their reservations without calling and wait in SQL, still open, their attempts not
    counted (MAX_ATTEMPTS 1 here). Resumed, the dispatcher sends them again and they finish."""
    svc = start_services(replace(settings, concurrency=1, renders_ahead=3, max_attempts=1))
    try:
        job_id = submit(svc, [{**FLUX, "fake": {"latency": 1.5}}] * 4)
        renders = dispatch_pending(svc)
        assert len(renders) == 4
        with ThreadPoolExecutor(4) as pool:
            futures = {r: pool.submit(run_render, svc, r) for r in renders}
            deadline = time.monotonic() + 10
            while summary(svc, job_id)["reserved_cents"] < 4 * 3 or fake.stats()["calls"] < 1:
                assert time.monotonic() < deadline, "the renders ahead never reserved"
                time.sleep(0.05)
            set_job_status(svc, job_id, JobStatus.PAUSED)
            results = {r: f.result(timeout=20) for r, f in futures.items()}
        assert Counter(results.values()) == {"finished": 1, "paused": 3}, results
        assert fake.stats()["calls"] == 1  # the paused ones sent nothing
        s = summary(svc, job_id)
        assert (s["status"], s["finished_at"]) == ("paused", None)
        assert (s["reserved_cents"], s["spent_cents"], s["unknown_cents"]) == (0, 3, 0)
        assert s["spent_cents"] == fake.stats()["billed_cents"]
        assert open_renders(svc, job_id) == 3
        assert_books_balance(svc, job_id)
        waiting = sorted(r for r, result in results.items() if result == "paused")
        rows = renders_of(svc, job_id)
        for render_id in waiting:
            row = rows[render_id]
            assert (row.status, row.enqueued_at, row.lease_until) == ("queued", None, None)
            # The attempt stays numbered (attempts 1) but is not counted (retry_from 1), and
            # the delivery that began it is taken back.
            assert (row.attempts, row.retry_from, row.deliveries) == (1, 1, 0)
            (attempt,) = attempts_of(svc, render_id)
            assert (attempt.outcome, attempt.sent_at) == ("released", None)
            assert attempt.error == "the job was paused before the call was sent"
            assert ledger_kinds(svc, render_id) == ["reserve", "release"]
        (sent,) = [r for r, result in results.items() if result == "finished"]
        (attempt,) = attempts_of(svc, sent)
        assert attempt.outcome == "charged" and attempt.sent_at is not None
        with svc.sessions() as session:
            items = Counter(session.scalars(select(JobItem.status).where(
                JobItem.job_id == job_id)))
        assert items == {"succeeded": 1, "running": 3}

        # Paused: nothing is sent to the broker for it.
        assert dispatch_pending(svc) == []
        set_job_status(svc, job_id, JobStatus.RUNNING)
        again = dispatch_pending(svc)
        assert sorted(again) == waiting
        assert render_all(svc, again) == ["finished"] * 3
        s = summary(svc, job_id)
        assert (s["status"], s["items_succeeded"], s["images"]) == ("succeeded", 4, 4)
        assert s["spent_cents"] == 12 == fake.stats()["billed_cents"]
        assert fake.stats()["calls"] == 4
        assert_books_balance(svc, job_id)
        for render_id in waiting:
            assert [a.outcome for a in attempts_of(svc, render_id)] == ["released", "charged"]
            assert ledger_kinds(svc, render_id) == ["reserve", "release", "reserve", "charge"]
    finally:
        svc.close()


@pytest.mark.parametrize("status", [JobStatus.PAUSED, JobStatus.PENDING])
def test_a_task_for_a_paused_job_reserves_nothing_and_waits_in_sql(svc, fake, status):
    job_id = submit(svc, [FLUX] * 2)
    renders = dispatch_pending(svc)
    set_job_status(svc, job_id, status)
    assert render_all(svc, renders) == ["paused"] * 2
    assert fake.stats()["calls"] == 0
    for row in renders_of(svc, job_id).values():
        assert (row.status, row.enqueued_at, row.lease_until) == ("queued", None, None)
        assert (row.attempts, row.deliveries) == (0, 0)  # no attempt, no delivery counted
        assert attempts_of(svc, row.id) == []
    s = summary(svc, job_id)
    assert (s["reserved_cents"], s["spent_cents"], s["finished_at"]) == (0, 0, None)
    assert open_renders(svc, job_id) == 2
    set_job_status(svc, job_id, JobStatus.RUNNING)
    assert render_all(svc, dispatch_pending(svc)) == ["finished"] * 2
    s = summary(svc, job_id)
    assert (s["status"], s["spent_cents"]) == ("succeeded", 6)
    assert_books_balance(svc, job_id)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_hold_refused_because_the_job_was_paused_meanwhile_waits_in_sql(svc, fake):
    """PostgreSQL (a row lock another session can hold): the job is paused after
    begin_attempt read it running, while its hold waits for the job's row; the hold finds
    the job paused, and the render waits in SQL instead of failing."""
    job_id = submit(svc, [FLUX])
    (render_id,) = dispatch_pending(svc)
    other = sa.create_engine(svc.settings.database_url, poolclass=NullPool)
    outcome: list[object] = []

    def begin() -> None:
        with transaction(svc.sessions) as session:
            outcome.append(begin_attempt(svc, render_id, None, session))

    try:
        with other.connect() as connection:
            transaction_ = connection.begin()
            connection.execute(sa.text("SELECT id FROM jobs WHERE id = :j FOR NO KEY UPDATE"),
                               {"j": job_id})
            thread = threading.Thread(target=begin)
            thread.start()
            wait_until_blocked(svc)  # the hold waits for the job's row
            connection.execute(sa.text("UPDATE jobs SET status = 'paused' WHERE id = :j"),
                               {"j": job_id})
            transaction_.commit()
            thread.join(timeout=30)
    finally:
        other.dispose()
    assert outcome == ["paused"]
    row = renders_of(svc, job_id)[render_id]
    assert (row.status, row.enqueued_at, row.deliveries, row.attempts) == ("queued", None, 0, 0)
    assert summary(svc, job_id)["reserved_cents"] == 0
    assert fake.stats()["calls"] == 0


# --- a worker process SIGKILLed with reservations it had not sent ------------------------------
