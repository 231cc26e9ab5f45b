"""Budget invariants under concurrency, and the ledger's exactly-once settlement."""

from __future__ import annotations

import threading
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy import select, update

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.ledger import reserve, settle
from pipeline.models import Attempt, AttemptOutcome, Job, Render, RenderStatus, utcnow
from pipeline.render import run_render
from pipeline.sweep import sweep
from tests.helpers import assert_books_balance, render_all, submit, summary

ONE = {"model": "flux-2-klein-4b", "prompt": "p"}  # 1 cent an image


def test_200_renders_under_a_cap_that_fits_50_never_overspend(svc, fake):
    job_id = submit(svc, [{**ONE, "fake": {"latency": 0.05}}] * 200, budget_cents=50)
    render_ids = dispatch_pending(svc)
    samples: list[tuple[int, int, int]] = []
    done = threading.Event()
    watcher_engine = sa.create_engine(svc.settings.database_url, poolclass=sa.pool.NullPool)

    def sample() -> None:
        # A second connection, as any other program watching the database would have.
        with watcher_engine.connect() as connection:
            while not done.is_set():
                samples.append(tuple(connection.execute(sa.text(
                    "SELECT spent_cents, reserved_cents, budget_cents FROM jobs WHERE id = :j"),
                    {"j": job_id}).one()))
                connection.rollback()  # a fresh snapshot for the next sample

    watcher = threading.Thread(target=sample)
    watcher.start()
    render_all(svc, render_ids, concurrency=32)
    done.set()
    watcher.join()
    assert len(samples) > 20
    assert max(s + r for s, r, _ in samples) <= 50
    assert any(r > 0 for _, r, _ in samples)  # the sampler saw renders in flight
    s = summary(svc, job_id)
    assert s["spent_cents"] == 50 == fake.stats()["billed_cents"]
    assert (s["items_succeeded"], s["items_failed"], s["status"]) == (50, 150, "partial")
    assert_books_balance(svc, job_id)


def test_settlement_happens_once_however_often_it_is_tried(svc, fake):
    job_id = submit(svc, [ONE])
    (render_id,) = dispatch_pending(svc)
    with transaction(svc.sessions) as session:
        render = session.get_one(Render, render_id)
        reservation = reserve(session, render, "t")
        assert reservation is not None
        render.attempts = reservation.number
    with transaction(svc.sessions) as session:
        assert settle(session, reservation.attempt_id, AttemptOutcome.CHARGED)
        assert not settle(session, reservation.attempt_id, AttemptOutcome.UNKNOWN)
        assert not settle(session, reservation.attempt_id, AttemptOutcome.RELEASED)
    s = summary(svc, job_id)
    assert (s["spent_cents"], s["reserved_cents"], s["unknown_cents"]) == (1, 0, 0)


def test_a_render_whose_worker_died_is_charged_unknown_once_and_requeued(svc, fake):
    job_id = submit(svc, [ONE])
    (render_id,) = dispatch_pending(svc)
    # What a worker killed mid-call leaves behind: a reserved attempt and a running render.
    with transaction(svc.sessions) as session:
        render = session.get_one(Render, render_id)
        reservation = reserve(session, render, "t")
        render.attempts = reservation.number
        render.status = RenderStatus.RUNNING
        render.lease_until = utcnow() + timedelta(minutes=5)
    assert run_render(svc, render_id) == "busy"  # the lease is live: hands off
    assert sweep(svc.sessions, svc.settings) == []
    with transaction(svc.sessions) as session:
        session.execute(update(Render).values(lease_until=utcnow() - timedelta(seconds=1)))
    assert sweep(svc.sessions, svc.settings) == [render_id]
    assert sweep(svc.sessions, svc.settings) == []  # a second sweeper finds nothing to do
    assert run_render(svc, render_id) == "finished"
    s = summary(svc, job_id)
    with svc.sessions() as session:
        outcomes = list(session.scalars(select(Attempt.outcome).order_by(Attempt.number)))
    assert outcomes == ["unknown", "charged"]
    assert (s["status"], s["spent_cents"], s["unknown_cents"]) == ("succeeded", 2, 1)
    assert_books_balance(svc, job_id)


def test_lowering_the_cap_below_spent_stops_new_reservations(svc, fake):
    job_id = submit(svc, [ONE] * 4, budget_cents=100)
    first, *rest = dispatch_pending(svc)
    run_render(svc, first)
    with transaction(svc.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(budget_cents=0))
    render_all(svc, rest)
    s = summary(svc, job_id)
    assert (s["spent_cents"], s["items_succeeded"], s["items_failed"]) == (1, 1, 3)
    assert_books_balance(svc, job_id, within_cap=False)
