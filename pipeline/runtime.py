"""A worker process's shared services: the DB, the media store, and one asyncio loop for I/O.

Task threads do their SQL themselves and hand every upstream call to the one event loop
(`IOLoop.run`), so hundreds of renders share one HTTP client (httpx over aiohttp's connection
pool, `pipeline.httpclient`) instead of a thread and a pool each (a thread doing its own HTTP
per render falls apart past a few dozen).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import make_engine, session_factory
from pipeline.groupcommit import GroupCommit
from pipeline.leases import LeaseKeeper
from pipeline.limits import LocalLimits, RedisLimits, parse_rates
from pipeline.models import utcnow
from pipeline.settings import Settings
from pipeline.storage import MediaStore, open_store
from pipeline.upstream import UpstreamClient

T = TypeVar("T")


class IOLoop:
    """An asyncio loop on a daemon thread; `run` blocks the calling thread until done."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="imagebatch-io", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: MediaStore
    io: IOLoop
    upstream: UpstreamClient
    # Bounds the upstream calls in flight (settings.concurrency); the worker runs more
    # renders than that (settings.render_slots), so a freed slot finds a render ready.
    call_slots: asyncio.Semaphore = field(init=False)
    # Bounds renders holding media bytes at once, so memory does not grow with calls in flight.
    media_slots: asyncio.Semaphore = field(init=False)
    limiter: Any = None
    # Upstream calls under way now (read by `run`, which leaves no paid call behind).
    calls_in_flight: int = 0
    leases: LeaseKeeper = field(init=False)
    # The renders' transactions, committed in groups by committer threads.
    commits: GroupCommit = field(init=False)
    # What "now" is for reservations (which team period a render draws on); tests set it.
    clock: Callable[[], datetime] = utcnow

    def __post_init__(self) -> None:
        self.call_slots = asyncio.Semaphore(max(1, self.settings.concurrency))
        self.media_slots = asyncio.Semaphore(max(1, self.settings.media_concurrency))
        self.leases = LeaseKeeper(self.sessions, self.settings.lease_seconds)
        self.commits = GroupCommit(self.sessions, committers=max(1, self.settings.committers))

    def close(self) -> None:
        self.leases.stop()
        self.commits.stop()
        try:
            self.io.run(self.upstream.aclose())
            self.io.run(self.store.aclose())
            if self.limiter is not None:
                self.io.run(self.limiter.aclose())
        finally:
            self.io.stop()
            self.engine.dispose()


def build_upstream(settings: Settings) -> UpstreamClient:
    return UpstreamClient(
        settings.api_base,
        settings.api_key,
        concurrency=max(settings.concurrency, 16),
        read_timeout=settings.read_timeout,
        connect_timeout=settings.connect_timeout,
        deadline=settings.render_deadline,
        max_media_bytes=settings.max_media_bytes,
        allow_private_media=settings.allow_private_media,
    )


def build_limits(settings: Settings) -> RedisLimits | LocalLimits:
    rates = parse_rates(settings.model_rates)
    redis_url = settings.shared_redis_url
    if redis_url:
        return RedisLimits(redis_url, max_in_flight=settings.max_in_flight, rates=rates,
                           slot_ttl=settings.render_deadline + 120,
                           window=max(1, settings.concurrency))
    return LocalLimits(max_in_flight=settings.max_in_flight, rates=rates,
                       window=max(1, settings.concurrency))


def start_services(settings: Settings) -> Services:
    # The committers hold a connection each; the rest serve renders redone alone after a
    # failed group, the lease keeper and the ticker. A pool opens connections only as needed.
    engine = make_engine(settings.database_url, pool_size=min(settings.concurrency, 20))
    io = IOLoop()
    # The client's aiohttp sessions must be created on the loop that will use them.
    upstream = io.run(_on_loop(build_upstream, settings))
    limiter = io.run(_on_loop(build_limits, settings))
    return Services(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        # Uploads run under the media slots: the store's pool has room for all of them.
        store=open_store(settings.storage_url,
                         connections=max(64, settings.media_concurrency)),
        io=io,
        upstream=upstream,
        limiter=limiter,
    )


async def _on_loop(factory: Any, *args: Any) -> Any:
    return factory(*args)
