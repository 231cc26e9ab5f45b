"""The sweeper's backstop against renders ending at the same moment."""

from __future__ import annotations

import threading

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.models import Job, Render, RenderStatus
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
