"""Limits a worker keeps without Redis: its window of calls per model (shrinks on a 429,
grows on results, never past its call slots, never below one call), per-model rates and the
pause a 429 with Retry-After asks of every call to that model."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.limits import CallWindows, LocalLimits, ModelWindow, Rate, parse_rates
from pipeline.settings import SettingsError


async def one_call(window: ModelWindow, answer: str, *, accepted: bool = False) -> None:
    epoch = await window.enter()
    if accepted:
        window.accepted()
    await window.leave(epoch, accepted=accepted, answer=answer)


def test_a_window_starts_at_the_workers_call_slots_so_it_costs_nothing_until_a_429() -> None:
    assert ModelWindow(16).allowed == 16
    assert ModelWindow(0).allowed == 1  # a worker always has room for one call


def test_failures_other_than_429_leave_the_window_as_it_is() -> None:
    async def scenario() -> float:
        window = ModelWindow(8)
        for _ in range(20):
            await one_call(window, "other")
        return window.allowed

    assert asyncio.run(scenario()) == 8


def test_repeated_429s_with_nothing_served_keep_one_call_going() -> None:
    async def scenario() -> float:
        window = ModelWindow(32)
        for _ in range(12):
            await one_call(window, "rate_limited")
        return window.allowed

    assert asyncio.run(scenario()) == 1


def test_results_never_grow_the_window_past_the_call_slots() -> None:
    async def scenario() -> list[float]:
        window = ModelWindow(4)
        await one_call(window, "rate_limited")
        seen = []
        for _ in range(40):
            if window.allowed >= 2:  # two served at once: more than at the 429
                epochs = [await window.enter() for _ in range(2)]
                window.accepted()
                window.accepted()
                for epoch in epochs:
                    await window.leave(epoch, accepted=True, answer="served")
            else:
                await one_call(window, "served", accepted=True)
            seen.append(window.allowed)
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] > 1 and max(seen) == 4 and seen[-1] == 4


def test_a_429_on_one_model_leaves_the_other_models_windows_alone() -> None:
    async def scenario() -> tuple[float, float]:
        windows = CallWindows(10)
        await one_call(windows.of("flux-2-dev"), "rate_limited")
        return windows.of("flux-2-dev").allowed, windows.of("suno-v5").allowed

    assert asyncio.run(scenario()) == (1, 10)


def test_a_model_has_one_window_per_worker() -> None:
    windows = CallWindows(10)
    assert windows.of("flux-2-dev") is windows.of("flux-2-dev")


@pytest.mark.parametrize(("text", "rates"), [
    ("", {}),
    ("flux-2-dev=120/m", {"flux-2-dev": Rate(120, 60.0)}),
    (" a = 3 / h , b=1/s ", {"a": Rate(3, 3600.0), "b": Rate(1, 1.0)}),
    ("wan=10/30s", {"wan": Rate(10, 30.0)}),
])
def test_model_rates_are_read_in_their_units(text: str, rates: dict[str, Rate]) -> None:
    assert parse_rates(text) == rates


@pytest.mark.parametrize("part", ["flux=0/m", "flux=5/d", "flux=5", "=5/m", "flux=-1/m"])
def test_a_bad_rate_is_named_with_the_setting_and_the_form_it_needs(part: str) -> None:
    with pytest.raises(SettingsError) as refused:
        parse_rates(f"ok=1/s,{part}")
    assert str(refused.value).startswith(f"IMAGEBATCH_MODEL_RATES: {part!r} is not MODEL=")


def test_a_rate_spreads_calls_evenly() -> None:
    assert Rate(120, 60.0).interval == 0.5
    assert Rate(3, 3600.0).interval == 1200.0


def test_calls_to_a_rate_limited_model_are_spaced_and_other_models_are_not() -> None:
    async def scenario() -> tuple[float, float]:
        limits = LocalLimits(max_in_flight=0, rates={"slow": Rate(20, 1.0)})
        started = time.monotonic()
        for _ in range(5):
            async with limits.slot("slow"):
                pass
        slow = time.monotonic() - started
        started = time.monotonic()
        for _ in range(50):
            async with limits.slot("fast"):
                pass
        return slow, time.monotonic() - started

    slow, fast = asyncio.run(scenario())
    assert slow >= 4 * 0.05 - 0.01  # the 5th call waits for 4 intervals of 50 ms
    assert fast < slow


def test_a_retry_after_pauses_every_call_to_that_model_only() -> None:
    async def scenario() -> tuple[float, float]:
        limits = LocalLimits(max_in_flight=4, rates={})
        await limits.slow_down("flux-2-dev", 0.3)
        await limits.slow_down("suno-v5", None)  # no Retry-After: no pause
        started = time.monotonic()
        async with limits.slot("suno-v5"):
            other = time.monotonic() - started
        async with limits.slot("flux-2-dev"):
            paused = time.monotonic() - started
        return other, paused

    other, paused = asyncio.run(scenario())
    assert paused >= 0.29
    assert other < paused
