"""The sweeper: its backstop against renders ending at the same moment, and which queued
renders it sends again."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import update

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.models import Attempt, Job, Render, RenderStatus, utcnow
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
    """Renders queued for longer than REQUEUE_AFTER are sent again only when their message
    looks lost: one enqueued after them has started while they did not (the queue is first in,
    first out), or no attempt has started for that long. A render still waiting its turn in a
    long queue is left alone, or a big job would flood its queue with duplicates."""
    job_id = submit(svc, [ONE] * 3)
    first, middle, last = dispatch_pending(svc)
    assert run_render(svc, middle) == "finished"  # the queue reached `middle`, not `first`
    long_ago = utcnow() - timedelta(seconds=svc.settings.requeue_after + 60)
    with transaction(svc.sessions) as session:
        session.execute(update(Render).where(Render.id.in_([first, last]))
                        .values(enqueued_at=long_ago))
    assert sweep(svc.sessions, svc.settings) == [first]
    with transaction(svc.sessions) as session:  # no attempt has started since long ago
        session.execute(update(Attempt).values(started_at=long_ago))
    assert sweep(svc.sessions, svc.settings) == [last]  # `first` was just sent again
    assert sweep(svc.sessions, svc.settings) == []
    assert summary(svc, job_id)["items_succeeded"] == 1
