"""The event stream as bytes arrive through the client, with no server (`httpx.MockTransport`):
chunk splits anywhere, CR / LF / CRLF line ends (a CRLF split across chunks), comments and
keepalives, empty events, multi-line data, raw U+2028 in JSON, and an event cut by EOF."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from pipeline.upstream import Delivered, Outcome, Refused, Unknown, UpstreamClient

RESULT = {"created": 7, "data": [{"url": "https://cdn.example/a.png",
                                  "revised_prompt": "a\u2028b\u2029c \u0085 d"}]}
WIRE = json.dumps(RESULT, ensure_ascii=False).encode()
DELIVERED = Delivered(data=RESULT["data"], created=7)


def outcome_of(chunks: list[bytes]) -> Outcome:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body())

    async def go() -> Outcome:
        client = UpstreamClient("http://192.0.2.1/v1", "sk-air-x", concurrency=4,
                                read_timeout=5.0, connect_timeout=2.0, deadline=5.0,
                                max_media_bytes=1 << 20, allow_private_media=False,
                                transport=httpx.MockTransport(handler))
        try:
            return await client.generate({"model": "m", "prompt": "p"})
        finally:
            await client.aclose()
    return asyncio.run(go())


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i:i + 1] for i in range(len(stream))]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_each_line_end_whole_and_byte_by_byte(eol: bytes) -> None:
    stream = b": keepalive" + eol + eol + b"data: " + WIRE + eol + eol + b"data: [DONE]" + eol
    assert outcome_of([stream]) == DELIVERED
    assert outcome_of(bytewise(stream)) == DELIVERED


def test_every_split_point_of_the_result_event() -> None:
    stream = b": keepalive\r\n\r\ndata: " + WIRE + b"\r\n\r\n"
    for cut in range(1, len(stream)):
        assert outcome_of([stream[:cut], stream[cut:]]) == DELIVERED, cut


def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    # The document in two data lines, cut after a comma: joined with "\n" (JSON whitespace)
    # it is the same document. Were the LF after a chunk's last CR a second line end, it
    # would be an empty line: the event would end after its first half.
    document = json.dumps(RESULT).encode()
    cut = document.find(b",") + 1
    chunks = [b"data: " + document[:cut] + b"\r", b"\ndata: " + document[cut:] + b"\r",
              b"\n\r", b"\n"]
    assert outcome_of(chunks) == DELIVERED


def test_comments_keepalives_and_empty_events_before_the_result() -> None:
    noise = b": keepalive\n\n" * 50 + b"\n\n\n" + b"event: progress\ndata: 40%\n\n" + b":\n\n"
    noise += b"data\n\n" + b"id: 3\nretry: 100\n\n"
    assert outcome_of([noise, b"data: " + WIRE + b"\n\n"]) == DELIVERED


def test_multi_line_data_is_one_document() -> None:
    lines = json.dumps(RESULT, indent=1, ensure_ascii=False).encode().split(b"\n")
    stream = b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    assert outcome_of([stream]) == DELIVERED
    assert outcome_of(bytewise(stream)) == DELIVERED


def test_a_bom_before_the_first_line_is_ignored() -> None:
    assert outcome_of([b"\xef\xbb", b"\xbfdata: " + WIRE + b"\n\n"]) == DELIVERED


def test_an_event_cut_by_eof_is_discarded() -> None:
    # A whole JSON document on its data line, but no blank line ends the event.
    assert outcome_of([b"data: " + WIRE + b"\n"]) == Unknown("the stream ended before a result")
    assert outcome_of([b"data: " + WIRE]) == Unknown("the stream ended before a result")


def test_an_error_event_split_across_chunks() -> None:
    stream = b'data: {"error": {"message": "busy", "type": "server_error"}}\r\n\r\n'
    outcome = outcome_of(bytewise(stream))
    assert isinstance(outcome, Refused) and outcome.retryable and outcome.status is None


def test_events_that_are_not_json_are_skipped() -> None:
    stream = b"data: working...\n\ndata: {\"progress\": 0.5}\n\ndata: [1, 2]\n\n"
    assert outcome_of([stream, b"data: " + WIRE + b"\n\n"]) == DELIVERED


def test_a_long_base64_line_in_tiny_chunks_arrives_whole() -> None:
    b64 = "A" * 400_000
    document: dict[str, Any] = {"created": 1, "data": [{"b64_json": b64}]}
    stream = b"data: " + json.dumps(document).encode() + b"\n\n"
    chunks = [stream[i:i + 64] for i in range(0, len(stream), 64)]
    outcome = outcome_of(chunks)
    assert isinstance(outcome, Delivered) and outcome.data[0]["b64_json"] == b64
