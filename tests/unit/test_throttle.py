"""429 storms, the worker's side: its window of calls to a model shrinks on a 429 and grows
on results, so a provider that serves 2 calls at once gets about 2 at once (the renders
end to end: tests/integration/test_throttle.py)."""

from __future__ import annotations

import asyncio

from pipeline.limits import ModelWindow


def test_the_window_halves_once_per_burst_to_what_was_served_and_grows_back() -> None:
    async def scenario() -> list[float]:
        window = ModelWindow(16)
        seen = [window.allowed]
        epochs = [await window.enter() for _ in range(10)]
        for _ in range(2):  # two calls the provider took
            window.accepted()
        # The other 8 are answered 429: only the first shrinks the window, to the 2 served.
        for epoch in epochs[2:]:
            await window.leave(epoch, accepted=False, answer="rate_limited")
        seen.append(window.allowed)
        await window.leave(epochs[0], accepted=True, answer="served")
        # A 429 of a call sent under the smaller window halves it again (floor 1).
        third = await asyncio.wait_for(window.enter(), 1)
        await window.leave(third, accepted=False, answer="rate_limited")
        seen.append(window.allowed)
        await window.leave(epochs[1], accepted=True, answer="served")  # a result: it grows
        seen.append(window.allowed)
        return seen

    start, after_burst, after_probe, after_results = asyncio.run(scenario())
    assert (start, after_burst, after_probe) == (16, 2, 1)
    assert 1 < after_results < 2  # probing above the level that got a 429 goes slowly


def test_calls_wait_for_room_in_the_window() -> None:
    async def scenario() -> int:
        window = ModelWindow(16)
        first = await window.enter()
        window.accepted()
        second = await window.enter()
        await window.leave(second, accepted=False, answer="rate_limited")  # window: 1
        waiting = asyncio.ensure_future(window.enter())
        await asyncio.sleep(0.05)
        assert not waiting.done()  # one in flight fills a window of 1
        await window.leave(first, accepted=True, answer="served")
        await asyncio.wait_for(waiting, 1)
        return window.in_flight

    assert asyncio.run(scenario()) == 1


def test_the_window_grows_back_fast_once_the_provider_serves_more_than_at_the_429() -> None:
    """A passing 429 (a rate blip while 1 call was served) must not keep a worker at a crawl:
    once the provider serves 2 at once the limit is forgotten and each result adds a call."""
    async def scenario() -> tuple[float, float]:
        window = ModelWindow(64)
        first = await window.enter()
        window.accepted()
        blip = await window.enter()
        await window.leave(blip, accepted=False, answer="rate_limited")
        low = window.allowed
        for _ in range(20):  # 1/8 a result from 1 up: about 8 results to send 2 at once
            await window.leave(first, accepted=True, answer="served")
            first = await window.enter()
            window.accepted()
            if int(window.allowed) >= 2:
                break
        second = await window.enter()
        window.accepted()  # 2 served at once: more than at the 429
        for _ in range(6):
            await window.leave(second, accepted=True, answer="served")
            second = await window.enter()
            window.accepted()
        return low, window.allowed

    low, grown = asyncio.run(scenario())
    assert low == 1
    assert grown >= 8  # one more call per result
