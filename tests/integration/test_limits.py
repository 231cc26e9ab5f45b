"""Limits shared through real Redis: renders in flight, per-model rates, 429 pauses."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from pipeline.limits import Rate, RedisLimits
from pipeline.runtime import start_services
from tests.helpers import assert_books_balance, run_job


def two_workers(redis_url: str, **kwargs: object) -> list[RedisLimits]:
    prefix = f"test-{uuid.uuid4().hex[:8]}"  # tests share one Redis; keys must not mix
    defaults = {"max_in_flight": 0, "rates": {}, "slot_ttl": 30.0}
    return [RedisLimits(redis_url, prefix=prefix, **{**defaults, **kwargs}) for _ in range(2)]


async def _count_concurrency(limiters: list, tasks: int, model: str = "m") -> int:
    current = peak = 0

    async def one(limiter) -> None:
        nonlocal current, peak
        async with limiter.slot(model):
            current += 1
            peak = max(peak, current)
            await asyncio.sleep(0.02)
            current -= 1

    await asyncio.gather(*(one(limiters[i % len(limiters)]) for i in range(tasks)))
    for limiter in limiters:
        await limiter.aclose()
    return peak


def test_in_flight_limit_holds_across_workers(redis_url):
    async def scenario() -> int:
        return await _count_concurrency(two_workers(redis_url, max_in_flight=5), 60)

    peak = asyncio.run(scenario())
    assert 1 < peak <= 5


def test_a_model_rate_is_shared_by_every_worker(redis_url):
    async def scenario() -> float:
        limiters = two_workers(redis_url, rates={"m": Rate(20, 1.0)})
        started = time.monotonic()
        await _count_concurrency(limiters, 21)
        return time.monotonic() - started

    # 21 requests at 20/s, however many workers ask: the last starts after about 1 s.
    assert asyncio.run(scenario()) >= 0.95


def test_a_429_pauses_the_model_for_every_worker(redis_url):
    async def scenario() -> tuple[float, float]:
        first, second = two_workers(redis_url)
        await first.slow_down("m", 1.0)
        started = time.monotonic()
        async with second.slot("other"):
            other = time.monotonic() - started
        async with second.slot("m"):
            paused = time.monotonic() - started
        await first.aclose()
        await second.aclose()
        return other, paused

    other, paused = asyncio.run(scenario())
    assert other < 0.2 and paused >= 0.9


def test_the_pipeline_respects_max_in_flight_through_redis(settings, fake, redis_url):
    svc = start_services(replace(settings, redis_url=redis_url, max_in_flight=4))
    try:
        s = run_job(svc, [{"model": "flux-2-klein-4b", "prompt": "p",
                           "fake": {"latency": 0.2}}] * 24, concurrency=16)
    finally:
        svc.close()
    assert s["status"] == "succeeded"
    assert fake.stats()["max_in_flight"] <= 4


def test_a_worker_calls_at_most_its_concurrency_while_more_renders_run(settings, fake):
    """IMAGEBATCH_CONCURRENCY bounds the calls in flight; the renders ahead (here 8 renders
    on 3 call slots) reserve and settle around them, and every call slot stays busy."""
    svc = start_services(replace(settings, concurrency=3, renders_ahead=5))
    try:
        s = run_job(svc, [{"model": "flux-2-klein-4b", "prompt": "p",
                           "fake": {"latency": 0.2}}] * 24, concurrency=8)
        assert s["status"] == "succeeded" and s["spent_cents"] == fake.stats()["billed_cents"]
        assert_books_balance(svc, s["id"])
    finally:
        svc.close()
    assert fake.stats()["max_in_flight"] == 3
