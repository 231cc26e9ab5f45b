"""UpstreamClient over real HTTP against the fake upstream: outcomes, timeouts, media guards."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiohttp import web
from yarl import URL

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.upstream import (
    Delivered,
    MediaRefused,
    Outcome,
    Refused,
    Unknown,
    UpstreamClient,
    UpstreamError,
    decode_b64,
)

KEY = "sk-air-TESTKEY-must-never-show-0123456789"
PNG = b"\x89PNG\r\n\x1a\n"
T = TypeVar("T")


def make_client(api_base: str, **overrides: Any) -> UpstreamClient:
    options: dict[str, Any] = {
        "concurrency": 16, "read_timeout": 5.0, "connect_timeout": 2.0, "deadline": 10.0,
        "max_media_bytes": 1 << 20, "allow_private_media": False,
    }
    options.update(overrides)
    api_key = options.pop("api_key", KEY)
    return UpstreamClient(api_base, api_key, **options)


def with_client(api_base: str, action: Callable[[UpstreamClient], Awaitable[T]],
                **overrides: Any) -> T:
    async def go() -> T:
        client = make_client(api_base, **overrides)
        try:
            return await action(client)
        finally:
            await client.aclose()
    return asyncio.run(go())


def generate(api_base: str, body: dict[str, Any], **overrides: Any) -> Outcome:
    return with_client(api_base, lambda client: client.generate(body), **overrides)


def body(fake: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"model": "flux-2-klein-4b", "prompt": "a lighthouse", "n": 1}
    request.update(fields)
    if fake is not None:
        request["fake"] = fake
    return request


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_request(fake: FakeServer, marker: str) -> dict[str, Any]:
    for entry in fake.requests():
        if entry["body"].get("marker") == marker:
            return entry
    raise AssertionError(f"no request with marker {marker!r} reached the fake")


# --- pure helpers ---------------------------------------------------------------------------


# --- outcomes ---------------------------------------------------------------------------------


def test_delivered_url_then_fetch_media(fake: FakeServer) -> None:
    async def action(client: UpstreamClient) -> tuple[Outcome, bytes]:
        outcome = await client.generate(body(n=2))
        assert isinstance(outcome, Delivered), outcome
        return outcome, await client.fetch_media(outcome.data[0]["url"])

    outcome, media = with_client(fake.base_url, action)
    assert isinstance(outcome, Delivered) and len(outcome.data) == 2
    assert isinstance(outcome.created, int)
    assert media.startswith(PNG)


def test_delivered_b64(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body({"media": "jpeg"}, response_format="b64_json"))
    assert isinstance(outcome, Delivered), outcome
    assert decode_b64(outcome.data[0]["b64_json"], 1 << 20).startswith(b"\xff\xd8\xff")


def test_unknown_keys_pass_through_and_caller_dict_untouched(fake: FakeServer) -> None:
    request = body({"revised_prompt": "kept"}, marker="passthrough",
                   custom_param={"nested": [1, "two", None]}, image_urls=[], style="EDM, Bass")
    snapshot = {key: value for key, value in request.items()}
    outcome = generate(fake.base_url, request)
    assert isinstance(outcome, Delivered), outcome
    assert request == snapshot and "sse" not in request
    seen = find_request(fake, "passthrough")
    assert seen["body"] == {**snapshot, "sse": True}
    assert seen["authorization"] is True


def test_no_authorization_without_key(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body(marker="nokey"), api_key=None)
    assert isinstance(outcome, Delivered), outcome
    assert find_request(fake, "nokey")["authorization"] is False


@pytest.mark.parametrize("fake_knobs", [
    {"line_end": "cr"},
    {"line_end": "crlf"},
    {"line_end": "crlf", "chunk": 7},
    {"line_end": "cr", "chunk": 1},
    {"event_lines": True, "empty_events": 5, "chunk": 3},
    {"empty_events": 50, "line_end": "crlf"},
])
def test_stream_shapes_keep_raw_separators(fake: FakeServer, fake_knobs: dict[str, Any]) -> None:
    revised = "a line\u2028still the same line\u2029and a \u0085 too"
    outcome = generate(fake.base_url, body({**fake_knobs, "revised_prompt": revised}))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.data[0]["revised_prompt"] == revised


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (402, False), (404, False), (422, False),
    (408, True), (429, True), (500, True), (503, True),
])
def test_error_status_is_refused(fake: FakeServer, status: int, retryable: bool) -> None:
    outcome = generate(fake.base_url, body({"status": status}))
    assert isinstance(outcome, Refused), outcome
    assert outcome.status == status and outcome.retryable is retryable
    assert outcome.message and len(outcome.message) <= 501


def test_retry_after_is_read(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body({"status": 429, "retry_after": 3}))
    assert isinstance(outcome, Refused), outcome
    assert outcome.retryable and outcome.retry_after == 3.0


def test_validation_error_carries_upstream_message(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body(n=99))
    assert isinstance(outcome, Refused), outcome
    assert outcome.status == 400 and not outcome.retryable
    assert "n" in outcome.message and "{" not in outcome.message


def test_error_event_is_refused(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body({"error_event": True}))
    assert isinstance(outcome, Refused), outcome
    assert outcome.status is None and outcome.message


def test_cut_stream_is_unknown(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body({"cut": True}))
    assert isinstance(outcome, Unknown), outcome


def test_stall_ends_at_the_deadline(fake: FakeServer) -> None:
    # Keepalives every 20 ms reset the 5 s read timeout forever: only the deadline ends it.
    start = time.monotonic()
    outcome = generate(fake.base_url, body({"stall": True}), read_timeout=5.0, deadline=1.0)
    elapsed = time.monotonic() - start
    assert isinstance(outcome, Unknown), outcome
    assert "deadline" in outcome.message
    assert 0.9 <= elapsed < 2.5, elapsed


def test_client_reusable_after_deadline(fake: FakeServer) -> None:
    async def action(client: UpstreamClient) -> tuple[Outcome, Outcome]:
        stalled = await client.generate(body({"stall": True}))
        return stalled, await client.generate(body())

    stalled, after = with_client(fake.base_url, action, deadline=0.5, concurrency=1)
    assert isinstance(stalled, Unknown) and isinstance(after, Delivered), (stalled, after)


def test_large_b64_result_in_small_chunks(fake: FakeServer) -> None:
    """One ~8 MB data line written in 16 KB chunks parses in linear time."""
    knobs = {"media_bytes": 6_000_000, "chunk": 16384}
    start = time.monotonic()
    outcome = generate(fake.base_url, body(knobs, response_format="b64_json"),
                       max_media_bytes=8_000_000)
    elapsed = time.monotonic() - start
    assert isinstance(outcome, Delivered), outcome
    assert len(decode_b64(outcome.data[0]["b64_json"], 8_000_000)) >= 5_000_000
    assert elapsed < 5.0, elapsed


def test_read_timeout_per_chunk_fires() -> None:
    # No keepalive for 30 s: the 0.5 s read timeout ends the attempt long before the deadline.
    with FakeServer(FakeConfig(latency=3.0, keepalive_interval=30.0)) as quiet:
        start = time.monotonic()
        outcome = generate(quiet.base_url, body(), read_timeout=0.5, deadline=20.0)
        elapsed = time.monotonic() - start
    assert isinstance(outcome, Unknown), outcome
    assert "read timeout" in outcome.message
    assert elapsed < 2.0, elapsed


def test_connection_refused_is_retryable_refusal() -> None:
    outcome = generate(f"http://127.0.0.1:{closed_port()}/v1", body())
    assert isinstance(outcome, Refused), outcome
    assert outcome.status is None and outcome.retryable


def test_dns_failure_is_retryable_refusal() -> None:
    outcome = generate("http://no-such-host.invalid/v1", body())
    assert isinstance(outcome, Refused), outcome
    assert outcome.status is None and outcome.retryable


def test_key_never_in_messages(fake: FakeServer) -> None:
    cases = [{"status": 401}, {"status": 500}, {"error_event": True}, {"cut": True}]
    messages = [generate(fake.base_url, body(knobs)) for knobs in cases]
    messages.append(generate(fake.base_url, body({"stall": True}), deadline=0.3))
    messages.append(generate(f"http://127.0.0.1:{closed_port()}/v1", body()))
    for outcome in messages:
        assert not isinstance(outcome, Delivered)
        assert KEY not in outcome.message and "TESTKEY" not in outcome.message


def test_many_in_flight_beyond_default_pool(fake: FakeServer) -> None:
    """150 concurrent renders on one client: none waits on a 100-connection pool."""
    async def action(client: UpstreamClient) -> list[Outcome]:
        # Long enough that the first answer does not come before the 150th call is sent on
        # a loaded machine (at 0.5 s one came back with 149 in flight).
        slow = body({"latency": 1.0})
        return list(await asyncio.gather(*(client.generate(slow) for _ in range(150))))

    start = time.monotonic()
    outcomes = with_client(fake.base_url, action, concurrency=200)
    elapsed = time.monotonic() - start
    assert all(isinstance(outcome, Delivered) for outcome in outcomes)
    assert fake.stats()["max_in_flight"] >= 150
    assert elapsed < 5.0, elapsed


def test_pool_limits_reach_aiohttp(fake: FakeServer) -> None:
    async def action(client: UpstreamClient) -> tuple[int, int]:
        await client.list_models()
        return client._api.connector.limit, client._media.connector.limit  # type: ignore[union-attr]

    assert with_client(fake.base_url, action, concurrency=300) == (300, 300)


# --- models -----------------------------------------------------------------------------------


def test_list_models(fake: FakeServer) -> None:
    models = with_client(fake.base_url, lambda client: client.list_models())
    by_id = {model["id"]: model for model in models}
    assert by_id["flux-2-dev"]["image_caps"]["max_n"] == 4
    assert "image_caps" not in by_id["gpt-4o-mini"]


def test_list_models_errors(fake: FakeServer) -> None:
    with pytest.raises(UpstreamError, match="HTTP 404"):
        with_client(fake.base_url + "/nothing-here", lambda client: client.list_models())
    with pytest.raises(UpstreamError) as caught:
        with_client(f"http://127.0.0.1:{closed_port()}/v1", lambda c: c.list_models())
    assert KEY not in str(caught.value)


# --- media ------------------------------------------------------------------------------------


def _media_url(fake: FakeServer, knobs: dict[str, Any], **fields: Any) -> str:
    outcome = generate(fake.base_url, body(knobs, **fields))
    assert isinstance(outcome, Delivered), outcome
    return str(outcome.data[0]["url"])


def fetch(api_base: str, url: str, **overrides: Any) -> bytes:
    return with_client(api_base, lambda client: client.fetch_media(url), **overrides)


def test_redirect_to_metadata_refused(fake: FakeServer) -> None:
    url = _media_url(fake, {"redirect": "http://169.254.169.254/latest/meta-data/iam"})
    with pytest.raises(MediaRefused) as caught:
        fetch(fake.base_url, url, allow_private_media=True)
    assert "169.254.169.254" in caught.value.reason
    token = url.rsplit("/", 1)[-1]
    assert token not in caught.value.reason and "meta-data" not in caught.value.reason


def test_redirect_to_other_scheme_refused(fake: FakeServer) -> None:
    url = _media_url(fake, {"redirect": "file:///etc/passwd"})
    with pytest.raises(MediaRefused, match="scheme"):
        fetch(fake.base_url, url)


def test_redirect_to_allowed_host_followed(fake: FakeServer) -> None:
    target = _media_url(fake, {"media": "gif"})
    url = _media_url(fake, {"redirect": target})
    assert fetch(fake.base_url, url).startswith(b"GIF8")


def test_private_media_refused_when_upstream_is_public(fake: FakeServer) -> None:
    url = _media_url(fake, {})
    # The api_base of this client does not resolve to a private address: no loopback media.
    with pytest.raises(MediaRefused, match="private"):
        fetch("http://upstream.invalid/v1", url)
    assert fetch("http://upstream.invalid/v1", url, allow_private_media=True).startswith(PNG)


def test_connect_time_resolver_refuses_rebound_host(fake: FakeServer) -> None:
    """Defence in depth: were a host to resolve differently after the per-hop check (DNS
    rebinding), the media session's own resolver still refuses the forbidden address."""
    url = URL(_media_url(fake, {})).with_host("localhost")

    async def action(client: UpstreamClient) -> bytes:
        return await client._fetch_once(url)  # skips _check_host on purpose

    with pytest.raises(MediaRefused, match="refused addresses at connect time"):
        with_client("http://upstream.invalid/v1", action)


def test_media_size_cap(fake: FakeServer) -> None:
    url = _media_url(fake, {"media_bytes": 200_000})
    with pytest.raises(MediaRefused, match="cap"):
        fetch(fake.base_url, url, max_media_bytes=50_000)
    assert len(fetch(fake.base_url, url, max_media_bytes=400_000)) >= 100_000


def test_b64_cap(fake: FakeServer) -> None:
    outcome = generate(fake.base_url, body({"media_bytes": 200_000}, response_format="b64_json"))
    assert isinstance(outcome, Delivered), outcome
    value = outcome.data[0]["b64_json"]
    with pytest.raises(MediaRefused, match="cap"):
        decode_b64(value, 50_000)
    assert decode_b64(value, 400_000).startswith(PNG)


# --- what the fake cannot send: a tiny real server for the edge cases -------------------------


async def _echo_key(request: web.Request) -> web.Response:
    leak = request.headers.get("Authorization", "")
    return web.json_response({"error": {"message": f"bad key {leak} " + "x" * 2000}}, status=401)


async def _quota_spent(request: web.Request) -> web.Response:
    error = {"message": "You exceeded your current quota", "type": "insufficient_quota",
             "code": "insufficient_quota"}
    return web.json_response({"error": error}, status=429)


async def _huge_json_result(request: web.Request) -> web.Response:
    # A plain JSON answer past what any result may hold (see make_client's media cap).
    body = b'{"created":1,"data":[{"b64_json":"' + b"A" * 3_000_000 + b'"}]}'
    return web.Response(body=body, content_type="application/json")


async def _json_result(request: web.Request) -> web.Response:
    return web.json_response({"created": 1, "data": [{"url": "http://cdn.invalid/a.png"}]})


async def _auth_echo_media(request: web.Request) -> web.Response:
    """PNG bytes, then the Authorization header this request came with."""
    return web.Response(body=PNG + request.headers.get("Authorization", "none").encode())


async def _to_other_host(request: web.Request) -> web.Response:
    # The same server under another name: no credentials go along to it.
    raise web.HTTPFound(f"http://localhost:{request.url.port}/auth-echo")


async def _gzip_media(request: web.Request) -> web.Response:
    return web.Response(body=b"\x1f\x8b" + b"\0" * 20, headers={"Content-Encoding": "gzip"})


async def _loop_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(f"/loop?hop={int(request.query.get('hop', 0)) + 1}&sig=SECRET")


def _sse(*events: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": keepalive\n\n" + b"".join(b"data: %s\n\n" % e for e in events))
        return response
    return handler


_ROUTES = [
    web.post("/leak/images/generations", _echo_key),
    web.post("/json/images/generations", _json_result),
    web.post("/quota/images/generations", _quota_spent),
    web.post("/huge/images/generations", _huge_json_result),
    web.post("/done/images/generations", _sse(b"[DONE]")),
    web.post("/progress/images/generations", _sse(b'{"progress": 0.5}', b"not json",
                                                  b'{"created": 2, "data": []}')),
    web.post("/ratelimit/images/generations",
             _sse(b'{"error": {"message": "slow down", "type": "rate_limit_error"}}')),
    web.post("/policy/images/generations",
             _sse(b'{"error": {"message": "no", "type": "invalid_request_error",'
                  b' "code": "content_policy_violation"}}')),
    web.get("/gzip", _gzip_media),
    web.get("/auth-echo", _auth_echo_media),
    web.get("/to-other-host", _to_other_host),
    web.get("/loop", _loop_redirect),
]


def with_edge_server(action: Callable[[str], Awaitable[T]]) -> T:
    async def go() -> T:
        app = web.Application()
        app.add_routes(_ROUTES)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return await action(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
    return asyncio.run(go())


async def _generate_at(base: str, **overrides: Any) -> Outcome:
    client = make_client(base, **overrides)
    try:
        return await client.generate(body())
    finally:
        await client.aclose()


def test_echoed_key_scrubbed_and_message_clipped() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/leak"))
    assert isinstance(outcome, Refused) and outcome.status == 401, outcome
    assert KEY not in outcome.message and "[redacted]" in outcome.message
    assert len(outcome.message) <= 501


def test_plain_json_body_is_a_result() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/json"))
    assert isinstance(outcome, Delivered) and outcome.created == 1, outcome


def test_done_without_result_is_unknown() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/done"))
    assert isinstance(outcome, Unknown), outcome


def test_progress_events_skipped_until_result() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/progress"))
    assert isinstance(outcome, Delivered) and outcome.created == 2, outcome


def test_error_event_retryable_only_for_rate_limit_or_server_error() -> None:
    limited = with_edge_server(lambda base: _generate_at(f"{base}/ratelimit"))
    assert isinstance(limited, Refused) and limited.retryable, limited
    policy = with_edge_server(lambda base: _generate_at(f"{base}/policy"))
    assert isinstance(policy, Refused) and not policy.retryable, policy
    assert "content_policy_violation" in policy.message


def test_content_encoding_refused() -> None:
    async def action(base: str) -> bytes:
        client = make_client(base)
        try:
            return await client.fetch_media(f"{base}/gzip")
        finally:
            await client.aclose()

    with pytest.raises(MediaRefused, match="Content-Encoding"):
        with_edge_server(action)


def test_redirect_loop_stops_and_urls_stay_out_of_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def action(base: str) -> None:
        client = make_client(base)
        try:
            await client.fetch_media(f"{base}/loop?sig=SECRET")
        finally:
            await client.aclose()

    with caplog.at_level(logging.DEBUG), pytest.raises(MediaRefused, match="redirects") as caught:
        with_edge_server(action)
    assert "SECRET" not in caught.value.reason
    # The client's own log lines (httpx logs every request URL at INFO); the test server's
    # access log is the server's business.
    client_lines = [record.getMessage() for record in caplog.records
                    if not record.name.startswith("aiohttp.access")]
    assert any("HTTP Request" in line for line in client_lines)
    assert not any("SECRET" in line or "/loop" in line for line in client_lines)


def test_a_429_for_a_spent_quota_is_not_worth_another_try() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/quota"))
    assert isinstance(outcome, Refused) and outcome.status == 429, outcome
    assert not outcome.retryable and "quota" in outcome.message


def test_a_plain_json_result_past_the_cap_is_delivered_and_refused() -> None:
    outcome = with_edge_server(lambda base: _generate_at(f"{base}/huge", max_media_bytes=10_000))
    assert isinstance(outcome, Delivered) and outcome.data == [], outcome
    assert outcome.refused is not None and "too large to keep" in outcome.refused


def test_a_media_url_with_credentials_is_fetched_with_them_once() -> None:
    """Sent as Basic auth to that URL's host (aiohttp refuses a request holding them twice, in
    the URL and a header), and not carried to the host it redirects to."""
    async def action(base: str) -> tuple[bytes, bytes]:
        client = make_client(base)
        try:
            authed = base.replace("http://", "http://cdn:s%40cret@")
            return (await client.fetch_media(f"{authed}/auth-echo"),
                    await client.fetch_media(f"{authed}/to-other-host"))
        finally:
            await client.aclose()

    direct, redirected = with_edge_server(action)
    assert direct == PNG + b"Basic Y2RuOnNAY3JldA=="  # cdn:s@cret
    assert redirected == PNG + b"none"
