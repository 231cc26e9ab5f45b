"""Media downloads with no server (`httpx.MockTransport`): redirects followed by hand with every
hop checked against the SSRF rules, the size cap, the identity coding, the deadline, and no
pre-signed URL in any reason. Hosts are address literals, so no name is ever resolved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from pipeline.upstream import MAX_REDIRECTS, MediaRefused, UpstreamClient

PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
PRIVATE_API = "http://192.0.2.1/v1"  # a private upstream: private media hosts are fine
PUBLIC_API = "http://8.8.8.8/v1"  # never contacted: the MockTransport answers
CDN = "http://192.0.2.50"
Handler = Callable[[httpx.Request], Any]


def fetch(handler: Handler, url: str, *, api_base: str = PRIVATE_API,
          **overrides: Any) -> bytes:
    options: dict[str, Any] = {
        "concurrency": 4, "read_timeout": 5.0, "connect_timeout": 2.0, "deadline": 5.0,
        "max_media_bytes": 1000, "allow_private_media": False,
    }
    options.update(overrides)

    async def go() -> bytes:
        client = UpstreamClient(api_base, "sk-air-MEDIAKEY-0123456789",
                                transport=httpx.MockTransport(handler), **options)
        try:
            return await client.fetch_media(url)
        finally:
            await client.aclose()
    return asyncio.run(go())


def refusal(handler: Handler, url: str, **overrides: Any) -> str:
    with pytest.raises(MediaRefused) as caught:
        fetch(handler, url, **overrides)
    return caught.value.reason


Reply = Callable[[], httpx.Response]


class Recorder:
    """A handler answering by path (a fresh response each time), recording every request."""

    def __init__(self, routes: dict[str, Reply]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.routes.get(request.url.path, reply(404))()

    @property
    def urls(self) -> list[str]:
        return [str(request.url) for request in self.requests]


def reply(status: int = 200, content: bytes = b"", headers: Any = None) -> Reply:
    """A response whose body streams, as it does off the wire (httpx reads a bytes body at
    once, and a read body cannot be streamed raw again)."""
    async def body() -> AsyncIterator[bytes]:
        if content:
            yield content

    return lambda: httpx.Response(status, headers=headers, content=body())


def moved(location: str, status: int = 302) -> Reply:
    return reply(status, headers={"location": location})


def test_the_bytes_come_without_the_key_and_as_identity() -> None:
    cdn = Recorder({"/a.png": reply(content=PNG)})
    assert fetch(cdn, f"{CDN}/a.png?X-Amz-Signature=abc") == PNG
    (request,) = cdn.requests
    assert "authorization" not in request.headers
    assert request.headers["accept-encoding"] == "identity"
    assert request.url.query == b"X-Amz-Signature=abc"


def test_credentials_in_a_media_url_go_as_basic_auth_to_its_host_only() -> None:
    cdn = Recorder({"/a.png": moved("http://192.0.2.60/b.png"), "/b.png": reply(content=PNG)})
    assert fetch(cdn, "http://cdn:s%40cret@192.0.2.50/a.png") == PNG
    first, second = cdn.requests
    assert str(first.url) == f"{CDN}/a.png"  # not in the URL as well: aiohttp refuses both
    assert first.headers["authorization"] == "Basic Y2RuOnNAY3JldA=="  # cdn:s@cret
    assert "authorization" not in second.headers


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed_hop_by_hop(status: int) -> None:
    cdn = Recorder({
        "/start": moved("/next?sig=1", status),  # relative: against the current URL
        "/next": moved("http://192.0.2.60/final.png", status),
        "/final.png": reply(content=PNG),
    })
    assert fetch(cdn, f"{CDN}/start") == PNG
    assert cdn.urls == [f"{CDN}/start", f"{CDN}/next?sig=1", "http://192.0.2.60/final.png"]


@pytest.mark.parametrize(("target", "why"), [
    ("http://169.254.169.254/latest/meta-data/iam", "a cloud metadata address"),
    ("http://[fd00:ec2::254]/", "a cloud metadata address"),
    ("http://100.100.100.200/", "a cloud metadata address"),
    ("http://169.254.1.1/", "a link-local address"),
    ("http://[::ffff:169.254.169.254]/", "a cloud metadata address"),
    ("http://224.0.0.1/", "a multicast address"),
    ("http://0.0.0.0/", "an unspecified address"),
])
def test_a_redirect_to_a_forbidden_address_is_refused_unsent(target: str, why: str) -> None:
    cdn = Recorder({"/a.png": moved(target)})
    reason = refusal(cdn, f"{CDN}/a.png?sig=SECRET", allow_private_media=True)
    assert why in reason
    assert "SECRET" not in reason and "meta-data" not in reason
    assert cdn.urls == [f"{CDN}/a.png?sig=SECRET"]  # the forbidden hop was never asked


def test_private_hosts_are_refused_when_the_upstream_is_public() -> None:
    cdn = Recorder({"/a.png": reply(content=PNG)})
    assert "a private or loopback address" in refusal(cdn, f"{CDN}/a.png", api_base=PUBLIC_API)
    assert cdn.requests == []
    assert fetch(cdn, f"{CDN}/a.png", api_base=PUBLIC_API, allow_private_media=True) == PNG


def test_a_redirect_from_a_public_host_to_a_private_one_is_refused() -> None:
    cdn = Recorder({"/a.png": moved("http://10.0.0.5/internal")})
    reason = refusal(cdn, "http://93.184.215.14/a.png", api_base=PUBLIC_API)
    assert "10.0.0.5" in reason and "private" in reason
    assert len(cdn.requests) == 1


@pytest.mark.parametrize(("location", "why"), [
    ("file:///etc/passwd", "scheme"),
    ("ftp://192.0.2.50/a.png", "scheme"),
    ("gopher://192.0.2.50/", "scheme"),
])
def test_a_redirect_off_http_is_refused(location: str, why: str) -> None:
    assert why in refusal(Recorder({"/a.png": moved(location)}), f"{CDN}/a.png")


def test_a_redirect_without_a_location_is_refused() -> None:
    cdn = Recorder({"/a.png": reply(302)})
    assert refusal(cdn, f"{CDN}/a.png") == "192.0.2.50 redirected without a Location"


def test_a_redirect_loop_stops_after_the_last_allowed_hop() -> None:
    cdn = Recorder({"/loop": moved("/loop?sig=SECRET")})
    reason = refusal(cdn, f"{CDN}/loop?sig=SECRET")
    assert reason == f"more than {MAX_REDIRECTS} redirects from 192.0.2.50"
    assert len(cdn.requests) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://192.0.2.50/x.png", "not a url", "http://", "http://a b\n/",
])
def test_a_url_that_is_not_http_is_refused_unsent(url: str) -> None:
    cdn = Recorder({})
    refusal(cdn, url)
    assert cdn.requests == []


def test_an_error_status_names_the_host_only() -> None:
    reason = refusal(Recorder({}), f"{CDN}/missing.png?X-Amz-Signature=SECRET")
    assert reason == "192.0.2.50 answered HTTP 404"


def test_a_failed_download_names_the_host_only() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot connect to {request.url}")

    reason = refusal(handler, f"{CDN}/a.png?X-Amz-Signature=SECRET")
    assert reason.startswith("the download from 192.0.2.50 failed: cannot connect")
    assert "SECRET" not in reason


# --- size and coding --------------------------------------------------------------------------


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(b"x")
        yield bytes(5000)

    cdn = Recorder({"/big.png": lambda: httpx.Response(
        200, headers={"content-length": "5000"}, content=body())})
    reason = refusal(cdn, f"{CDN}/big.png")
    assert reason == "media from 192.0.2.50 is 5000 bytes, over the 1000 cap"
    assert read == []


def test_a_body_past_the_cap_without_a_length_is_refused_as_it_streams() -> None:
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for _ in range(100):
            sent.append(400)
            yield bytes(400)

    cdn = Recorder({"/big.png": lambda: httpx.Response(200, content=body())})
    assert refusal(cdn, f"{CDN}/big.png") == "media from 192.0.2.50 is over the 1000 byte cap"
    assert sum(sent) <= 1200  # stopped at the chunk that crossed the cap


def test_exactly_the_cap_is_kept() -> None:
    cdn = Recorder({"/a.png": reply(content=PNG + bytes(1000 - len(PNG)))})
    assert len(fetch(cdn, f"{CDN}/a.png")) == 1000


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate", "identity, gzip"])
def test_a_coding_we_did_not_ask_for_is_refused(coding: str) -> None:
    cdn = Recorder({"/a.png": reply(content=b"\x1f\x8b...",
                                    headers={"content-encoding": coding})})
    assert "Content-Encoding" in refusal(cdn, f"{CDN}/a.png")


def test_a_repeated_content_encoding_is_seen_whole() -> None:
    twice = reply(content=b"x", headers=[("content-encoding", "identity"),
                                         ("content-encoding", "gzip")])
    assert "Content-Encoding" in refusal(Recorder({"/a.png": twice}), f"{CDN}/a.png")


def test_a_download_that_trickles_forever_ends_at_the_deadline() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.02)
            yield b"x"

    cdn = Recorder({"/slow.png": lambda: httpx.Response(200, content=trickle())})
    reason = refusal(cdn, f"{CDN}/slow.png?sig=SECRET", deadline=0.3, max_media_bytes=10**6)
    assert reason == "the download from 192.0.2.50 took longer than 0.3s"
