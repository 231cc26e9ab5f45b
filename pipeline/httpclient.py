"""httpx clients whose connections are aiohttp's (the `httpx-aiohttp` transport).

httpx is the client every HTTP call of a worker goes through (the API, media downloads, the S3
presigned PUTs): its requests, responses and exceptions, and `httpx.MockTransport` in tests.
Its own connection pool is never used: at a hundred calls in flight it spends about 28 ms of
CPU a call, against about 1 ms over aiohttp's pool (measured in issue 18). So each client
here sends through an `AiohttpTransport` wrapped around an aiohttp session that we build, with
every limit (aiohttp's pool and per-host limit, httpx's limits) at the concurrency asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

# The idle time of a pooled connection (httpx's default).
KEEPALIVE_SECONDS = 5.0


def connector(connections: int, **options: Any) -> aiohttp.TCPConnector:
    """aiohttp's pool with room for `connections` at once, to one host or many (aiohttp stops
    at 100 unless told otherwise). Its default SSL context verifies certificates."""
    return aiohttp.TCPConnector(limit=connections, limit_per_host=connections,
                                keepalive_timeout=KEEPALIVE_SECONDS, **options)


def over_aiohttp(session: aiohttp.ClientSession, connections: int) -> AiohttpTransport:
    """httpx's transport through `session` (closed with the client that uses it)."""
    return AiohttpTransport(client=session, limits=limits(connections))


def limits(connections: int) -> httpx.Limits:
    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                        keepalive_expiry=KEEPALIVE_SECONDS)


class _NoCookies(httpx.Cookies):
    """httpx's cookie jar, kept empty. Cookies are aiohttp's session's to keep and send, as
    before httpx (the transport hands it each request); a second jar would only cost, on every
    response, a urllib request object to look for Set-Cookie."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


_NO_COOKIES = _NoCookies()


class Client(httpx.AsyncClient):
    """`httpx.AsyncClient` for the hot path: one cookie jar (aiohttp's), and requests made
    whole by the caller (`httpx.Request(...)` with headers built once), then `send`: its
    `build_request` merges URL, headers, params and cookies anew for every call, about a
    fifth of what httpx adds per request. Such a request's headers are the whole of them
    (aiohttp adds its own defaults: Host, User-Agent, Accept, Accept-Encoding)."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @contextlib.asynccontextmanager
    async def sending(self, request: httpx.Request) -> AsyncIterator[httpx.Response]:
        """`stream` for a request made beforehand: the response, headers read, body not."""
        response = await self.send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()


def client(transport: httpx.AsyncBaseTransport, *, connections: int,
           timeout: httpx.Timeout) -> Client:
    """An httpx client that sends through `transport` (`over_aiohttp`; tests give a
    `httpx.MockTransport`).

    Over aiohttp the timeouts reach it per request: `connect` as the socket connect, `pool` as
    the wait for a pooled connection plus the connect, `read` as the time between two chunks
    (reset by every chunk, keepalive comments included). The environment's proxies and .netrc
    are not read (`trust_env=False`): whoever needs a proxy gives it to the session. Redirects
    are not followed: the callers check every hop."""
    return Client(transport=transport, limits=limits(connections), timeout=timeout,
                  trust_env=False, follow_redirects=False)


# What a failed exchange raises: httpx's request errors (a body it cannot decode too), the
# aiohttp errors the transport does not translate, and OSError.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.RequestError, aiohttp.ClientError,
                                                     OSError)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def aiohttp_cause(exc: BaseException) -> aiohttp.ClientError | None:
    """The aiohttp error behind an httpx one, when aiohttp raised it. The transport's mapping
    is coarse (any `ClientConnectionError`, such as a server that closed the connection after
    reading the request, becomes `httpx.ConnectTimeout`), so what happened is read from it."""
    for cause in causes(exc):
        if isinstance(cause, aiohttp.ClientError):
            return cause
    return None


class _NoRequestLines(logging.Filter):
    """httpx logs every request's whole URL at INFO; pre-signed URLs are credentials. The
    callers log their own line, with the host only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("HTTP Request:"))


logging.getLogger("httpx").addFilter(_NoRequestLines())
