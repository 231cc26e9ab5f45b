"""Client of the OpenAI-compatible image endpoint: SSE generation, guarded media fetch, models."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import email.utils
import ipaddress
import json
import logging
import math
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

import aiohttp
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline.httpclient import (
    TRANSPORT_ERRORS,
    aiohttp_cause,
    causes,
    client,
    connector,
    over_aiohttp,
)
from pipeline.redact import redact_url, redactor_for, url_secrets
from pipeline.sse import SSEEvent, SSEParser

log = logging.getLogger("imagebatch.upstream")

MAX_MESSAGE_CHARS = 500
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
# How long the rest of a stream ([DONE], the body's end) is read for once its result is in.
# A stream read to its end returns its connection to the pool, and its readers (async
# generators in httpx and the transport) end with it: one left suspended is closed later by
# the loop's finalizer, a task and a self-pipe write each, four per call.
REST_OF_STREAM_SECONDS = 0.05
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Cloud metadata services: never fetched, even where private addresses are allowed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_URL_SECRET = re.compile(r"(https?://[^\s\"'<>?#]*)[?#][^\s\"'<>]*", re.IGNORECASE)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Caught inside the deadline (OSError includes TimeoutError), so a TimeoutError that reaches
# `asyncio.timeout` is the render deadline and nothing else.
_TRANSPORT_ERRORS = TRANSPORT_ERRORS
# Media is read as it arrives (no decompression), so only the identity coding is accepted.
_MEDIA_HEADERS = httpx.Headers({"Accept-Encoding": "identity"})

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
    """A result came back: the provider did the work, so it is charged. `refused` says why
    none of it can be kept (a body over the size cap): charged, not kept, not retried."""

    data: list[dict[str, Any]]
    created: int | None = None
    refused: str | None = None
    # The provider's name for the call (x-request-id or request-id header, else the body's
    # `id`), kept and exported: what its support asks for.
    request_id: str | None = None


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


@dataclass
class _Call:
    """One generation's outcome, once read: the deadline may end the rest of its stream."""

    outcome: Outcome | None = None


def rate_limited(outcome: object) -> TypeGuard[Refused]:
    """A 429 worth another try: "not now" (render.py does not count it as an attempt)."""
    return isinstance(outcome, Refused) and outcome.status == 429 and outcome.retryable


class UpstreamClient:
    """One per worker process; lives on one asyncio loop (aiohttp sessions are loop-bound), so
    it is built inside a coroutine running on that loop.

    Two httpx clients, each over its own aiohttp pool (`pipeline.httpclient`): the API's, with
    the key, and the media hosts', without it."""

    def __init__(self, api_base: str, api_key: str | None, *, concurrency: int,
                 read_timeout: float, connect_timeout: float, deadline: float,
                 max_media_bytes: int, allow_private_media: bool,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport` replaces both aiohttp pools (a test's `httpx.MockTransport`)."""
        self._api_base = api_base.rstrip("/")
        self._api_key = api_key or None
        # The key and the base's credentials, taken out of every upstream text we keep.
        self._redact = redactor_for(self._api_base, self._api_key)
        # Why no call can be sent (each is refused with it), or None.
        self._auth_conflict = _auth_problem(self._api_base, self._api_key)
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._max_media_bytes = max_media_bytes
        # Room for up to 16 base64 results per response; past it the body is not a result.
        self._max_result_bytes = 16 * (max_media_bytes * 4 // 3 + 1024) + (1 << 20)
        self._allow_private_media = allow_private_media
        self._api_is_private: bool | None = None
        self._concurrency = max(1, concurrency)
        # Parsed once; a base that does not parse is refused at each call, not here.
        self._generations_url = _api_url(self._api_base, "images/generations")
        self._models_url = _api_url(self._api_base, "models")
        # What is sent: the same URLs without the base's credentials (sent as a header).
        self._generations_target = _target(self._generations_url)
        self._models_target = _target(self._models_url)
        auth = ({} if self._auth_conflict else
                _authorization(self._api_key, self._generations_url))
        self._auth_headers = auth
        # Built once: each call's request is made from them (`httpclient.Client`). The codings
        # httpx decodes, said here: aiohttp would offer what it decodes itself (zstd, br).
        self._generation_headers = httpx.Headers({
            **auth, "Accept": "text/event-stream, application/json",
            "Accept-Encoding": "gzip, deflate", "Content-Type": "application/json"})
        # The read timeout is reset by every chunk (a per-chunk read timeout: keepalive
        # comments keep a render alive, the deadline ends it); `pool` bounds the wait for a
        # pooled connection plus the connect, so a render never waits unbounded for one.
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout,
                                write=read_timeout, pool=connect_timeout)
        # Both pools get the concurrency (aiohttp's and httpx's defaults stop at 100).
        connections = self._concurrency
        self._api: aiohttp.ClientSession | None = None
        self._media: aiohttp.ClientSession | None = None
        if transport is None:
            self._api = aiohttp.ClientSession(connector=connector(connections))
            self._media = self._media_session()
            api_transport: httpx.AsyncBaseTransport = over_aiohttp(self._api, connections)
            media_transport: httpx.AsyncBaseTransport = over_aiohttp(self._media, connections)
        else:
            api_transport = media_transport = transport
        self._api_http = client(api_transport, connections=connections, timeout=timeout)
        self._media_http = client(media_transport, connections=connections, timeout=timeout)

    async def aclose(self) -> None:
        """Close both clients (and so their aiohttp sessions)."""
        try:
            await self._api_http.aclose()
        finally:
            await self._media_http.aclose()

    # --- generation -------------------------------------------------------------------------

    async def generate(self, body: dict[str, Any],
                       on_accepted: Callable[[], None] | None = None) -> Outcome:
        """POST one generation with `sse: true` and say how it ended (never raises for I/O).
        `on_accepted` is called once the upstream answers 2xx (it is serving the call)."""
        payload = {**body, "sse": True}  # a copy: the caller's dict is never changed
        try:
            content = _json_body(payload)
        except (TypeError, ValueError) as exc:
            return Refused(self._scrub(f"the request body is not JSON: {exc}"), None, False)
        call = _Call()
        try:
            async with asyncio.timeout(self._deadline):
                return await self._send_generation(content, call, on_accepted)
        except TimeoutError:
            if call.outcome is not None:
                return call.outcome  # the deadline ended only the rest of the stream
            # Keepalive comments reset the read timeout forever; only this ends a stall.
            return Unknown(f"no result within the {self._deadline:g}s render deadline")

    async def _send_generation(self, content: bytes, call: _Call,
                               on_accepted: Callable[[], None] | None = None) -> Outcome:
        if self._auth_conflict is not None:
            return Refused(self._auth_conflict, None, False)
        target = self._generations_target
        if isinstance(target, str):
            return Refused(self._scrub(f"bad api_base: {target} is not a valid URL"), None, False)
        request = httpx.Request("POST", target, headers=self._generation_headers,
                                content=content)
        try:
            response = await self._api_http.send(request, stream=True)
        except _TRANSPORT_ERRORS as exc:
            return self._send_failed(exc)
        try:
            _log_response("POST", self._generations_url, response)
            if on_accepted is not None and 200 <= response.status_code < 300:
                on_accepted()
            return await self._read_outcome(response, call)
        except _TRANSPORT_ERRORS as exc:
            return Unknown(self._scrub(f"the response broke off: {self._detail(exc)}"))
        finally:
            # A close error says nothing about the outcome already decided. An unread rest
            # (a result before [DONE]) closes the connection instead of returning it.
            with contextlib.suppress(*_TRANSPORT_ERRORS):
                await response.aclose()

    def _send_failed(self, exc: BaseException) -> Outcome:
        detail = self._detail(exc)
        if _bad_url(exc):
            return Refused(self._scrub(f"bad api_base: {detail}"), None, False)
        if _never_sent(exc):
            return Refused(self._scrub(f"cannot reach the upstream: {detail}"), None, True)
        return Unknown(self._scrub(f"the request failed after it was sent: {detail}"))

    async def _read_outcome(self, response: httpx.Response, call: _Call) -> Outcome:
        if not 200 <= response.status_code < 300:
            return await self._refusal(response)
        content_type = _header(response, "content-type").lower()
        if "json" in content_type and "event-stream" not in content_type:
            outcome = await self._json_outcome(response)
        else:
            outcome = await self._sse_outcome(response, call)
        if isinstance(outcome, Delivered):
            named = (self._request_id(_header(response, "x-request-id"))
                     or self._request_id(_header(response, "request-id")))
            if named is not None:
                return dataclasses.replace(outcome, request_id=named)
        return outcome

    def _request_id(self, value: Any) -> str | None:
        """A request id as the provider sent it, if it is one, with any secret in it redacted:
        printable ASCII without spaces and at most 200 characters (the column's size) once
        redacted; anything else is not kept (a value too long for its column would fail the
        render's settlement)."""
        if not isinstance(value, str):
            return None
        kept = self._scrub(value.strip())
        return kept if _REQUEST_ID.fullmatch(kept) else None

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
            # A 429 that says the account's quota is spent is no "not now": it fails at once.
            retryable=_retryable_status(status) and not _quota_spent(raw),
            retry_after=parse_retry_after(_header(response, "retry-after") or None),
        )

    async def _json_outcome(self, response: httpx.Response) -> Outcome:
        raw = await _read_at_most(response, self._max_result_bytes + 1)
        if len(raw) > self._max_result_bytes:
            return self._too_large("response body")
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            return Unknown("the upstream's JSON body could not be parsed")
        outcome = self._document_outcome(document)
        return outcome or Unknown("the JSON body holds neither a result nor an error")

    async def _sse_outcome(self, response: httpx.Response, call: _Call) -> Outcome:
        # Chunks into our own parser: line reading (httpx's aiter_lines, aiohttp's readline)
        # splits at more than CR and LF, or is quadratic on one long data line, which is what
        # a base64 result is. aiter_bytes: the body as the server meant it (gzip decoded).
        parser = SSEParser()
        received = 0
        chunks = response.aiter_bytes()
        async for chunk in chunks:
            received += len(chunk)
            if received > self._max_result_bytes:
                return self._too_large("stream")
            for event in parser.feed(chunk):
                outcome = self._event_outcome(event)
                if outcome is not None:
                    # Decided at the result: whatever follows (or fails to) changes nothing.
                    call.outcome = outcome
                    await self._read_rest(chunks, received)
                    return outcome
        parser.close()
        return Unknown("the stream ended before a result")

    async def _read_rest(self, chunks: AsyncIterator[bytes], received: int) -> None:
        """What follows a result ([DONE], the body's end), read and dropped for at most
        REST_OF_STREAM_SECONDS and within the size cap; a stream that goes on longer, breaks
        off or passes the cap is left as it is (its connection is then closed)."""
        try:
            async with asyncio.timeout(REST_OF_STREAM_SECONDS):
                async for chunk in chunks:
                    received += len(chunk)
                    if received > self._max_result_bytes:
                        return
        except _TRANSPORT_ERRORS:  # TimeoutError (an OSError) included
            return

    def _too_large(self, what: str) -> Delivered:
        """A success answer past every result we could keep (n files at the media cap): the
        provider made it, so it is charged like an over-size file by URL, and never asked for
        again (the same request makes the same over-size result)."""
        return Delivered(data=[], refused=(
            f"the result is too large to keep: the {what} passed {self._max_result_bytes} "
            f"bytes (IMAGEBATCH_MAX_MEDIA_BYTES is {self._max_media_bytes} per file)"))

    def _event_outcome(self, event: SSEEvent) -> Outcome | None:
        data = event.data.strip()
        if data == "[DONE]":
            return Unknown("the stream ended ([DONE]) without a result")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
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
            return Delivered(data=[self._kept_entry(entry) for entry in data],
                             created=created if valid else None,
                             request_id=self._request_id(document.get("id")))
        return None

    def _kept_entry(self, entry: Any) -> Any:
        """A result entry with its revised prompt (the one text of it we keep) redacted: an
        upstream that echoes the key or the base's password back must not get it stored."""
        if isinstance(entry, dict) and isinstance(entry.get("revised_prompt"), str):
            return {**entry, "revised_prompt": self._redact(entry["revised_prompt"])}
        return entry

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
                status, raw = await self._get_models()
        except TimeoutError:
            raise UpstreamError(f"GET /models took longer than {self._deadline:g}s") from None
        if not 200 <= status < 300:
            message = _error_body_message(raw[:MAX_ERROR_BODY]) or "no message"
            raise UpstreamError(self._scrub(f"GET /models answered HTTP {status}: {message}"))
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise UpstreamError("GET /models answered a body that is not JSON") from None
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise UpstreamError("GET /models answered JSON without a `data` list")
        return [entry for entry in data if isinstance(entry, dict)]

    async def _get_models(self) -> tuple[int, bytes]:
        if self._auth_conflict is not None:
            raise UpstreamError(self._auth_conflict)
        target = self._models_target
        if isinstance(target, str):
            raise UpstreamError(self._scrub(f"bad api_base: {target} is not a valid URL"))
        try:
            async with self._api_http.stream("GET", target,
                                             headers=self._auth_headers) as response:
                _log_response("GET", self._models_url, response)
                return response.status_code, await response.aread()
        except _TRANSPORT_ERRORS as exc:
            raise UpstreamError(self._scrub(f"GET /models failed: {self._detail(exc)}")) from None

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

    async def _fetch_once(self, url: URL) -> bytes | URL:
        """One hop: the bytes, or the URL the server redirects to (checked by the caller)."""
        host = url.host
        try:
            request = _media_request(url)
        except httpx.InvalidURL:
            raise MediaRefused("the media URL is not a valid URL") from None
        try:
            # Redirects are never followed by the client: each hop's host is checked first.
            async with self._media_http.sending(request) as response:
                _log_response("GET", url, response)
                if response.status_code in REDIRECT_STATUSES:
                    return _redirect_target(url, response)
                if not 200 <= response.status_code < 300:
                    raise MediaRefused(f"{host} answered HTTP {response.status_code}")
                _check_identity_encoding(response, host)
                return await self._read_media(response, host)
        except (*_TRANSPORT_ERRORS, ValueError) as exc:  # ValueError: aiohttp refused to send
            # `from None` and scrubbed: the exception's text can carry the pre-signed URL.
            raise MediaRefused(
                self._scrub(f"the download from {host} failed: {self._detail(exc)}")) from None

    async def _read_media(self, response: httpx.Response, host: str | None) -> bytes:
        cap = self._max_media_bytes
        declared = _header(response, "content-length")
        if declared.isdigit() and int(declared) > cap:
            raise MediaRefused(f"media from {host} is {declared} bytes, over the {cap} cap")
        received = bytearray()
        # aiter_raw does not decompress: these are the bytes on the wire.
        async for chunk in response.aiter_raw():
            received += chunk
            if len(received) > cap:
                raise MediaRefused(f"media from {host} is over the {cap} byte cap")
        return bytes(received)

    async def _check_host(self, url: URL) -> None:
        """Refuse a hop whose host resolves to any address the SSRF rules forbid."""
        host = url.host or ""
        try:
            addresses = await _resolve(host, url.port or (443 if url.scheme == "https" else 80))
        except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode
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
            api = self._generations_url  # any endpoint: its host is the API's host
            if isinstance(api, str) or not api.host:
                return False  # an api_base that is not a URL is no private deployment
            try:
                addresses = await _resolve(api.host, api.port or 443)
            except (OSError, UnicodeError):
                return False  # not cached: a passing DNS failure must not decide for good
            self._api_is_private = any(not _unwrap(a).is_global for a in addresses)
        return self._api_is_private

    def _media_session(self) -> aiohttp.ClientSession:
        """The media hosts' pool. Its resolver re-checks every address at connect time, so a
        host that resolves differently after our check (DNS rebinding) is refused; it does not
        decompress, so the size cap counts the bytes that arrive (we ask for identity)."""
        resolver = _GuardedResolver(
            lambda address: address_problem(address, private_ok=self._api_is_private is True
                                            or self._allow_private_media)
        )
        return aiohttp.ClientSession(connector=connector(self._concurrency, resolver=resolver),
                                     auto_decompress=False)

    # --- helpers ----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Make a message safe to store and log: no key, no URL credentials or query,
        bounded length."""
        text = _URL_SECRET.sub(r"\1?…", self._redact(text))
        return _clip(text)

    def _detail(self, exc: BaseException) -> str:
        """What went wrong, in a few words: from aiohttp's own error when aiohttp raised it
        (the transport's httpx translation of it is coarse), else from httpx's."""
        if any(isinstance(cause, _RefusedAddress) for cause in causes(exc)):
            return "the host resolved only to refused addresses at connect time"
        for cause in causes(exc):
            if isinstance(cause, aiohttp.ClientConnectorDNSError):
                return "the host name did not resolve"
            if isinstance(cause, aiohttp.ClientConnectorError):
                reason = cause.os_error.strerror or type(cause.os_error).__name__
                return f"cannot connect to {cause.host}:{cause.port} ({reason})"
            if isinstance(cause, aiohttp.ConnectionTimeoutError):
                return "connect timed out"
            if isinstance(cause, aiohttp.SocketTimeoutError):
                return f"no data for {self._read_timeout:g}s (read timeout)"
            if isinstance(cause, aiohttp.ServerDisconnectedError):
                return "the server closed the connection"
            if isinstance(cause, aiohttp.ClientPayloadError):
                return "the response body was cut off"
        root = aiohttp_cause(exc)
        if root is None:
            return _httpx_detail(exc, self._read_timeout)
        text = str(root)
        return f"{type(root).__name__}: {text}" if text else type(root).__name__


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


def _quota_spent(raw: bytes) -> bool:
    """OpenAI-style `insufficient_quota` (sent with 429): no retry can succeed."""
    return b"insufficient_quota" in raw or b"quota_exceeded" in raw


def _error_body_message(raw: bytes) -> str | None:
    """The message of an OpenAI-style error body, or the body itself as text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
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


# Failures before the request left, by who raised them. Not aiohttp's ClientConnectionError
# nor the httpx.ConnectTimeout the transport makes of it: a server that disconnected after
# reading the request raises one too.
_NEVER_SENT_AIOHTTP = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                       ConnectionRefusedError, socket.gaierror)
_NEVER_SENT_HTTPX = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                     ConnectionRefusedError, socket.gaierror)


def _never_sent(exc: BaseException) -> bool:
    """True when the failure happened before the request left (nothing can be billed): a
    connect failure or timeout, or no free connection in time. Read from aiohttp's error when
    aiohttp raised it, else from httpx's (another transport, such as a test's)."""
    never_sent = _NEVER_SENT_HTTPX if aiohttp_cause(exc) is None else _NEVER_SENT_AIOHTTP
    return any(isinstance(cause, never_sent) for cause in causes(exc))


def _bad_url(exc: BaseException) -> bool:
    """The URL cannot be sent at all (no host, not http or https)."""
    root = aiohttp_cause(exc)
    if root is not None:
        return isinstance(root, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError)
    return isinstance(exc, httpx.UnsupportedProtocol)


def _httpx_detail(exc: BaseException, read_timeout: float) -> str:
    """`_detail` for an error httpx raised itself (no aiohttp underneath)."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data for {read_timeout:g}s (read timeout)"
    text = str(exc)
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({text})" if text else "cannot connect"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# --- requests and responses ---------------------------------------------------------------


def _json_body(payload: dict[str, Any]) -> bytes:
    """The request body, encoded as before (compact, UTF-8, no NaN or Infinity)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    received = bytearray()
    async for chunk in response.aiter_bytes():
        received += chunk
        if len(received) >= limit:
            break
    return bytes(received[:limit])


_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _header(response: httpx.Response, name: str) -> str:
    """A header's values joined with ", " (httpx's reading): a repeated header is seen whole
    (two Content-Encoding lines, one of them gzip, are not identity)."""
    return response.headers.get(name, "")


def _check_identity_encoding(response: httpx.Response, host: str | None) -> None:
    # We asked for identity: any other coding would have to be decoded past the size cap.
    encoding = _header(response, "content-encoding").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaRefused(f"media from {host} came with Content-Encoding {encoding[:32]!r}")


def _log_response(method: str, url: URL | str, response: httpx.Response) -> None:
    """One line per response at DEBUG (shown by `-vv`), host only: httpx's own line, which
    holds the whole URL, is dropped (`pipeline.httpclient`)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug('HTTP Request: %s %s "%s %d %s"', method, safe_url(url),
                  response.http_version, response.status_code, response.reason_phrase)


# --- URLs -----------------------------------------------------------------------------------


def _parse_url(text: str) -> URL:
    """`text` as a URL, read as the client always read URLs (with httpx), so that what is
    refused or fetched does not change: an ASCII control character makes it invalid (yarl
    would silently drop tabs and line breaks, and strip them from the start), and spaces are
    percent-encoded (yarl would strip leading ones and write '+' in a query)."""
    if _CONTROL_CHARS.search(text) is not None:
        raise ValueError("the URL holds a control character")
    return URL(text.replace(" ", "%20"))


def _api_url(base: str, path: str) -> URL | str:
    """An endpoint under api_base, or its text when that is not a valid URL (each call is
    then refused: `bad api_base`)."""
    text = f"{base}/{path}"
    try:
        return _parse_url(text)
    except ValueError:
        return text


def _target(url: URL | str) -> httpx.URL | str:
    """The endpoint as httpx sends it, without the base's credentials (`_authorization` sends
    them); the text of a URL that does not parse."""
    if isinstance(url, str):
        return url
    try:
        return httpx.URL(str(url.with_user(None)))
    except httpx.InvalidURL:
        return str(url)


def _auth_problem(api_base: str, api_key: str | None) -> str | None:
    """Why the Authorization header cannot be sent, or None."""
    if api_key and url_secrets(api_base):
        # One Authorization header: a key (Bearer) or the base's credentials (Basic).
        return (f"bad api_base: {redact_url(api_base)} holds credentials and an API key is "
                "set too; only one can be sent")
    if api_key and not api_key.isascii():
        return "the API key holds a character that is not ASCII: no HTTP header can carry it"
    return None


def _media_request(url: URL) -> httpx.Request:
    """One hop's GET. Credentials in the URL go as its Basic header (to this hop's host only)
    and not in the URL itself: given both, aiohttp refuses the request."""
    headers = _MEDIA_HEADERS
    if url.user is not None or url.password is not None:
        headers = httpx.Headers({**_MEDIA_HEADERS, **_authorization(None, url)})
        url = url.with_user(None)
    return httpx.Request("GET", httpx.URL(str(url)), headers=headers)


def _authorization(api_key: str | None, url: URL | str) -> dict[str, str]:
    """The one Authorization header: the key (Bearer), or the base's credentials (Basic,
    UTF-8, as `redact.url_secrets` expects to find them echoed back)."""
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    if isinstance(url, URL) and (url.user is not None or url.password is not None):
        pair = f"{url.user or ''}:{url.password or ''}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def _parse_media_url(url: str) -> URL:
    try:
        return _require_http(_parse_url(url))
    except (ValueError, TypeError):  # ValueError includes yarl's IDNA errors on .host
        raise MediaRefused("the media URL is not a valid URL") from None


def _require_http(url: URL) -> URL:
    if url.scheme not in ("http", "https"):
        raise MediaRefused(f"the media URL scheme {url.scheme[:16]!r} is not http(s)")
    if not url.host:
        raise MediaRefused("the media URL has no host")
    return url


def _redirect_target(url: URL, response: httpx.Response) -> URL:
    location = _header(response, "location")
    if not location:
        raise MediaRefused(f"{url.host} redirected without a Location")
    try:
        return _require_http(url.join(_parse_url(location)))
    except ValueError:
        raise MediaRefused(f"{url.host} redirected to an invalid URL") from None


def _host_of(url: str) -> str:
    try:
        return _parse_url(url).host or "an unknown host"
    except (ValueError, TypeError):
        return "an invalid URL"


def safe_url(url: URL | str) -> str:
    """A URL fit for logs: scheme and host only (pre-signed URLs are credentials)."""
    try:
        parsed = url if isinstance(url, URL) else _parse_url(str(url))
        host = parsed.host
    except (ValueError, TypeError):
        return "<invalid URL>"
    port = f":{parsed.explicit_port}" if parsed.explicit_port else ""
    return f"{parsed.scheme}://{host}{port}/…"


# --- addresses ------------------------------------------------------------------------------


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
