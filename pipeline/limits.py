"""Limits that hold across all workers: renders in flight, per-model request rates, and the
pause every worker takes after a 429 with Retry-After. Kept in Redis when there is one,
in-process otherwise. Plus each worker's own window of calls in flight per model, which
adapts to the 429s it gets (AIMD), so a provider that serves k calls at once gets about k."""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.settings import SettingsError

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
POLL = 0.05
PAUSE_RECHECK = 0.1  # seconds a worker trusts Redis' last "no 429 pause" for a model
# From the level the provider served when it last answered 429, the window grows this many
# times slower than additive increase: the next level is probed with few 429s.
PROBE_SLOWDOWN = 8


class ModelWindow:
    """One worker's calls in flight to one model (AIMD). A 429 halves the window, never above
    what the provider was serving at that moment (floor 1); only the first 429 of the calls
    sent under one window size counts (the rest of that burst was sent before the provider
    said no). A result grows it: by one call per result up to the level served at the last
    429 (known to be fine), by 1/(8 x window) per result from there (probing the level that
    got the 429), and by one per result again once the provider serves more calls at once than
    then (the limit went away). Starts at the worker's call slots, so it costs nothing until
    a 429. Lives on the worker's event loop."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.allowed = float(self.ceiling)
        self.in_flight = 0
        self.serving = 0  # calls in flight that the provider accepted (a 2xx came)
        self.epoch = 0  # bumped by each decrease
        self.limit_seen: int | None = None  # what was being served at the last 429
        self._room = asyncio.Condition()

    async def enter(self) -> int:
        """Wait for room; returns the epoch the call is sent under."""
        async with self._room:
            await self._room.wait_for(lambda: self.in_flight < int(self.allowed))
            self.in_flight += 1
            return self.epoch

    def accepted(self) -> None:
        self.serving += 1
        if self.limit_seen is not None and self.serving > self.limit_seen:
            self.limit_seen = None  # served more at once than at the last 429: it is gone

    async def leave(self, epoch: int, *, accepted: bool, answer: str) -> None:
        """`answer`: 'served' (a result), 'rate_limited' (429) or 'other'."""
        self.in_flight -= 1
        if accepted:
            self.serving -= 1
        if answer == "rate_limited" and epoch == self.epoch:
            self.limit_seen = max(1, self.serving)
            self.allowed = max(1.0, min(self.allowed / 2, float(self.serving)))
            self.epoch += 1
        elif answer == "served" and self.allowed < self.ceiling:
            probing = self.limit_seen is not None and self.allowed >= self.limit_seen
            step = 1 / (self.allowed * PROBE_SLOWDOWN) if probing else 1.0
            self.allowed = min(float(self.ceiling), self.allowed + step)
        async with self._room:
            self._room.notify_all()


class CallWindows:
    """A worker's windows, one per model, created on first use."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self._models: dict[str, ModelWindow] = {}

    def of(self, model: str) -> ModelWindow:
        window = self._models.get(model)
        if window is None:
            window = self._models[model] = ModelWindow(self.ceiling)
        return window


class CallSlot:
    """Room for one call to a model: the worker's window for it, then the shared limits.

    async with limiter.slot(model) as slot:
        outcome = await client.generate(body, on_accepted=slot.accepted)
        slot.answered("served" | "rate_limited" | "other")
    """

    def __init__(self, window: ModelWindow, shared: Any) -> None:
        self._window = window
        self._shared = shared  # the limiter's own context manager (pause, rate, slot)
        self._epoch: int | None = None
        self._accepted = False
        self._answer = "other"

    def accepted(self) -> None:
        """The provider took the call (a 2xx status): it counts as served meanwhile."""
        if not self._accepted and self._epoch is not None:
            self._accepted = True
            self._window.accepted()

    def answered(self, answer: str) -> None:
        self._answer = answer

    async def __aenter__(self) -> CallSlot:
        self._epoch = await self._window.enter()
        try:
            await self._shared.__aenter__()
        except BaseException:
            await self._leave()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._shared.__aexit__(None, None, None)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        if self._epoch is not None:
            epoch, self._epoch = self._epoch, None
            await self._window.leave(epoch, accepted=self._accepted, answer=self._answer)


@dataclass(frozen=True)
class Rate:
    """`count` requests per `seconds`, spread evenly (GCRA: one every seconds/count)."""

    count: int
    seconds: float

    @property
    def interval(self) -> float:
        return self.seconds / self.count


def parse_rates(text: str) -> dict[str, Rate]:
    """`flux-2-dev=120/m,nano-banana-pro=30/m` -> {model: Rate}."""
    rates: dict[str, Rate] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([^=\s]+)\s*=\s*(\d+)\s*/\s*(\d*)\s*([smh])", part)
        if not match or int(match[2]) == 0:
            raise SettingsError(
                f"IMAGEBATCH_MODEL_RATES: {part!r} is not MODEL=COUNT/UNIT (e.g. flux-2-dev=120/m)"
            )
        per = float(match[3] or 1) * UNITS[match[4]]
        rates[match[1]] = Rate(int(match[2]), per)
    return rates


# GCRA in one script: the key holds the theoretical arrival time (TAT) in microseconds of
# Redis' own clock, so workers on machines with skewed clocks still share one schedule.
_RATE_SCRIPT = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - now
if wait > 0 then return wait end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil((interval * 2) / 1000) + 1000)
return 0
"""

# Renders in flight across workers: a sorted set of slot tokens scored by expiry, so the
# slots of a killed worker come back on their own.
_SLOT_SCRIPT = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) + tonumber(now_t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""


class RedisLimits:
    """Shared limits for every worker that uses the same Redis."""

    def __init__(self, url: str, *, max_in_flight: int, rates: dict[str, Rate],
                 slot_ttl: float, prefix: str = "imagebatch", window: int = 64) -> None:
        import redis.asyncio as redis

        self.windows = CallWindows(window)

        self.redis = redis.from_url(url, max_connections=None)
        self.max_in_flight = max_in_flight
        self.rates = rates
        self.slot_ttl = slot_ttl
        self.prefix = prefix
        self._rate = self.redis.register_script(_RATE_SCRIPT)
        self._slot = self.redis.register_script(_SLOT_SCRIPT)
        self._no_pause_seen: dict[str, float] = {}  # model -> when Redis last said "no pause"

    def slot(self, model: str) -> CallSlot:
        return CallSlot(self.windows.of(model), self._shared_slot(model))

    @asynccontextmanager
    async def _shared_slot(self, model: str) -> AsyncIterator[None]:
        await self._wait_out_pause(model)
        await self._take_rate(model)
        token = await self._take_slot()
        try:
            yield
        finally:
            if token is not None:
                await self.redis.zrem(f"{self.prefix}:inflight", token)

    async def slow_down(self, model: str, retry_after: float | None) -> None:
        """A 429 with Retry-After pauses the model for every worker that long. Without one
        the pause would only stop the model's calls for a guess of a time: the windows of
        the workers (CallWindows) shrink instead."""
        if not retry_after or retry_after <= 0:
            return
        self._no_pause_seen.pop(model, None)
        await self.redis.set(f"{self.prefix}:pause:{model}", "1", px=int(retry_after * 1000))

    async def in_flight(self) -> int:
        await self.redis.zremrangebyscore(f"{self.prefix}:inflight", "-inf", time.time())
        return int(await self.redis.zcard(f"{self.prefix}:inflight"))

    async def _wait_out_pause(self, model: str) -> None:
        # Asked of Redis at most every PAUSE_RECHECK seconds per model: at hundreds of
        # renders a second a round trip each was a measurable share of a worker's CPU, and a
        # pause another worker sets is still honoured within that long.
        if time.monotonic() - self._no_pause_seen.get(model, -math.inf) < PAUSE_RECHECK:
            return
        key = f"{self.prefix}:pause:{model}"
        while (left := await self.redis.pttl(key)) > 0:
            await asyncio.sleep(left / 1000)
        self._no_pause_seen[model] = time.monotonic()

    async def _take_rate(self, model: str) -> None:
        rate = self.rates.get(model)
        if rate is None:
            return
        interval_us = int(rate.interval * 1_000_000)
        while (wait_us := int(await self._rate(keys=[f"{self.prefix}:rate:{model}"],
                                               args=[interval_us]))) > 0:
            await asyncio.sleep(wait_us / 1_000_000)

    async def _take_slot(self) -> str | None:
        if not self.max_in_flight:
            return None
        token = uuid.uuid4().hex
        while not await self._slot(keys=[f"{self.prefix}:inflight"],
                                   args=[self.max_in_flight, self.slot_ttl, token]):
            await asyncio.sleep(POLL)
        return token

    async def aclose(self) -> None:
        await self.redis.aclose()


class LocalLimits:
    """The same limits for one process, when there is no Redis to share them through."""

    def __init__(self, *, max_in_flight: int, rates: dict[str, Rate], window: int = 64) -> None:
        self.windows = CallWindows(window)
        self._slots = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self.rates = rates
        self._tat: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}

    def slot(self, model: str) -> CallSlot:
        return CallSlot(self.windows.of(model), self._shared_slot(model))

    @asynccontextmanager
    async def _shared_slot(self, model: str) -> AsyncIterator[None]:
        while (left := self._paused_until.get(model, 0.0) - time.monotonic()) > 0:
            await asyncio.sleep(left)
        await self._take_rate(model)
        if self._slots is None:
            yield
            return
        async with self._slots:
            yield

    async def _take_rate(self, model: str) -> None:
        rate = self.rates.get(model)
        if rate is None:
            return
        now = time.monotonic()
        start = max(self._tat.get(model, now), now)
        self._tat[model] = start + rate.interval
        if start > now:
            await asyncio.sleep(start - now)

    async def slow_down(self, model: str, retry_after: float | None) -> None:
        if retry_after and retry_after > 0:  # without one, the model's window shrinks
            self._paused_until[model] = time.monotonic() + retry_after

    async def aclose(self) -> None:
        return None
