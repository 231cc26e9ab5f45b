"""Pause, resume, cancel at scale and retry --only: what a user sees, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace

import pytest

from pipeline.db import transaction
from pipeline.dispatch import current_caps, dispatch_pending, feed_window
from pipeline.jobs import (
    cancel_in_chunks,
    pause_job,
    plan_job,
    renders_running,
    resume_job,
    retry_job,
)
from pipeline.render import run_render
from pipeline.runtime import start_services
from tests.helpers import assert_books_balance, render_all, submit, summary

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3¢ an image


def lines(count: int, **extra: object) -> list[dict[str, object]]:
    return [{**FLUX, "prompt": f"otter {i}", **extra} for i in range(count)]


def calls_by_prompt(fake) -> Counter[str]:
    return Counter(r["body"]["prompt"] for r in fake.requests())


def start_in_threads(svc, render_ids: list[int]) -> list[threading.Thread]:
    threads = [threading.Thread(target=run_render, args=(svc, r)) for r in render_ids]
    for thread in threads:
        thread.start()
    return threads


def wait_for_calls(fake, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while fake.stats()["in_flight"] < count:
        assert time.monotonic() < deadline, "the renders never called"
        time.sleep(0.02)


def test_pause_lets_calls_in_flight_finish_and_resume_renders_the_rest_once(svc, fake):
    job_id = submit(svc, lines(12, fake={"latency": 0.5}))
    sent = dispatch_pending(svc)
    assert len(sent) == 12
    in_flight = start_in_threads(svc, sent[:3])
    wait_for_calls(fake, 3)
    with transaction(svc.sessions) as session:
        assert pause_job(session, job_id)
    # Delivered after the pause: back to waiting in SQL, nothing reserved, nobody called.
    assert set(render_all(svc, sent[3:])) == {"paused"}
    for thread in in_flight:
        thread.join(20)
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["reserved_cents"]) == ("paused", 3, 0)
    assert s["finished_at"] is None and fake.stats()["calls"] == 3
    with svc.sessions() as session:
        assert renders_running(session, job_id) == 0
    assert dispatch_pending(svc) == []  # a paused job sends nothing

    resumed = resume_job(svc.sessions, job_id)
    assert (resumed.before, resumed.status) == ("paused", "running")
    render_all(svc, dispatch_pending(svc))
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["images"]) == ("succeeded", 12, 12)
    assert calls_by_prompt(fake) == Counter({f"otter {i}": 1 for i in range(12)})
    assert s["spent_cents"] == 36 == fake.stats()["billed_cents"]
    assert_books_balance(svc, job_id)


def test_resuming_a_cancelled_job_renders_only_its_cancelled_items(svc, fake):
    """Six items, four planned (the dispatcher plans in chunks): one rendered, one in flight
    when the job is cancelled (it finishes and is charged), two queued renders and two items
    never planned are cancelled. Resume renders those four, and nothing twice."""
    job_id = submit(svc, [{**line, "fake": {"latency": 0.6 if i == 1 else 0.05}}
                          for i, line in enumerate(lines(6))])
    caps = current_caps(svc)  # network: before the transaction
    with transaction(svc.sessions) as session:
        assert plan_job(session, job_id, caps, chunk=4) == 4
    first, second, *queued = feed_window(svc)  # sent, the rest left unplanned
    assert len(queued) == 2
    assert run_render(svc, first) == "finished"
    in_flight = start_in_threads(svc, [second])
    wait_for_calls(fake, 1)
    assert cancel_in_chunks(svc.sessions, job_id, chunk=1)  # a transaction per row
    assert set(render_all(svc, queued)) <= {"terminal", "cancelled"}
    in_flight[0].join(20)
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_cancelled"]) == ("cancelled", 2, 4)
    assert s["finished_at"] is not None and s["reserved_cents"] == 0
    assert fake.stats()["calls"] == 2

    resumed = resume_job(svc.sessions, job_id, chunk=1)
    assert (resumed.before, resumed.status, resumed.renders, resumed.items) == (
        "cancelled", "running", 2, 4)
    render_all(svc, dispatch_pending(svc))  # plans the two never planned, sends all four
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_cancelled"]) == ("succeeded", 6, 0)
    assert calls_by_prompt(fake) == Counter({f"otter {i}": 1 for i in range(6)})
    assert s["spent_cents"] == 18 == fake.stats()["billed_cents"]
    assert_books_balance(svc, job_id)


def test_a_finished_job_has_nothing_to_resume(svc, fake):
    job_id = submit(svc, lines(2))
    render_all(svc, dispatch_pending(svc))
    resumed = resume_job(svc.sessions, job_id)
    assert not resumed.resumed and resumed.status == "succeeded"
    assert dispatch_pending(svc) == [] and fake.stats()["calls"] == 2


def test_cancel_in_chunks_sends_nothing_new_and_leaves_nothing_reserved(svc, fake):
    job_id = submit(svc, lines(50))
    sent = dispatch_pending(svc)
    assert cancel_in_chunks(svc.sessions, job_id, chunk=7)
    assert set(render_all(svc, sent)) == {"terminal"}
    s = summary(svc, job_id)
    assert (s["status"], s["items_cancelled"], s["reserved_cents"]) == ("cancelled", 50, 0)
    assert s["finished_at"] is not None and fake.stats()["calls"] == 0
    assert not cancel_in_chunks(svc.sessions, job_id)  # ended: nothing to do
    assert_books_balance(svc, job_id)


@pytest.fixture
def one_attempt(settings):
    svc = start_services(replace(settings, max_attempts=1))
    yield svc
    svc.close()


def test_retry_only_chooses_which_items_go_again(one_attempt, fake):
    """ok (3¢), refused (400, released), cut (unknown: 3¢ charged), then an item of 4 images
    (12¢) that no longer fits the 10¢ cap: failed for budget."""
    svc = one_attempt
    job_id = submit(svc, [{**FLUX, "prompt": "ok"},
                          {**FLUX, "prompt": "refused", "fake": {"status": 400}},
                          {**FLUX, "prompt": "cut", "fake": {"cut": True}},
                          {**FLUX, "prompt": "big", "n": 4}], budget_cents=10)
    for render_id in dispatch_pending(svc):  # in line order, one at a time
        run_render(svc, render_id)
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 1, 3)
    assert (s["spent_cents"], s["unknown_cents"]) == (6, 3)

    with transaction(svc.sessions) as session:
        assert retry_job(session, job_id, budget_cents=100, only=["budget"]) == 1
    render_all(svc, dispatch_pending(svc))
    assert calls_by_prompt(fake)["big"] == 1
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 2, 2)

    with transaction(svc.sessions) as session:
        assert retry_job(session, job_id, only=["unknown"]) == 1
    render_all(svc, dispatch_pending(svc))
    assert calls_by_prompt(fake) == Counter({"ok": 1, "refused": 1, "cut": 2, "big": 1})
    assert summary(svc, job_id)["unknown_cents"] == 6  # each cut call may have been billed

    with transaction(svc.sessions) as session:
        assert retry_job(session, job_id, only=["cancelled"]) == 0
        assert retry_job(session, job_id) == 2  # default: every failed item
    render_all(svc, dispatch_pending(svc))
    assert calls_by_prompt(fake) == Counter({"ok": 1, "refused": 2, "cut": 3, "big": 1})
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 2, 2)
    assert_books_balance(svc, job_id)


def test_retry_only_cancelled_renders_the_cancelled_items(svc, fake):
    job_id = submit(svc, lines(3))
    first, *_ = dispatch_pending(svc)
    assert run_render(svc, first) == "finished"
    assert cancel_in_chunks(svc.sessions, job_id)
    with transaction(svc.sessions) as session:
        with pytest.raises(ValueError, match="failed, cancelled, budget, unknown"):
            retry_job(session, job_id, only=["everything"])
        assert retry_job(session, job_id, only=["failed"]) == 0
    with transaction(svc.sessions) as session:
        assert retry_job(session, job_id, only=["cancelled"]) == 2
    render_all(svc, dispatch_pending(svc))
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"]) == ("succeeded", 3)
    assert calls_by_prompt(fake) == Counter({f"otter {i}": 1 for i in range(3)})
    assert_books_balance(svc, job_id)
