"""The sweeper: its backstop against renders ending at the same moment, and which queued
renders it sends again."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select, update

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending, feed_window
from pipeline.models import Attempt, Job, Render, RenderStatus, Worker, utcnow
from pipeline.queue import announce_worker, fill_window
from pipeline.render import end_render, run_render
from pipeline.sweep import sweep
from tests.helpers import submit, summary, wait_until_blocked

ONE = {"model": "flux-2-klein-4b", "prompt": "p"}


def test_a_sweep_during_a_render_ending_still_lets_the_last_render_close_the_job(svc, fake):
    """A sweep that recounts the job's open renders while one is ending must count what is
    open once that render's transaction is over; a stale count keeps the finished job open
    until the next sweep (30 s later by default)."""
    job_id = submit(svc, [ONE, ONE])
    first, second = dispatch_pending(svc)
    swept = threading.Thread(target=sweep, args=(svc.sessions, svc.settings))
    with transaction(svc.sessions) as session:
        render = session.get_one(Render, first)
        # Ending a render takes it off its job's open count and holds the job's row until
        # the commit: the sweep's recount has to wait for it.
        end_render(session, render, RenderStatus.CANCELLED, "cancelled by the test")
        swept.start()
        wait_until_blocked(svc)
    swept.join(timeout=30)
    assert not swept.is_alive()
    with svc.sessions() as session:
        assert session.get_one(Job, job_id).open_renders == 1
    assert run_render(svc, second) == "finished"
    s = summary(svc, job_id)
    assert s["finished_at"] is not None
    assert (s["status"], s["items_succeeded"], s["items_cancelled"]) == ("partial", 1, 1)


def test_a_moving_queue_is_not_sent_again_but_a_render_it_passed_over_is(svc, fake):
    """Renders sent longer than REQUEUE_AFTER ago go back to the SQL queue (to be sent again)
    only when their message looks lost: one sent after them has started while they did not
    (the broker hands messages out first in, first out), or no attempt has started for that
    long. A render still waiting its turn behind a busy worker is left alone."""
    job_id = submit(svc, [ONE] * 3)
    first, middle, last = dispatch_pending(svc)
    long_ago = utcnow() - timedelta(seconds=svc.settings.requeue_after + 60)
    with transaction(svc.sessions) as session:
        session.execute(update(Render).where(Render.id == first).values(enqueued_at=long_ago))
        session.execute(update(Render).where(Render.id.in_([middle, last]))
                        .values(enqueued_at=long_ago + timedelta(seconds=1)))
    assert run_render(svc, middle) == "finished"  # the queue reached `middle`, not `first`
    assert sweep(svc.sessions, svc.settings) == []
    assert unsent(svc) == [first]  # back in SQL: `last` was sent with `middle`, not before it
    assert feed_window(svc) == [first]
    with transaction(svc.sessions) as session:  # no attempt has started since long ago
        session.execute(update(Attempt).values(started_at=long_ago))
        session.execute(update(Render).where(Render.id == first).values(enqueued_at=long_ago))
    sweep(svc.sessions, svc.settings)
    assert unsent(svc) == [first, last]
    assert sorted(feed_window(svc)) == [first, last]
    sweep(svc.sessions, svc.settings)
    assert unsent(svc) == []  # both were just sent again
    assert summary(svc, job_id)["items_succeeded"] == 1


def test_the_window_holds_what_the_live_workers_can_run(svc, fake):
    """A job of any size costs the broker a window: twice the live workers' render slots
    (or IMAGEBATCH_BROKER_WINDOW); the rest waits in SQL and is sent as renders start."""
    job_id = submit(svc, [ONE] * 30)
    announce_worker(svc.sessions, "w1", 4)
    sent = dispatch_pending(svc)
    assert len(sent) == 2 * 4 and len(unsent(svc)) == 22
    assert feed_window(svc) == []  # full: nothing started
    for render_id in sent[:3]:
        assert run_render(svc, render_id) == "finished"
    waiting = unsent(svc)
    assert feed_window(svc) == waiting[:3]  # three started, three sent, oldest first
    with transaction(svc.sessions) as session:
        session.execute(update(Worker).values(seen_at=utcnow() - timedelta(hours=1)))
    announce_worker(svc.sessions, "w2", 1)  # w1 stopped beating: only w2's slot counts
    assert feed_window(svc) == []  # 8 sent and not started, a window of 2
    assert len(fill_window(svc.sessions, 12, live_within=60)) == 12 - 8  # the override
    assert summary(svc, job_id)["status"] == "running"


def test_a_small_job_is_not_stuck_behind_a_big_one(svc, fake):
    big = submit(svc, [ONE] * 40)
    small = submit(svc, [ONE] * 2)
    announce_worker(svc.sessions, "w1", 5)
    sent = dispatch_pending(svc)
    with svc.sessions() as session:
        jobs = [session.get_one(Render, r).job_id for r in sent]
    assert jobs.count(small) == 2 and jobs.count(big) == 8


def unsent(svc) -> list[int]:
    """The queued renders waiting in SQL for the broker's window."""
    with svc.sessions() as session:
        return list(session.scalars(
            select(Render.id).where(Render.status == RenderStatus.QUEUED,
                                    Render.enqueued_at.is_(None)).order_by(Render.id)))
