"""HTTP handlers of the fake upstream: models, generations (plain and SSE), media, stats."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from fake_upstream.catalog import Request, validate
from fake_upstream.errors import FakeError, error_object
from fake_upstream.knobs import MAX_MEDIA_BYTES, Knobs, parse_knobs
from fake_upstream.media_bytes import KINDS, MediaSpec, render, variant_of
from fake_upstream.state import FakeState
from fake_upstream.stream import SSE_HEADERS, ClientGone, EventStream

STATE = web.AppKey("fake_state", FakeState)
REQUEST_ID = web.RequestKey("fake_request_id", str)  # the id a call is answered with

# ensure_ascii=False: a raw U+2028 in a prompt stays raw, which is what trips line splitters.
_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Plan:
    """How one accepted call will go."""

    request: Request
    knobs: Knobs
    outcome: str  # ok | cut | stall | error_event
    latency: float
    kind: str  # media kind of every result ("garbage" for non-media bytes)
    media_bytes: int
    # What `fake.echo_key` echoes: the credential of the Authorization header (a careless
    # provider's "invalid key sk-..." or a prompt rewriter that repeats its headers).
    echoed: str | None = None

    @property
    def billed_as(self) -> str:
        return "garbage" if self.kind == "garbage" and self.outcome == "ok" else self.outcome


# --- /v1/images/generations ------------------------------------------------------------------

async def generations(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_json(request)
    # Every answer names its call, as OpenAI's `x-request-id` does (the pipeline keeps it).
    request[REQUEST_ID] = f"req_{uuid.uuid4().hex}"  # 36 characters, as OpenAI's
    state.begin(body, bool(request.headers.get("Authorization")), request[REQUEST_ID])
    try:
        try:
            plan = _plan(body, state, _credential(request))
            _take_a_place(state)
        except FakeError as exc:  # refused before any stream: never billed
            state.count(exc.outcome)
            return _error_response(exc)
        try:
            if isinstance(body, dict) and body.get("sse") is True:
                return await _stream(request, plan, state)
            return await _plain(request, plan, state)
        finally:
            state.stop_serving()
    finally:
        state.end()


def _credential(request: web.Request) -> str | None:
    """The Authorization header's credential (a Bearer key, or Basic's base64)."""
    _, _, credential = request.headers.get("Authorization", "").partition(" ")
    return credential.strip() or None


def _take_a_place(state: FakeState) -> None:
    """A provider that serves max_concurrent calls at once answers one more with 429."""
    if not state.start_serving():
        raise FakeError(429, f"too many requests at once (at most {state.config.max_concurrent})",
                        code="rate_limit_exceeded", outcome="rate_limited",
                        retry_after=state.config.concurrency_retry_after)


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        return None  # validate() answers 400 for anything that is not an object


def _plan(body: Any, state: FakeState, credential: str | None = None) -> Plan:
    accepted = validate(body, state.models)
    knobs = parse_knobs(body.get("fake"))
    echoed = credential if knobs.echo_key else None
    _refuse_if_asked(knobs, accepted, state, echoed)
    outcome = _pick_outcome(knobs, state)
    config = state.config
    kind = "garbage" if knobs.garbage else knobs.media or accepted.default_media
    return Plan(
        accepted, knobs, outcome,
        latency=config.latency if knobs.latency is None else float(knobs.latency),
        kind=kind,
        media_bytes=config.media_bytes if knobs.media_bytes is None else knobs.media_bytes,
        echoed=echoed,
    )


def _refuse_if_asked(knobs: Knobs, accepted: Request, state: FakeState,
                     echoed: str | None = None) -> None:
    """fake.status always fails; with fail_first only the first k calls of `key` fail."""
    if knobs.fail_first is not None:
        key = accepted.prompt if knobs.key is None else knobs.key
        if state.fails_first(key, knobs.fail_first):
            raise _asked_status(knobs.status or 500, knobs.retry_after, echoed)
    elif knobs.status is not None:
        raise _asked_status(knobs.status, knobs.retry_after, echoed)


def _asked_status(status: int, retry_after: float | None, echoed: str | None = None
                  ) -> FakeError:
    return FakeError(status, _echoing(f"fake status {status}", echoed), code=f"fake_{status}",
                     outcome="error_status", retry_after=retry_after)


def _echoing(message: str, echoed: str | None) -> str:
    return message if echoed is None else f"{message} (key: {echoed})"


def _pick_outcome(knobs: Knobs, state: FakeState) -> str:
    """The knobs decide if they say anything; otherwise one draw against the global rates."""
    for name in ("error_event", "stall", "cut"):
        if getattr(knobs, name):
            return name
    if knobs.picks_outcome:
        return "ok"
    config, draw = state.config, state.rng.random()
    if draw < config.rate_limit_rate:
        raise FakeError(429, "rate limit reached, slow down", code="rate_limit_exceeded",
                        outcome="rate_limited", retry_after=1)
    draw -= config.rate_limit_rate
    if draw < config.fail_rate:
        raise FakeError(500, "the upstream failed", code="server_error", outcome="server_error")
    return "cut" if draw - config.fail_rate < config.cut_rate else "ok"


def _error_response(exc: FakeError) -> web.Response:
    headers = {} if exc.retry_after is None else {"Retry-After": f"{exc.retry_after:g}"}
    return web.json_response(exc.body(), status=exc.status, headers=headers, dumps=_dumps)


def _error_event_body(echoed: str | None = None) -> bytes:
    # A content-policy refusal mid-stream: the common real case, and a definite (unbilled) one.
    error = error_object(422, _echoing("the output was refused by the content policy", echoed),
                         "content_policy_violation")
    return _dumps({"error": error}).encode()


# --- SSE -------------------------------------------------------------------------------------

async def _stream(request: web.Request, plan: Plan, state: FakeState) -> web.StreamResponse:
    response = web.StreamResponse(headers={**SSE_HEADERS, **_named(request)})
    await response.prepare(request)
    stream = EventStream(request, response, plan.knobs, lambda: state.closing)
    with contextlib.suppress(ClientGone):  # a client that left needs nothing more
        await _stream_events(request, stream, plan, state)
    return response


async def _stream_events(request: web.Request, stream: EventStream, plan: Plan,
                         state: FakeState) -> None:
    interval = state.config.keepalive_interval
    if plan.outcome == "stall":
        _bill(state, plan)  # the provider took the job; it just never answers
        await stream.keepalives(math.inf, interval)
        return
    await _keepalives_or_leave(stream, plan.latency, interval, state)
    if plan.outcome == "error_event":
        state.count("error_event")
        await stream.event(_error_event_body(plan.echoed))
        return
    result = _result_json(request, plan, state)
    _bill(state, plan)
    if plan.outcome == "cut":
        line = stream.event_bytes(*result)
        await stream.write(line[:len(line) // 2])
        stream.cut()
        return
    await stream.empty_events(plan.knobs.empty_events)
    await stream.event(*result)
    await stream.event(b"[DONE]")


async def _keepalives_or_leave(stream: EventStream, seconds: float, interval: float,
                               state: FakeState) -> None:
    try:
        await stream.keepalives(seconds, interval)
    except ClientGone:
        state.count("client_gone")  # left before any result: nothing produced, nothing billed
        raise


def _bill(state: FakeState, plan: Plan) -> None:
    state.bill(plan.billed_as, plan.request.price_cents, plan.request.n)


# --- plain JSON ------------------------------------------------------------------------------

async def _plain(request: web.Request, plan: Plan, state: FakeState) -> web.StreamResponse:
    if plan.outcome == "stall":
        _bill(state, plan)
        await _wait_until_gone(request, state)
        return web.Response(status=204)  # nobody is listening any more
    await asyncio.sleep(plan.latency)
    if plan.outcome == "error_event":  # without SSE the error comes as a 200 body
        state.count("error_event")
        return _json_bytes(_error_event_body(plan.echoed), _named(request))
    if _gone(request, state):
        state.count("client_gone")
        return web.Response(status=204)
    result = b"".join(_result_json(request, plan, state))
    _bill(state, plan)
    if plan.outcome == "cut":
        return await _cut_plain(request, result)
    return _json_bytes(result, _named(request))


def _named(request: web.Request) -> dict[str, str]:
    return {"x-request-id": request[REQUEST_ID]}


def _json_bytes(body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, headers={"Content-Type": "application/json; charset=utf-8",
                                            **(headers or {})})


async def _cut_plain(request: web.Request, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
    response.content_length = len(body)  # promise it all, send half
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(body[:len(body) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


def _gone(request: web.Request, state: FakeState) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing() or state.closing


async def _wait_until_gone(request: web.Request, state: FakeState) -> None:
    while not _gone(request, state):
        await asyncio.sleep(0.1)


# --- the result body -------------------------------------------------------------------------

def _result_json(request: web.Request, plan: Plan, state: FakeState) -> list[bytes]:
    """The result body as pieces to join once: base64 needs no escaping, so no json.dumps
    (and no copy through a str) of megabytes of media."""
    parts = [b'{"created":%d,"data":[' % int(time.time())]
    for index in range(plan.request.n):
        parts += [b"," if index else b"", *_entry(request, plan, _spec(plan, state, index))]
    parts.append(b"]}")
    return parts


def _spec(plan: Plan, state: FakeState, index: int) -> MediaSpec:
    """Image i of a call with seed s is made with seed s + i; no seed: a random variant."""
    seed = plan.request.seed
    variant = (state.rng.getrandbits(64) if seed is None
               else variant_of(plan.request.prompt, seed + index))
    return MediaSpec(plan.kind, plan.media_bytes, plan.request.width, plan.request.height,
                     variant)


def _entry(request: web.Request, plan: Plan, spec: MediaSpec) -> list[bytes]:
    if plan.request.response_format == "b64_json" and plan.knobs.bad_b64:
        parts = [b'{"b64_json":"iVBORw0KGgo*not*base64*"']  # billed, but cannot be decoded
    elif plan.request.response_format == "b64_json":
        parts = [b'{"b64_json":"', *render(spec).b64_parts(), b'"']
    else:
        parts = [b'{"url":', _dumps(_media_url(request, spec, plan.knobs.redirect)).encode()]
    revised = plan.knobs.revised_prompt
    if plan.echoed is not None:
        revised = _echoing(revised or plan.request.prompt, plan.echoed)
    if revised is not None:
        parts += [b',"revised_prompt":', _dumps(revised).encode()]
    return [*parts, b"}"]


# --- /media/{token} --------------------------------------------------------------------------

def _media_url(request: web.Request, spec: MediaSpec, redirect: str | None) -> str:
    """The token carries everything needed to make the bytes again: nothing is stored."""
    fields = [spec.kind, spec.size, spec.width, spec.height, spec.variant, redirect]
    token = base64.urlsafe_b64encode(_dumps(fields).encode()).rstrip(b"=").decode()
    return f"{request.scheme}://{request.host}/media/{token}.{KINDS[spec.kind][1]}"


def _parse_token(token: str) -> tuple[MediaSpec, str | None] | None:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        kind, size, width, height, variant, redirect = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        return None
    ints = (size, width, height, variant)
    if kind not in KINDS or not all(isinstance(value, int) for value in ints):
        return None
    in_range = 0 <= size <= MAX_MEDIA_BYTES and 0 <= variant < 1 << 64
    if not in_range or not isinstance(redirect, str | None):
        return None
    return MediaSpec(kind, size, width, height, variant), redirect


async def media(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.media_requests += 1
    parsed = _parse_token(request.match_info["token"].split(".", 1)[0])
    if parsed is None:
        raise web.HTTPNotFound(text="unknown media")
    spec, redirect = parsed
    if redirect:
        raise web.HTTPFound(redirect)
    headers = {"Content-Type": KINDS[spec.kind][0]}
    return web.Response(body=render(spec).data(), headers=headers)


# --- models and the test hooks ---------------------------------------------------------------

async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": request.app[STATE].models}, dumps=_dumps)


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].snapshot(), dumps=_dumps)


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True}, dumps=_dumps)


async def requests(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].requests), dumps=_dumps)
