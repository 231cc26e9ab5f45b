"""Limits without Redis: rate settings parsed (a bad one named), the in-process limit on
renders in flight, and how many renders a worker runs ahead of its calls (the limits shared
through real Redis: tests/integration/test_limits.py)."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.limits import LocalLimits, Rate, parse_rates
from pipeline.settings import Settings, SettingsError
from tests.integration.test_limits import _count_concurrency


def test_rates_parse_and_bad_ones_are_named():
    assert parse_rates("flux-2-dev=120/m, nano-banana-pro=30/m,x=5/10s") == {
        "flux-2-dev": Rate(120, 60.0), "nano-banana-pro": Rate(30, 60.0), "x": Rate(5, 10.0)}
    with pytest.raises(SettingsError, match="'flux=fast'"):
        parse_rates("flux=fast")


def test_local_limits_without_redis():
    async def scenario() -> int:
        return await _count_concurrency([LocalLimits(max_in_flight=3, rates={})], 30)

    assert asyncio.run(scenario()) == 3


def test_renders_ahead_default_to_half_the_concurrency():
    assert Settings(concurrency=200).render_slots == 300
    assert Settings(concurrency=3, renders_ahead=0).render_slots == 3
    assert Settings.from_env({"IMAGEBATCH_RENDERS_AHEAD": "7"}).render_slots == 64 + 7
    with pytest.raises(SettingsError, match="IMAGEBATCH_RENDERS_AHEAD='-1'"):
        Settings.from_env({"IMAGEBATCH_RENDERS_AHEAD": "-1"})
