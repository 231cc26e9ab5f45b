"""Writing an SSE response the way the knobs ask: line ends, chunking, keepalives, cuts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from fake_upstream.knobs import Knobs

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class ClientGone(ConnectionError):
    """The client closed the connection (or the server is shutting down)."""


class EventStream:
    """One prepared SSE response. Every write raises ClientGone once the client has left."""

    def __init__(self, request: web.Request, response: web.StreamResponse, knobs: Knobs,
                 closing: Callable[[], bool]) -> None:
        self.request = request
        self.response = response
        self.knobs = knobs
        self.eol = knobs.eol.encode()
        self._closing = closing
        self._next_id = 1

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing() or self._closing()

    async def write(self, data: bytes) -> None:
        # Split into the requested chunk size, so events (even a CRLF) straddle reads.
        step = self.knobs.chunk or max(len(data), 1)
        for start in range(0, len(data), step):
            if self.gone():
                raise ClientGone("client disconnected")
            try:
                await self.response.write(data[start:start + step])
            except ConnectionError as exc:
                raise ClientGone(str(exc)) from exc
            if self.knobs.chunk:
                await asyncio.sleep(0)  # let each piece leave on its own before the next

    async def comment(self) -> None:
        await self.write(b": keepalive" + self.eol + self.eol)

    async def empty_events(self, count: int) -> None:
        if count:
            await self.write(self.eol * count)

    def event_bytes(self, *payload: bytes) -> bytes:
        """One event whose single data line is the payload pieces, joined in one copy."""
        eol = self.eol
        if not self.knobs.event_lines:
            return b"".join([b"data: ", *payload, eol, eol])
        event_id, self._next_id = self._next_id, self._next_id + 1
        return b"".join([b"event: message", eol, b"data: ", *payload, eol,
                         b"id: %d" % event_id, eol, eol])

    async def event(self, *payload: bytes) -> None:
        await self.write(self.event_bytes(*payload))

    async def keepalives(self, seconds: float, interval: float) -> None:
        """Comments for `seconds` (inf: until the client leaves), one straight away so the
        client sees the stream open, then one every `interval`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        step = interval if interval > 0 else 0.2
        await self.comment()
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(step, left))
            if loop.time() < end:
                if interval > 0:
                    await self.comment()
                elif self.gone():
                    raise ClientGone("client disconnected")

    def cut(self) -> None:
        """Close the connection mid-stream: the client sees a truncated body."""
        if self.request.transport is not None:
            self.request.transport.close()
