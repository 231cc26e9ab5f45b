"""How the upstream client classifies a generation, with no server: every answer is made by an
`httpx.MockTransport` (the client's httpx side is real; only the wire is replaced).

Delivered is charged, Refused is released, Unknown is charged as unknown (ARCHITECTURE.md, Money):
a wrong class here is a wrong cent in the ledger.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import httpx
import pytest
from httpx_aiohttp.transport import map_aiohttp_exceptions

from pipeline.settings import Settings, SettingsError
from pipeline.upstream import Delivered, Outcome, Refused, Unknown, UpstreamClient, rate_limited

KEY = "sk-air-UNITKEY-never-shown-0123456789"
BASE = "http://192.0.2.1/v1"  # never contacted: the MockTransport answers
RESULT = {"created": 1715000000, "data": [{"url": "https://cdn.example/i/abc.png"}]}
Handler = Callable[[httpx.Request], Any]


def make_client(handler: Handler, **overrides: Any) -> UpstreamClient:
    options: dict[str, Any] = {
        "concurrency": 8, "read_timeout": 5.0, "connect_timeout": 2.0, "deadline": 5.0,
        "max_media_bytes": 1 << 20, "allow_private_media": False,
    }
    options.update(overrides)
    api_key = options.pop("api_key", KEY)
    api_base = options.pop("api_base", BASE)
    return UpstreamClient(api_base, api_key, transport=httpx.MockTransport(handler), **options)


def generate(handler: Handler, body: dict[str, Any] | None = None,
             on_accepted: Callable[[], None] | None = None, **overrides: Any) -> Outcome:
    async def go() -> Outcome:
        client = make_client(handler, **overrides)
        try:
            return await client.generate(body or {"model": "m", "prompt": "p"}, on_accepted)
        finally:
            await client.aclose()
    return asyncio.run(go())


def sse(*chunks: bytes, status: int = 200, headers: dict[str, str] | None = None,
        pause: float = 0.0) -> Handler:
    """A handler answering an event stream made of exactly these chunks."""
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            if pause:
                await asyncio.sleep(pause)
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": "text/event-stream",
                                               **(headers or {})}, content=body())
    return handler


def event(document: Any) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def failing(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc
    return handler


def from_aiohttp(exc: aiohttp.ClientError) -> Handler:
    """What the aiohttp transport raises for `exc`: its own (coarse) httpx translation, raised
    from aiohttp's error, by the transport's own mapping code."""
    def handler(request: httpx.Request) -> httpx.Response:
        with map_aiohttp_exceptions():
            raise exc
        raise AssertionError("unreachable")
    return handler


# --- delivered --------------------------------------------------------------------------------


def test_an_event_stream_result_is_delivered_before_done() -> None:
    outcome = generate(sse(b": keepalive\n\n", event(RESULT)))  # no [DONE]: not waited for
    assert outcome == Delivered(data=RESULT["data"], created=1715000000)


def test_a_plain_json_result_is_delivered() -> None:
    outcome = generate(lambda request: httpx.Response(200, json=RESULT))
    assert outcome == Delivered(data=RESULT["data"], created=1715000000)


def test_a_gzipped_stream_is_read_decoded() -> None:
    body = gzip.compress(b": keepalive\n\n" + event(RESULT) + b"data: [DONE]\n\n")
    outcome = generate(sse(body[:10], body[10:], headers={"content-encoding": "gzip"}))
    assert outcome == Delivered(data=RESULT["data"], created=1715000000)


def test_a_revised_prompt_echoing_the_key_is_kept_redacted() -> None:
    echoed = {"data": [{"b64_json": "iVBORw0KGgo=", "revised_prompt": f"an otter {KEY}"}]}
    outcome = generate(sse(event(echoed)))
    assert isinstance(outcome, Delivered)
    assert outcome.data[0]["revised_prompt"] == "an otter [redacted]"


def test_a_result_past_every_cap_is_delivered_charged_and_refused() -> None:
    # 16 files at the cap as base64, plus 1 MiB: past it the body cannot be a result we keep.
    huge = b"data: " + b"A" * (16 * (1000 * 4 // 3 + 1024) + (1 << 20) + 10)
    outcome = generate(sse(huge[:4096], huge[4096:], b"\n\n"), max_media_bytes=1000)
    assert isinstance(outcome, Delivered) and outcome.data == []
    assert outcome.refused is not None and "too large to keep" in outcome.refused


def test_on_accepted_is_called_for_a_2xx_only() -> None:
    calls: list[str] = []
    generate(sse(event(RESULT)), on_accepted=lambda: calls.append("ok"))
    generate(lambda request: httpx.Response(500), on_accepted=lambda: calls.append("500"))
    assert calls == ["ok"]


# --- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (402, False), (404, False), (422, False),
    (408, True), (429, True), (500, True), (502, True), (503, True),
])
def test_an_error_status_before_the_stream_is_a_refusal(status: int, retryable: bool) -> None:
    error = {"error": {"message": f"no: {KEY}", "type": "invalid_request_error"}}
    outcome = generate(lambda request: httpx.Response(status, json=error))
    assert isinstance(outcome, Refused), outcome
    assert (outcome.status, outcome.retryable) == (status, retryable)
    assert outcome.message == "no: [redacted] (invalid_request_error)"


def test_an_error_status_without_a_body_says_its_reason() -> None:
    outcome = generate(lambda request: httpx.Response(503))
    assert isinstance(outcome, Refused) and outcome.message == "Service Unavailable"


def test_a_429_for_a_spent_quota_is_not_retried() -> None:
    spent = {"error": {"message": "You exceeded your quota", "code": "insufficient_quota"}}
    outcome = generate(lambda request: httpx.Response(429, json=spent))
    assert isinstance(outcome, Refused) and not outcome.retryable
    assert not rate_limited(outcome)
    assert rate_limited(generate(lambda request: httpx.Response(429)))


@pytest.mark.parametrize(("error", "retryable"), [
    ({"message": "slow down", "type": "rate_limit_exceeded"}, True),
    ({"message": "busy", "type": "server_error"}, True),
    ({"message": "upstream", "code": 503}, True),
    ({"message": "upstream", "code": "502"}, True),
    ({"message": "nope", "type": "content_policy_violation"}, False),
    ({"message": "bad size", "code": 400}, False),
])
def test_an_error_event_is_a_refusal(error: dict[str, Any], retryable: bool) -> None:
    outcome = generate(sse(b": keepalive\n\n", event({"error": error}), b"data: [DONE]\n\n"))
    assert isinstance(outcome, Refused), outcome
    assert (outcome.status, outcome.retryable) == (None, retryable)
    assert error["message"] in outcome.message


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ConnectTimeout("timed out"),
    httpx.PoolTimeout("no free connection"),
])
def test_a_request_that_never_left_is_a_retryable_refusal(exc: Exception) -> None:
    outcome = generate(failing(exc))
    assert isinstance(outcome, Refused), outcome
    assert (outcome.status, outcome.retryable) == (None, True)
    assert outcome.message.startswith("cannot reach the upstream")


def test_a_connect_failure_under_aiohttp_is_a_retryable_refusal() -> None:
    refused = aiohttp.ClientConnectorError(
        aiohttp.client_reqrep.ConnectionKey("192.0.2.1", 80, False, True, None, None, None,
                                           None),
        ConnectionRefusedError(111, "Connection refused"))
    outcome = generate(from_aiohttp(refused))
    assert isinstance(outcome, Refused) and outcome.retryable, outcome
    assert "cannot connect to 192.0.2.1:80 (Connection refused)" in outcome.message


@pytest.mark.parametrize("exc", [
    httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
])
def test_a_url_that_cannot_be_sent_is_a_final_refusal(exc: Exception) -> None:
    outcome = generate(failing(exc))
    assert isinstance(outcome, Refused) and not outcome.retryable, outcome
    assert outcome.message.startswith("bad api_base")


# --- unknown ----------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    httpx.ReadTimeout("timed out"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    httpx.WriteError("[Errno 32] Broken pipe"),
])
def test_a_failure_after_the_send_is_unknown(exc: Exception) -> None:
    outcome = generate(failing(exc))
    assert isinstance(outcome, Unknown), outcome
    assert outcome.message.startswith("the request failed after it was sent")


@pytest.mark.parametrize("exc", [
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
])
def test_a_failure_after_the_send_under_aiohttp_is_unknown(exc: aiohttp.ClientError) -> None:
    """The transport turns every aiohttp ClientConnectionError into httpx.ConnectTimeout;
    read as "never sent" it would release money the provider may have billed."""
    outcome = generate(from_aiohttp(exc))
    assert isinstance(outcome, Unknown), outcome


def test_the_aiohttp_cause_names_what_happened() -> None:
    outcome = generate(from_aiohttp(aiohttp.ServerDisconnectedError()))
    assert isinstance(outcome, Unknown) and "the server closed the connection" in outcome.message
    timed_out = generate(from_aiohttp(aiohttp.SocketTimeoutError("x")), read_timeout=7.0)
    assert isinstance(timed_out, Unknown) and "no data for 7s (read timeout)" in timed_out.message


def test_a_stream_cut_before_the_result_is_unknown() -> None:
    outcome = generate(sse(b": keepalive\n\n", b'data: {"created": 1, "da'))
    assert outcome == Unknown("the stream ended before a result")


def test_done_without_a_result_is_unknown() -> None:
    outcome = generate(sse(b": keepalive\n\n", b"data: [DONE]\n\n"))
    assert outcome == Unknown("the stream ended ([DONE]) without a result")


def test_a_stream_that_breaks_off_is_unknown() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b": keepalive\n\n"
        raise httpx.ReadError("connection reset")

    outcome = generate(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=body()))
    assert isinstance(outcome, Unknown) and outcome.message.startswith("the response broke off")


def test_a_json_body_that_does_not_parse_is_unknown() -> None:
    outcome = generate(lambda request: httpx.Response(
        200, headers={"content-type": "application/json"}, content=b'{"data": ['))
    assert outcome == Unknown("the upstream's JSON body could not be parsed")


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), ("", None), ("inf", None),
])
def test_retry_after_in_seconds(value: str, expected: float | None) -> None:
    outcome = generate(lambda request: httpx.Response(429, headers={"retry-after": value}))
    assert isinstance(outcome, Refused) and outcome.retry_after == expected


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    outcome = generate(lambda request: httpx.Response(503, headers={"retry-after": when}))
    assert isinstance(outcome, Refused) and outcome.retry_after is not None
    assert 115 <= outcome.retry_after <= 120
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    late = generate(lambda request: httpx.Response(503, headers={"retry-after": past}))
    assert isinstance(late, Refused) and late.retry_after == 0.0


# --- deadlines and timeouts -------------------------------------------------------------------


def test_keepalives_forever_end_at_the_render_deadline() -> None:
    async def forever() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.02)
            yield b": keepalive\n\n"

    start = time.monotonic()
    outcome = generate(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=forever()), deadline=0.3)
    assert outcome == Unknown("no result within the 0.3s render deadline")
    assert time.monotonic() - start < 2.0


def test_no_answer_at_all_ends_at_the_render_deadline() -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        raise AssertionError("the deadline should have ended the wait")

    outcome = generate(never, deadline=0.2)
    assert outcome == Unknown("no result within the 0.2s render deadline")


def test_each_request_carries_the_per_chunk_read_and_connect_timeouts() -> None:
    """The transport reads these per request: aiohttp's sock_read (reset by every chunk, so
    keepalives keep a render alive) and its connect (pool wait plus connect)."""
    seen: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json=RESULT)

    generate(handler, read_timeout=42.0, connect_timeout=3.0)
    assert seen == [{"connect": 3.0, "read": 42.0, "write": 42.0, "pool": 3.0}]


# --- the request ------------------------------------------------------------------------------


def test_the_request_sent() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=RESULT)

    body = {"model": "m", "prompt": "a \u2028 b", "n": 2, "custom_field": [1, 2]}
    generate(handler, body)
    assert body == {"model": "m", "prompt": "a \u2028 b", "n": 2, "custom_field": [1, 2]}
    (request,) = sent
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/images/generations")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "text/event-stream, application/json"
    assert request.headers["accept-encoding"] == "gzip, deflate"  # what httpx can decode
    assert json.loads(request.content) == {**body, "sse": True}


def test_the_base_credentials_go_as_basic_auth_not_in_the_url() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json=RESULT)

    generate(handler, api_key=None, api_base="http://team:pa%40ss@192.0.2.1/v1")
    (request,) = sent
    assert str(request.url) == "http://192.0.2.1/v1/images/generations"
    assert request.headers["authorization"] == "Basic dGVhbTpwYUBzcw=="  # team:pa@ss


def test_a_key_no_header_can_carry_is_refused_unsent() -> None:
    sent: list[httpx.Request] = []
    outcome = generate(sent.append, api_key="sk-air-\u201cpasted\u201d")
    assert outcome == Refused("the API key holds a character that is not ASCII: no HTTP header "
                              "can carry it", None, False)
    assert sent == []
    with pytest.raises(SettingsError, match="IMAGEBATCH_API_KEY: holds a character that is not"):
        Settings.from_env({"IMAGEBATCH_API_KEY": "sk-air-\u201cpasted\u201d"})


def test_a_redirect_of_the_generation_is_not_followed() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(307, headers={"location": "http://203.0.113.9/v1/x"})

    outcome = generate(handler)
    assert isinstance(outcome, Refused) and outcome.status == 307 and not outcome.retryable
    assert hosts == ["192.0.2.1"]

