"""The fake upstream as an aiohttp app: build it, serve it, or run it in a test's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from fake_upstream import handlers
from fake_upstream.handlers import STATE
from fake_upstream.state import FakeConfig, FakeState

__all__ = ["FakeConfig", "FakeServer", "build_app", "serve"]

# Benchmarks open hundreds of connections at once; the default backlog of 128 drops some.
BACKLOG = 2048
# Stalled streams notice shutdown within one keepalive interval; do not wait a minute.
SHUTDOWN_TIMEOUT = 2.0
# Requests may carry reference images as base64.
MAX_BODY = 64 * 1024 * 1024

T = TypeVar("T")


def build_app(config: FakeConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE] = FakeState(config or FakeConfig())
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/v1/images/generations", handlers.generations)
    app.router.add_get("/media/{token}", handlers.media)
    app.router.add_get("/_fake/stats", handlers.stats)
    app.router.add_post("/_fake/reset", handlers.reset)
    app.router.add_get("/_fake/requests", handlers.requests)
    app.on_shutdown.append(_end_streams)
    return app


async def _end_streams(app: web.Application) -> None:
    app[STATE].closing = True


def serve(host: str, port: int, config: FakeConfig | None = None) -> None:
    """Run in the foreground until interrupted (`imagebatch fake-upstream`)."""
    def announce(*_: object) -> None:
        print(f"fake upstream on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)

    web.run_app(build_app(config), host=host, port=port, backlog=BACKLOG, access_log=None,
                shutdown_timeout=SHUTDOWN_TIMEOUT, print=announce)


class FakeServer:
    """The fake on a free loopback port, served from a background thread (for tests).

    with FakeServer(FakeConfig(latency=0)) as fake:
        client.post(fake.base_url + "/images/generations", ...); fake.stats()
    """

    def __init__(self, config: FakeConfig | None = None, *, host: str = "127.0.0.1") -> None:
        self.config = config or FakeConfig()
        self.host = host
        self.port = 0
        self._app = build_app(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"

    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("fake upstream did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("fake upstream failed to start") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        return self._on_loop(lambda state: state.snapshot())

    def reset(self) -> None:
        self._on_loop(lambda state: state.reset())

    def requests(self) -> list[dict[str, Any]]:
        return self._on_loop(lambda state: list(state.requests))

    def _on_loop(self, read: Callable[[FakeState], T]) -> T:
        """Run `read` on the server's loop, so it never sees the state half-changed."""
        if self._loop is None:
            raise RuntimeError("fake upstream is not running")

        async def call() -> T:
            return read(self._app[STATE])

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._close())
            loop.close()

    async def _open(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=BACKLOG)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
