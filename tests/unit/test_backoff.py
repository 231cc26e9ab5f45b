"""How long a render waits before its next try: capped exponential backoff with full jitter,
never shorter than the upstream's Retry-After, and never parked for hours by one header."""

from __future__ import annotations

import random

import pytest

from pipeline.render import MAX_RETRY_WAIT, backoff_delay

BASE, CAP = 1.0, 30.0


def delays(attempt: int, retry_after: float | None = None, draws: int = 300) -> list[float]:
    rng = random.Random(attempt)
    return [backoff_delay(attempt, retry_after, BASE, CAP, rng) for _ in range(draws)]


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0)])
def test_the_wait_doubles_with_each_attempt(attempt: int, ceiling: float) -> None:
    waits = delays(attempt)
    assert ceiling / 2 <= min(waits) and max(waits) <= ceiling


def test_the_first_try_after_a_failure_waits_about_the_base() -> None:
    assert all(0.5 <= wait <= 1.0 for wait in delays(0) + delays(1))


@pytest.mark.parametrize("attempt", [6, 10, 64, 10_000])
def test_the_wait_never_exceeds_the_cap_however_many_attempts(attempt: int) -> None:
    waits = delays(attempt)
    assert min(waits) >= CAP / 2 and max(waits) <= CAP


def test_waits_are_spread_so_failed_renders_do_not_come_back_together() -> None:
    waits = delays(4)
    assert max(waits) - min(waits) > 0.8 * (8.0 - 4.0)  # most of the jitter range is used
    assert len({round(wait, 6) for wait in waits}) > 250


def test_a_seeded_generator_gives_the_same_waits() -> None:
    assert delays(3) == delays(3)


def test_a_retry_after_longer_than_the_backoff_is_honoured() -> None:
    assert set(delays(1, retry_after=12.5)) == {12.5}


def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it() -> None:
    assert min(delays(5, retry_after=0.5)) >= 8.0


def test_a_retry_after_of_hours_is_capped_so_one_header_cannot_park_a_render() -> None:
    assert set(delays(1, retry_after=86_400.0)) == {MAX_RETRY_WAIT}


def test_a_retry_after_of_zero_keeps_the_backoff() -> None:
    assert all(0.5 <= wait <= 1.0 for wait in delays(1, retry_after=0.0))
