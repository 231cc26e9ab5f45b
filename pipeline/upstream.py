"""Client of the OpenAI-compatible image endpoint: SSE generation, guarded media fetch, models."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import ipaddress
import json
import logging
import math
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from pipeline.sse import SSEEvent, SSEParser

log = logging.getLogger("imagebatch.upstream")

MAX_MESSAGE_CHARS = 500
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Cloud metadata services: never fetched, even where private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_SECRET = re.compile(r"(https?://[^\s\"'<>?#]*)[?#][^\s\"'<>]*", re.IGNORECASE)
_TRANSPORT_ERRORS = (httpx.HTTPError, aiohttp.ClientError, OSError)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UpstreamError(Exception):
    """The upstream answered something unusable (list_models)."""


class MediaRefused(Exception):
    """A result's media was not fetched or decoded; `reason` is safe to show (host only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Delivered:
    data: list[dict[str, Any]]
    created: int | None = None


@dataclass(frozen=True)
class Refused:
    """A definite refusal: the provider did no billable work."""

    message: str
    status: int | None
    retryable: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class Unknown:
    """The request was sent and no result came back: the provider may have billed it."""

    message: str


Outcome = Delivered | Refused | Unknown


class UpstreamClient:
    """One per worker process; lives on one asyncio loop (aiohttp sessions are loop-bound)."""

    def __init__(self, api_base: str, api_key: str | None, *, concurrency: int,
                 read_timeout: float, connect_timeout: float, deadline: float,
                 max_media_bytes: int, allow_private_media: bool) -> None:
        self._api_base = api_base.rstrip("/")
        self._api_key = api_key or None
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._max_media_bytes = max_media_bytes
        # Room for up to 16 base64 results per response; past it the body is not a result.
        self._max_result_bytes = 16 * (max_media_bytes * 4 // 3 + 1024) + (1 << 20)
        self._allow_private_media = allow_private_media
        self._api_is_private: bool | None = None
        self._concurrency = max(1, concurrency)
        # httpx maps read -> aiohttp sock_read (reset by every chunk) and pool -> aiohttp's
        # connect (pool wait + connect), so a render never waits unbounded for a slot.
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                write=read_timeout, pool=connect_timeout)
        # The transport turns max_connections into TCPConnector(limit=...); both the
        # transport and aiohttp would otherwise stop at 100 connections.
        limits = httpx.Limits(max_connections=self._concurrency,
                              max_keepalive_connections=self._concurrency)
        self._api = httpx.AsyncClient(transport=AiohttpTransport(limits=limits),
                                      limits=limits, timeout=timeout)
        self._media = httpx.AsyncClient(
            transport=AiohttpTransport(limits=limits, client=self._media_session),
            limits=limits, timeout=timeout, follow_redirects=False,
        )

    async def aclose(self) -> None:
        try:
            await self._api.aclose()
        finally:
            await self._media.aclose()

    # --- generation -------------------------------------------------------------------------

    async def generate(self, body: dict[str, Any]) -> Outcome:
        """POST one generation with `sse: true` and say how it ended (never raises for I/O)."""
        payload = {**body, "sse": True}  # a copy: the caller's dict is never changed
        try:
            request = self._api.build_request(
                "POST", f"{self._api_base}/images/generations", json=payload,
                headers=self._headers({"Accept": "text/event-stream, application/json"}),
            )
        except (TypeError, ValueError) as exc:
            return Refused(self._scrub(f"the request body is not JSON: {exc}"), None, False)
        try:
            async with asyncio.timeout(self._deadline):
                return await self._send_generation(request)
        except TimeoutError:
            # Keepalive comments reset the read timeout forever; only this ends a stall.
            return Unknown(f"no result within the {self._deadline:g}s render deadline")

    async def _send_generation(self, request: httpx.Request) -> Outcome:
        try:
            response = await self._api.send(request, stream=True)
        except _TRANSPORT_ERRORS as exc:
            return self._send_failed(exc)
        try:
            return await self._read_outcome(response)
        except _TRANSPORT_ERRORS as exc:
            return Unknown(self._scrub(f"the response broke off: {self._detail(exc)}"))
        finally:
            # A close error says nothing about the outcome already decided.
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                await response.aclose()

    def _send_failed(self, exc: BaseException) -> Outcome:
        detail = self._detail(exc)
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return Refused(self._scrub(f"bad api_base: {detail}"), None, False)
        if _never_sent(exc):
            return Refused(self._scrub(f"cannot reach the upstream: {detail}"), None, True)
        return Unknown(self._scrub(f"the request failed after it was sent: {detail}"))

    async def _read_outcome(self, response: httpx.Response) -> Outcome:
        if not response.is_success:
            return await self._refusal(response)
        content_type = response.headers.get("content-type", "").lower()
        if "json" in content_type and "event-stream" not in content_type:
            return await self._json_outcome(response)
        return await self._sse_outcome(response)

    async def _refusal(self, response: httpx.Response) -> Refused:
        status = response.status_code
        try:
            raw = await _read_at_most(response, MAX_ERROR_BODY)
        except _TRANSPORT_ERRORS:
            raw = b""  # the status alone already says the request was refused
        message = _error_body_message(raw) or response.reason_phrase or "no message"
        return Refused(
            message=self._scrub(message),
            status=status,
            retryable=_retryable_status(status),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    async def _json_outcome(self, response: httpx.Response) -> Outcome:
        raw = await _read_at_most(response, self._max_result_bytes + 1)
        if len(raw) > self._max_result_bytes:
            return Unknown(f"the response body is larger than {self._max_result_bytes} bytes")
        try:
            document = json.loads(raw)
        except ValueError:
            return Unknown("the upstream's JSON body could not be parsed")
        outcome = self._document_outcome(document)
        return outcome or Unknown("the JSON body holds neither a result nor an error")

    async def _sse_outcome(self, response: httpx.Response) -> Outcome:
        parser = SSEParser()
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > self._max_result_bytes:
                return Unknown(f"the stream is larger than {self._max_result_bytes} bytes")
            for event in parser.feed(chunk):
                outcome = self._event_outcome(event)
                if outcome is not None:
                    return outcome  # at the result: no need to wait for [DONE]
        parser.close()
        return Unknown("the stream ended before a result")

    def _event_outcome(self, event: SSEEvent) -> Outcome | None:
        data = event.data.strip()
        if data == "[DONE]":
            return Unknown("the stream ended ([DONE]) without a result")
        try:
            document = json.loads(data)
        except ValueError:
            log.debug("ignoring an SSE event that is not JSON (%d chars)", len(data))
            return None
        return self._document_outcome(document)

    def _document_outcome(self, document: Any) -> Outcome | None:
        """A result or an error document; None for anything else (progress events...)."""
        if not isinstance(document, dict):
            return None
        if document.get("error"):
            return self._error_event(document["error"])
        data = document.get("data")
        if isinstance(data, list):
            created = document.get("created")
            valid = isinstance(created, int) and not isinstance(created, bool)
            return Delivered(data=data, created=created if valid else None)
        return None

    def _error_event(self, error: Any) -> Refused:
        if isinstance(error, dict):
            message = _error_text(error) or "the upstream sent an error event"
            retryable = _retryable_error_kind(error.get("type"), error.get("code"))
        else:
            message, retryable = str(error), False
        return Refused(self._scrub(message), None, retryable)

    # --- models -----------------------------------------------------------------------------

    async def list_models(self) -> list[dict[str, Any]]:
        """The raw entries of GET {api_base}/models; raises UpstreamError."""
        try:
            async with asyncio.timeout(self._deadline):
                response = await self._api.get(f"{self._api_base}/models",
                                               headers=self._headers())
        except TimeoutError:
            raise UpstreamError(f"GET /models took longer than {self._deadline:g}s") from None
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(self._scrub(f"GET /models failed: {self._detail(exc)}")) from None
        if not response.is_success:
            message = _error_body_message(response.content[:MAX_ERROR_BODY]) or "no message"
            raise UpstreamError(
                self._scrub(f"GET /models answered HTTP {response.status_code}: {message}")
            )
        try:
            document = response.json()
        except ValueError:
            raise UpstreamError("GET /models answered a body that is not JSON") from None
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("GET /models answered JSON without a `data` list")
        return [entry for entry in data if isinstance(entry, dict)]

    # --- media ------------------------------------------------------------------------------

    async def fetch_media(self, url: str) -> bytes:
        """Download one result URL at once (pre-signed URLs expire); raises MediaRefused."""
        try:
            async with asyncio.timeout(self._deadline):
                return await self._follow(url)
        except TimeoutError:
            raise MediaRefused(
                f"the download from {_host_of(url)} took longer than {self._deadline:g}s"
            ) from None

    async def _follow(self, url: str) -> bytes:
        current = _parse_media_url(url)
        for _ in range(MAX_REDIRECTS + 1):
            await self._check_host(current)
            result = await self._fetch_once(current)
            if isinstance(result, bytes):
                return result
            current = result
        raise MediaRefused(f"more than {MAX_REDIRECTS} redirects from {_host_of(url)}")

    async def _fetch_once(self, url: httpx.URL) -> bytes | httpx.URL:
        """One hop: the bytes, or the URL the server redirects to (checked by the caller)."""
        host = url.host
        try:
            async with self._media.stream(
                "GET", url, headers={"Accept-Encoding": "identity"}
            ) as response:
                if response.status_code in REDIRECT_STATUSES:
                    return _redirect_target(url, response)
                if not response.is_success:
                    raise MediaRefused(f"{host} answered HTTP {response.status_code}")
                _check_identity_encoding(response, host)
                return await self._read_media(response, host)
        except _TRANSPORT_ERRORS as exc:
            # `from None`: the chained exception could carry the whole pre-signed URL.
            raise MediaRefused(f"the download from {host} failed: {self._detail(exc)}") from None

    async def _read_media(self, response: httpx.Response, host: str) -> bytes:
        cap = self._max_media_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise MediaRefused(f"media from {host} is {declared} bytes, over the {cap} cap")
        received = bytearray()
        async for chunk in response.aiter_raw():
            received += chunk
            if len(received) > cap:
                raise MediaRefused(f"media from {host} is over the {cap} byte cap")
        return bytes(received)

    async def _check_host(self, url: httpx.URL) -> None:
        """Refuse a hop whose host resolves to any address the SSRF rules forbid."""
        host = url.host
        try:
            addresses = await _resolve(host, url.port or (443 if url.scheme == "https" else 80))
        except OSError:
            raise MediaRefused(f"cannot resolve the media host {host}") from None
        private_ok = await self._private_media_allowed()
        for address in addresses:
            problem = address_problem(address, private_ok=private_ok)
            if problem:
                raise MediaRefused(f"media host {host} resolves to {problem} ({address})")

    async def _private_media_allowed(self) -> bool:
        """Private addresses are fine when configured so, or when the upstream itself is
        private (a local or in-cluster deployment, such as the fake upstream)."""
        if self._allow_private_media:
            return True
        if self._api_is_private is None:
            api = httpx.URL(self._api_base)
            try:
                addresses = await _resolve(api.host, api.port or 443)
            except OSError:
                return False  # not cached: a passing DNS failure must not decide for good
            self._api_is_private = any(not _unwrap(a).is_global for a in addresses)
        return self._api_is_private

    def _media_session(self) -> aiohttp.ClientSession:
        """The media client's aiohttp session; its resolver re-checks every address at connect
        time, so a host that resolves differently after our check (DNS rebinding) is refused."""
        resolver = _GuardedResolver(
            lambda address: address_problem(address, private_ok=self._api_is_private is True
                                            or self._allow_private_media)
        )
        connector = aiohttp.TCPConnector(limit=self._concurrency, resolver=resolver,
                                         ssl=httpx.create_ssl_context())
        return aiohttp.ClientSession(connector=connector)

    # --- helpers ----------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _scrub(self, text: str) -> str:
        """Make a message safe to store and log: no key, no URL query, bounded length."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        text = _URL_SECRET.sub(r"\1?…", text)
        return _clip(text)

    def _detail(self, exc: BaseException) -> str:
        if any(isinstance(cause, _RefusedAddress) for cause in _chain(exc)):
            return "the host resolved only to refused addresses at connect time"
        for cause in _chain(exc):
            if isinstance(cause, aiohttp.ClientConnectorDNSError):
                return "the host name did not resolve"
            if isinstance(cause, aiohttp.ClientConnectorError):
                reason = cause.os_error.strerror or type(cause.os_error).__name__
                return f"cannot connect to {cause.host}:{cause.port} ({reason})"
            if isinstance(cause, aiohttp.ConnectionTimeoutError):
                return "connect timed out"
            if isinstance(cause, aiohttp.SocketTimeoutError | httpx.ReadTimeout):
                return f"no data for {self._read_timeout:g}s (read timeout)"
            if isinstance(cause, aiohttp.ServerDisconnectedError):
                return "the server closed the connection"
            if isinstance(cause, aiohttp.ClientPayloadError):
                return "the response body was cut off"
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RefusedAddress(OSError):
    """Raised by the media resolver: every address of the host is forbidden."""


class _GuardedResolver(AbstractResolver):
    def __init__(self, problem: Callable[[IPAddress], str | None]) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._problem = problem

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._problem(ipaddress.ip_address(r["host"])) is None]
        if not allowed:
            # aiohttp turns an OSError from the resolver into a connection failure.
            raise _RefusedAddress(f"{host} resolves only to refused addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


# --- pure helpers ---------------------------------------------------------------------------


def decode_b64(value: str, max_bytes: int) -> bytes:
    """Decode a `b64_json` result (optionally a data: URL), capped before any decoding."""
    if not isinstance(value, str):
        raise MediaRefused("b64_json is not a string")
    if value.startswith("data:"):
        comma = value.find(",", 0, 256)
        if comma < 0 or not value[:comma].endswith(";base64"):
            raise MediaRefused("b64_json is a data: URL that is not base64")
        value = value[comma + 1:]
    # Exact size of valid base64 (padding excluded), known without decoding anything.
    padding = min(2, len(value) - len(value.rstrip("=")))
    if len(value) * 3 // 4 - padding > max_bytes:
        raise MediaRefused(f"b64_json decodes to more than the {max_bytes} byte cap")
    if not value:
        raise MediaRefused("b64_json is empty")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused("b64_json is not valid base64") from None


def address_problem(address: IPAddress, *, private_ok: bool) -> str | None:
    """Why media must not be fetched from this address, or None when it may."""
    address = _unwrap(address)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified or (address.version == 4 and address in _THIS_NETWORK):
        return "an unspecified address"
    if address.version == 4 and address.is_reserved:
        return "a reserved address"
    if not address.is_global and not private_ok:
        return "a private or loopback address"
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP date; None if unusable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until_http_date(value)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _seconds_until_http_date(value: str) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _retryable_error_kind(kind: Any, code: Any) -> bool:
    """An error event is a refusal; only rate limits and server-side failures are worth
    another attempt."""
    if isinstance(code, int) and not isinstance(code, bool):
        return _retryable_status(code)
    if isinstance(code, str) and code.isdigit():
        return _retryable_status(int(code))
    words = f"{kind or ''} {code or ''}".lower().replace("-", "_").replace(" ", "_")
    markers = ("rate_limit", "ratelimit", "too_many_requests", "server_error",
               "internal_error", "overloaded", "unavailable")
    return any(marker in words for marker in markers)


def _error_text(error: dict[str, Any]) -> str | None:
    message = error.get("message")
    label = error.get("code") or error.get("type")
    if not isinstance(message, str) or not message.strip():
        return str(label) if label else None
    return f"{message} ({label})" if label else message


def _error_body_message(raw: bytes) -> str | None:
    """The message of an OpenAI-style error body, or the body itself as text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        return text or None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict):
            return _error_text(error) or text
        if isinstance(error, str) and error:
            return error
        for key in ("message", "detail"):
            if isinstance(document.get(key), str):
                return document[key]
    return text or None


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    received = bytearray()
    async for chunk in response.aiter_bytes():
        received += chunk
        if len(received) >= limit:
            break
    return bytes(received[:limit])


def _never_sent(exc: BaseException) -> bool:
    """True when the failure happened before the request left (nothing can be billed).

    httpx-aiohttp maps every aiohttp ClientConnectionError to httpx.ConnectTimeout, even a
    server that disconnected after reading the request, so look at aiohttp's own exception.
    """
    never_sent = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                  ConnectionRefusedError, socket.gaierror)
    return any(isinstance(cause, never_sent) for cause in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _parse_media_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise MediaRefused("the media URL is not a valid URL") from None
    return _require_http(parsed)


def _require_http(url: httpx.URL) -> httpx.URL:
    if url.scheme not in ("http", "https"):
        raise MediaRefused(f"the media URL scheme {url.scheme[:16]!r} is not http(s)")
    if not url.host:
        raise MediaRefused("the media URL has no host")
    return url


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise MediaRefused(f"{url.host} redirected without a Location")
    try:
        target = url.join(location)
    except httpx.InvalidURL:
        raise MediaRefused(f"{url.host} redirected to an invalid URL") from None
    return _require_http(target)


def _check_identity_encoding(response: httpx.Response, host: str) -> None:
    # We asked for identity: any other coding would have to be decoded past the size cap.
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaRefused(f"media from {host} came with Content-Encoding {encoding[:32]!r}")


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:  # an address literal resolves to itself: no trip to the resolver's thread pool
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no addresses for {host}")
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def _unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address hidden in an IPv4-mapped or NAT64 IPv6 address, else the address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _host_of(url: str) -> str:
    try:
        return httpx.URL(url).host or "an unknown host"
    except (httpx.InvalidURL, TypeError):
        return "an invalid URL"


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def safe_url(url: httpx.URL | str) -> str:
    """A URL fit for logs: scheme and host only (pre-signed URLs are credentials)."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}/…"


class _RedactUrls(logging.Filter):
    """httpx logs every request URL at INFO; a pre-signed media URL must not reach a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                safe_url(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


def _install_log_filter() -> None:
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactUrls())


_install_log_filter()

