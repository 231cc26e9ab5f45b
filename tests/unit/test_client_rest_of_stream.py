"""What follows a result on the stream, with no server (`httpx.MockTransport`): read to its
end when it comes at once (the connection goes back to the pool, no reader is left for the
loop to close), and never able to change or hold back the result: a stall, a cut, a flood
past the size cap, or the render deadline striking during it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx

from pipeline.upstream import REST_OF_STREAM_SECONDS, Delivered, Outcome, UpstreamClient

RESULT = {"created": 7, "data": [{"url": "https://cdn.example/a.png"}]}
EVENT = b"data: " + json.dumps(RESULT).encode() + b"\n\n"
DELIVERED = Delivered(data=RESULT["data"], created=7)


def generate(body: Callable[[], AsyncIterator[bytes]], *, deadline: float = 5.0
             ) -> tuple[Outcome, float]:
    """The outcome of one generation whose response body is `body()`, and the seconds it took."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body())

    async def go() -> tuple[Outcome, float]:
        client = UpstreamClient("http://192.0.2.1/v1", "sk-air-x", concurrency=4,
                                read_timeout=5.0, connect_timeout=2.0, deadline=deadline,
                                max_media_bytes=1 << 16, allow_private_media=False,
                                transport=httpx.MockTransport(handler))
        try:
            started = time.monotonic()
            outcome = await client.generate({"model": "m", "prompt": "p"})
            return outcome, time.monotonic() - started
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_the_rest_after_a_result_is_read_to_its_end_before_the_call_returns() -> None:
    ended: list[str] = []

    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        yield b"data: [DONE]\n\n"
        ended.append("read to the end")

    outcome, _ = generate(body)
    assert outcome == DELIVERED
    assert ended == ["read to the end"]


def test_a_result_followed_by_a_stall_is_delivered_without_waiting_for_it() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        await asyncio.sleep(3600)  # no [DONE], no end
        yield b"data: [DONE]\n\n"

    outcome, took = generate(body)
    assert outcome == DELIVERED
    assert took < REST_OF_STREAM_SECONDS + 1.0


def test_a_result_followed_by_a_cut_stays_delivered() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    outcome, _ = generate(body)
    assert outcome == DELIVERED


def test_a_result_followed_by_an_error_event_stays_delivered() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        yield b'data: {"error": {"message": "late", "code": 500}}\n\n'

    outcome, _ = generate(body)
    assert outcome == DELIVERED


def test_a_flood_after_the_result_stops_at_the_size_cap() -> None:
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        while True:  # endless, and never waiting: only the cap can stop the reading
            sent.append(1)
            yield b": " + b"x" * 65536 + b"\n"

    outcome, took = generate(body)
    assert outcome == DELIVERED
    # The cap (16 files of 64 KiB as base64, plus 1 MiB) is about 2.4 MiB: 37 chunks or so.
    assert 10 < len(sent) < 60
    assert took < REST_OF_STREAM_SECONDS + 1.0


def test_the_deadline_striking_while_the_rest_is_read_keeps_the_result() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield EVENT
        await asyncio.sleep(3600)
        yield b"data: [DONE]\n\n"

    # The render deadline passes before REST_OF_STREAM_SECONDS does.
    outcome, took = generate(body, deadline=REST_OF_STREAM_SECONDS / 5)
    assert outcome == DELIVERED
    assert took < 1.0
