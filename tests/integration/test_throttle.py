"""429 storms: a 429 is "not now". It costs a render no attempt (its reservation is released),
the worker's window of calls to that model shrinks on it and grows on results, so a provider
that serves 2 calls at once gets about 2 at once; a render still ends after
IMAGEBATCH_MAX_RATE_LIMITED 429s."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.dispatch import dispatch_pending
from pipeline.models import Attempt, Render
from pipeline.runtime import Services, start_services
from pipeline.settings import Settings
from pipeline.sweep import sweep
from tests.helpers import assert_books_balance, run_job, submit, summary

ONE = {"model": "flux-2-klein-4b", "prompt": "p"}  # 1 cent an image


@pytest.fixture
def two_at_once() -> Iterator[FakeServer]:
    """A provider that serves 2 generations at once and answers 429 (no Retry-After) above."""
    config = FakeConfig(latency=0.3, keepalive_interval=0.05, max_concurrent=2)
    with FakeServer(config) as server:
        yield server


def services(settings: Settings, fake: FakeServer, **overrides: Any) -> Services:
    return start_services(replace(settings, api_base=fake.base_url, **overrides))


def attempts_of(svc: Services, job_id: int) -> list[Attempt]:
    with svc.sessions() as session:
        return list(session.scalars(
            select(Attempt).join(Render).where(Render.job_id == job_id).order_by(Attempt.id)))


def test_thirty_items_against_a_provider_that_serves_two_at_once_all_succeed(
        settings: Settings, two_at_once: FakeServer) -> None:
    """Before: 12 of 30 items failed for good, 78 of 96 calls were 429s. Now every item
    succeeds, each 429 is released (nothing billed, no attempt used), the worker's calls to
    the model settle at the provider's 2, and 429s are few: the first burst (the worker's 16
    call slots against 2 places) and a handful of probes after it."""
    svc = services(settings, two_at_once, max_attempts=2)
    try:
        lines = [{**ONE, "prompt": f"p{i}"} for i in range(30)]
        s = run_job(svc, lines, concurrency=30)
        assert_books_balance(svc, s["id"])
        attempts = attempts_of(svc, s["id"])
    finally:
        svc.close()
    stats = two_at_once.stats()
    rate_limited = stats["by_outcome"].get("rate_limited", 0)
    assert (s["status"], s["items_succeeded"], s["images"]) == ("succeeded", 30, 30)
    assert s["spent_cents"] == 30 == stats["billed_cents"]
    assert stats["max_serving"] == 2
    first_burst = svc.settings.concurrency - 2
    assert 1 <= rate_limited <= first_burst + 8, stats
    assert stats["calls"] == 30 + rate_limited == len(attempts)
    outcomes = sorted((a.outcome, a.http_status) for a in attempts)
    assert outcomes == sorted([("charged", None)] * 30 + [("released", 429)] * rate_limited)


def test_a_429_uses_no_attempt(settings: Settings, fake: FakeServer) -> None:
    """With IMAGEBATCH_MAX_ATTEMPTS=1, three 429s and then a result: the item succeeds (it
    failed at the first 429 before)."""
    svc = services(settings, fake, max_attempts=1)
    try:
        s = run_job(svc, [{**ONE, "fake": {"status": 429, "fail_first": 3, "key": "three"}}])
        assert_books_balance(svc, s["id"])
        outcomes = [(a.outcome, a.http_status) for a in attempts_of(svc, s["id"])]
    finally:
        svc.close()
    assert (s["status"], s["spent_cents"]) == ("succeeded", 1)
    assert outcomes == [("released", 429)] * 3 + [("charged", None)]


def test_other_failures_still_use_attempts_between_429s(settings: Settings, fake: FakeServer
                                                        ) -> None:
    """429s do not count, 500s do: with 2 attempts, a render answered 500 always fails after
    2 calls whatever 429s came between (the key's first 2 calls are 429s here)."""
    svc = services(settings, fake, max_attempts=2)
    try:
        s = run_job(svc, [{**ONE, "fake": {"status": 429, "fail_first": 2, "key": "mix"}},
                          {**ONE, "prompt": "q", "fake": {"status": 500}}])
        assert_books_balance(svc, s["id"])
        with svc.sessions() as session:
            calls = session.execute(
                select(Render.item_id, Attempt.http_status).join(Render)
                .where(Render.job_id == s["id"]).order_by(Attempt.id)).all()
    finally:
        svc.close()
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 1, 1)
    by_item: dict[int, list[int | None]] = {}
    for item, status in calls:
        by_item.setdefault(item, []).append(status)
    assert sorted(by_item.values(), key=len) == [[500, 500], [429, 429, None]]


def test_a_provider_that_answers_429_forever_ends_the_render_at_max_rate_limited(
        settings: Settings, fake: FakeServer) -> None:
    svc = services(settings, fake, max_attempts=2, max_rate_limited=5)
    try:
        s = run_job(svc, [{**ONE, "fake": {"status": 429}}])
        assert_books_balance(svc, s["id"])
        attempts = attempts_of(svc, s["id"])
        with svc.sessions() as session:
            error = session.scalars(select(Render.error)).one()
    finally:
        svc.close()
    assert (s["status"], s["spent_cents"], s["reserved_cents"]) == ("failed", 0, 0)
    assert [(a.outcome, a.http_status) for a in attempts] == [("released", 429)] * 5
    assert fake.stats()["calls"] == 5
    assert "HTTP 429" in error and "gave up after 5 answers of 429 in a row" in error


def test_the_sweeper_does_not_count_429s_against_a_lost_render(settings: Settings,
                                                               fake: FakeServer) -> None:
    """A render that had a 429, then lost its worker mid-call: with 2 attempts it has one
    left, so the sweeper queues it again (it failed it, counting the 429, before)."""
    svc = services(settings, fake, max_attempts=2, lease_seconds=1.0)
    try:
        job_id = submit(svc, [{**ONE, "fake": {"status": 429, "fail_first": 1, "key": "lost",
                                              "stall": True}}])
        (render_id,) = dispatch_pending(svc)
        # The first call is a 429, the second stalls: the render's worker "dies" when the
        # test stops waiting for it (its lease runs out; nothing renews it once closed).
        with pytest.raises(TimeoutError):
            svc.io.run(asyncio.wait_for(_render(svc, render_id), timeout=2.5))
    finally:
        svc.close()
    svc = services(settings, fake, max_attempts=2, lease_seconds=1.0)
    try:
        revived = _sweep_until_revived(svc, render_id)
        assert revived == [render_id]
        outcomes = [(a.outcome, a.http_status) for a in attempts_of(svc, job_id)]
        assert outcomes == [("released", 429), ("unknown", None)]
        assert summary(svc, job_id)["finished_at"] is None  # queued again, not failed
        assert_books_balance(svc, job_id)
    finally:
        svc.close()


async def _render(svc: Services, render_id: int) -> str:
    from pipeline.render import render_to_end

    return await render_to_end(svc, render_id)


def _sweep_until_revived(svc: Services, render_id: int) -> list[int]:
    import time

    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        revived = sweep(svc.sessions, svc.settings)
        if revived:
            return revived
        time.sleep(0.2)
    return []


# --- the window itself (pure asyncio) ----------------------------------------------------------


def test_max_rate_limited_below_max_attempts_still_ends_the_render(settings: Settings,
                                                                  fake: FakeServer) -> None:
    svc = services(settings, fake, max_attempts=4, max_rate_limited=2)
    try:
        s = run_job(svc, [{**ONE, "fake": {"status": 429}}])
        assert_books_balance(svc, s["id"])
    finally:
        svc.close()
    assert (s["status"], fake.stats()["calls"]) == ("failed", 2)
