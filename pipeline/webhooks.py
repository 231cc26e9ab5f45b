"""Webhooks: a job's end and its spend crossings POSTed to the job's notify URL.

What is told (the `event` field of the JSON body, also in the `X-Imagebatch-Event` header):
- `job.succeeded`, `job.partial`, `job.failed`, `job.cancelled`: the job ended so; the body
  is what `imagebatch status JOB --json` prints, plus `event`.
- `spend.50`, `spend.80`, `spend.100`: what the job has spent (`scope: "job"`, against its
  cap) or what its team has spent this period (`scope: "team"`, against the team's budget)
  reached 50, 80 or 100 % of it. Each crossing is told once: a job's once per job, a team
  period's once per period, to the URL of the job whose render crossed it.

Each POST carries `X-Imagebatch-Signature: sha256=HEX`, the HMAC-SHA256 of the exact body
bytes under IMAGEBATCH_WEBHOOK_SECRET, and `X-Imagebatch-Delivery`, an id that stays the same
across retries (a receiver drops repeats by it).

A delivery is a row of `deliveries`, written in the transaction that ends the job or moves
the spend (`tell_job_ended`, `_spend_moved`), so it outlives the process that did. The
notifier of `worker`, `beat` and `run` (`deliver_due`, on a thread of its own with a client
of its own: never on a render's path) sends what is due, one POST each with a short timeout,
and retries errors and non-2xx answers on `RETRY_DELAYS`, then gives up, keeping the reason
(`status JOB` shows it). Notify URLs obey the media downloads' address rules
(`pipeline.upstream`): http(s) only, no credentials in them, no link-local or cloud metadata
address ever, no private or loopback address unless IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS, each
address checked again at connect time; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import httpx
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline import ledger
from pipeline.httpclient import (
    TRANSPORT_ERRORS,
    Client,
    causes,
    client,
    connector,
    over_aiohttp,
)
from pipeline.models import Delivery, Job, TeamBudget, utcnow
from pipeline.settings import Settings
from pipeline.upstream import (  # the media downloads' address rules, reused as they are
    _GuardedResolver,
    _parse_url,
    _RefusedAddress,
    _resolve,
    address_problem,
    safe_url,
)

log = logging.getLogger("imagebatch.webhooks")

THRESHOLDS = (50, 80, 100)
SECRET_VARIABLE = "IMAGEBATCH_WEBHOOK_SECRET"
# Seconds to wait before retry k (after failed attempt k): the first within 30 s (a
# receiver restarting), then backing off over hours (one that is down for the night); a
# delivery is given up after the last, 1 + len(RETRY_DELAYS) attempts in all (~21 h).
RETRY_DELAYS: tuple[float, ...] = (10, 60, 300, 1_800, 7_200, 21_600, 43_200)
# One POST: a receiver that takes longer is retried (it should queue and answer at once).
TIMEOUT = 10.0
# A sender takes a due delivery for this long (past its timeout), so two senders never post
# it at once; one that died mid-POST leaves it to be taken again after that.
CLAIM_SECONDS = 30.0
MAX_URL = 2000
# Deliveries a sender takes a round, and POSTs in flight.
ROUND = 32
PENDING, SENT, FAILED = "pending", "sent", "failed"


# --- pure rules ----------------------------------------------------------------------------


def crossings(before_cents: int, after_cents: int, limit_cents: int | None) -> list[int]:
    """The thresholds (percent of `limit_cents`) that spend moving from `before_cents` to
    `after_cents` reached: `before < pct % of limit <= after`, in whole cents (no float).
    None for no limit or a limit of 0 (no percent of nothing)."""
    if not limit_cents or limit_cents <= 0 or after_cents <= before_cents:
        return []
    return [pct for pct in THRESHOLDS
            if before_cents * 100 < pct * limit_cents <= after_cents * 100]


def retry_delay(attempts: int, delays: Sequence[float] = RETRY_DELAYS) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones; None: give up."""
    if attempts < 1:
        return 0.0
    return delays[attempts - 1] if attempts <= len(delays) else None


def signature(secret: str, body: bytes) -> str:
    """The `X-Imagebatch-Signature` value: `sha256=` and the HMAC-SHA256 of `body`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a notify URL as written (form only; its addresses are checked
    by `address_refusal` and again at connect time), or None."""
    if len(url) > MAX_URL:
        return f"longer than {MAX_URL} characters"
    try:
        parsed = _parse_url(url)
        host = parsed.host
    except (ValueError, TypeError):
        return "not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "not an http(s) URL"
    if not host:
        return "no host"
    if parsed.user is not None or parsed.password is not None:
        # It would be stored in SQL: a secret must not be. The signature authenticates.
        return ("holds credentials (user:password@): they would be stored in SQL; the "
                f"receiver checks X-Imagebatch-Signature ({SECRET_VARIABLE}) instead")
    return None


async def address_refusal(url: str, *, private_ok: bool) -> str | None:
    """Why the URL's host must not be POSTed to (the media downloads' rules), or None."""
    parsed = _parse_url(url)
    host = parsed.host or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await _resolve(host, port)
    for address in addresses:
        problem = address_problem(address, private_ok=private_ok)
        if problem:
            allow = ("; IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS=1 allows it"
                     if problem.startswith("a private") else "")
            return f"{host} resolves to {problem} ({address}){allow}"
    return None


def check_notify_url(url: str, settings: Settings) -> str:
    """A notify URL a command was given, checked before anything is written: its form, its
    addresses (a name that does not resolve is refused too: a typo would be found only
    hours of retries later) and that the secret is set. Raises ValueError naming --notify."""
    if not settings.webhook_secret:
        raise ValueError(f"--notify needs {SECRET_VARIABLE} set (the key its POSTs are signed "
                         "with, so the receiver can tell them from forgeries); nothing was "
                         "submitted")
    problem = url_problem(url)
    if problem is None:
        try:
            problem = asyncio.run(address_refusal(url, private_ok=settings.allow_private_webhooks))
        except (OSError, UnicodeError):
            problem = f"cannot resolve {_parse_url(url).host}"
    if problem is not None:
        raise ValueError(f"--notify {safe_url(url)}: {problem}")
    return url


# --- writing deliveries (inside the transaction that ends the job or moves spend) ----------


def tell_job_ended(session: Session, job_id: int, status: str,
                   document: Callable[[], dict[str, Any]]) -> None:
    """The job ended with `status`: a delivery of `document()` (what `status JOB --json`
    shows) to its notify URL, if it has one, in the caller's transaction."""
    url = session.execute(select(Job.notify_url).where(Job.id == job_id)).scalar()
    if not url:
        return
    event = f"job.{status}"
    _insert(session.connection(), job_id=job_id, event=event, url=url,
            body={"event": event, **document()})


def _spend_moved(session: Session, moved: ledger.SpendMoved) -> None:
    """A job's or a team period's spend went up: a delivery per threshold it crossed. No
    statement at all unless one was crossed (this runs with every settlement)."""
    reached = crossings(moved.before_cents, moved.after_cents, moved.limit_cents)
    if not reached:
        return
    db = session.connection()
    # The first of the jobs that moved it with a notify URL (a team's crossing: one told).
    target = db.execute(select(Job.id, Job.notify_url, Job.team).where(
        Job.id.in_(moved.jobs), Job.notify_url.is_not(None), Job.notify_url != "",
    ).order_by(Job.id).limit(1)).first()
    if target is None:
        return
    job_id, url, team = target
    body: dict[str, Any] = {"id": job_id, "team": team, "spent_cents": moved.after_cents,
                            "limit_cents": moved.limit_cents}
    if moved.team_budget_id is None:
        scope, once = "job", f"job:{job_id}"
    else:
        scope, once = "team", f"team:{moved.team_budget_id}"
        start = db.execute(select(TeamBudget.period_start).where(
            TeamBudget.id == moved.team_budget_id)).scalar()
        body["period_start"] = None if start is None else start.isoformat() + "Z"
    for pct in reached:
        event = f"spend.{pct}"
        _insert(db, job_id=job_id, event=event, url=url, once_key=f"{once}:{event}",
                body={"event": event, "scope": scope, "percent": pct, **body})


ledger.when_spent(_spend_moved)


def _insert(db: Connection, *, job_id: int, event: str, url: str, body: dict[str, Any],
            once_key: str | None = None) -> None:
    now = utcnow()
    row = {"delivery_id": str(uuid.uuid4()), "job_id": job_id, "event": event,
           "once_key": once_key, "url": url, "status": PENDING, "attempts": 0,
           "next_at": now, "created_at": now,
           "body": json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)}
    if once_key is None:
        db.execute(insert(Delivery), row)
        return
    if db.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    # Told once: a crossing told already (a cap raised and crossed again, two renders racing)
    # is not told again.
    db.execute(upsert(Delivery).values(**row).on_conflict_do_nothing(
        index_elements=["once_key"]))


# --- reading -------------------------------------------------------------------------------


def job_deliveries(session: Session, job_id: int) -> list[dict[str, Any]]:
    """The job's deliveries as `status JOB` shows them (no URL: it may hold a token)."""
    rows = session.execute(select(
        Delivery.delivery_id, Delivery.event, Delivery.status, Delivery.attempts,
        Delivery.last_error, Delivery.next_at, Delivery.sent_at,
    ).where(Delivery.job_id == job_id).order_by(Delivery.id)).all()
    return [{"delivery": r.delivery_id, "event": r.event, "status": r.status,
             "attempts": r.attempts, "last_error": r.last_error,
             "next_at": _iso(r.next_at) if r.status == PENDING else None,
             "sent_at": _iso(r.sent_at)} for r in rows]


def delivery_lines(deliveries: list[dict[str, Any]]) -> list[str]:
    """One line a delivery, for `status JOB`."""
    lines = []
    for d in deliveries:
        tries = f"{d['attempts']} attempt{'s' if d['attempts'] != 1 else ''}"
        if d["status"] == SENT:
            lines.append(f"webhook {d['event']}: sent ({tries})")
        elif d["status"] == FAILED:
            lines.append(f"webhook {d['event']}: given up ({tries}): {d['last_error']}")
        else:
            why = f"; last: {d['last_error']}" if d["last_error"] else ""
            lines.append(f"webhook {d['event']}: pending, next try {d['next_at']} ({tries}{why})")
    return lines


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


# --- sending -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Due:
    id: int
    delivery_id: str
    job_id: int
    event: str
    url: str
    body: str
    attempt: int  # the number of this attempt (1 for the first)


@dataclass(frozen=True)
class _Result:
    error: str | None = None  # None: delivered (a 2xx)
    final: bool = False  # no retry: the URL itself is refused


_said_no_secret = False


def deliver_due(sessions: sessionmaker[Session], settings: Settings, *,
                only_job: int | None = None, now: datetime | None = None,
                limit: int = ROUND) -> int:
    """Send the deliveries due by `now` (one POST each, at once), `only_job`'s alone when
    given; record each outcome. Returns how many were sent or tried. Safe from any number of
    processes at once: each delivery is taken by one (a conditional UPDATE) for a while."""
    global _said_no_secret
    now = now or utcnow()
    due = _due(sessions, now, only_job, limit)
    if not due:
        return 0
    if not settings.webhook_secret:
        # Never unsigned: a receiver that checks would drop them, one that does not could be
        # fooled by anyone. They wait in SQL for a process that has the secret.
        if not _said_no_secret:
            log.warning("webhook deliveries are waiting: %s is not set in this process, so "
                        "it sends none (they stay queued for one that has it)", SECRET_VARIABLE)
            _said_no_secret = True
        return 0
    taken = [d for d in due if _claim(sessions, d, now)]
    if not taken:
        return 0
    results = asyncio.run(_send_all(taken, settings.webhook_secret,
                                    private_ok=settings.allow_private_webhooks))
    for delivery, result in zip(taken, results, strict=True):
        _record(sessions, delivery, result, now)
    return len(taken)


def _due(sessions: sessionmaker[Session], now: datetime, only_job: int | None,
         limit: int) -> list[_Due]:
    query = (select(Delivery.id, Delivery.delivery_id, Delivery.job_id, Delivery.event,
                    Delivery.url, Delivery.body, Delivery.attempts)
             .where(Delivery.status == PENDING, Delivery.next_at <= now)
             .order_by(Delivery.next_at, Delivery.id).limit(limit))
    if only_job is not None:
        query = query.where(Delivery.job_id == only_job)
    with sessions() as session:
        return [_Due(r.id, r.delivery_id, r.job_id, r.event, r.url, r.body, r.attempts + 1)
                for r in session.execute(query)]


def _claim(sessions: sessionmaker[Session], delivery: _Due, now: datetime) -> bool:
    """Take the delivery for CLAIM_SECONDS (a sender elsewhere that read it too finds it
    taken) and count the attempt before it is made (a sender killed mid-POST used one)."""
    from pipeline.db import transaction

    with transaction(sessions) as session:
        return session.execute(
            update(Delivery).where(Delivery.id == delivery.id, Delivery.status == PENDING,
                                   Delivery.attempts == delivery.attempt - 1,
                                   Delivery.next_at <= now)
            .values(attempts=delivery.attempt,
                    next_at=now + timedelta(seconds=CLAIM_SECONDS))
        ).rowcount == 1


def _record(sessions: sessionmaker[Session], delivery: _Due, result: _Result,
            now: datetime) -> None:
    from pipeline.db import transaction

    where = (Delivery.id == delivery.id, Delivery.status == PENDING,
             Delivery.attempts == delivery.attempt)
    if result.error is None:
        values: dict[str, Any] = {"status": SENT, "sent_at": utcnow(), "next_at": None}
        log.info("webhook %s of job %d delivered to %s", delivery.event, delivery.job_id,
                 safe_url(delivery.url))
    else:
        delay = None if result.final else retry_delay(delivery.attempt)
        if delay is None:
            error = (result.error if result.final else
                     f"gave up after {delivery.attempt} attempts: {result.error}")
            values = {"status": FAILED, "next_at": None, "last_error": error}
        else:
            values = {"next_at": now + timedelta(seconds=delay), "last_error": result.error}
        log.warning("webhook %s of job %d to %s: %s%s", delivery.event, delivery.job_id,
                    safe_url(delivery.url), result.error,
                    "" if delay is None else f" (retried in {delay:g} s)")
    with transaction(sessions) as session:
        session.execute(update(Delivery).where(*where).values(**values))


async def _send_all(deliveries: list[_Due], secret: str, *, private_ok: bool
                    ) -> list[_Result]:
    """One POST each, concurrently, through the project's client (httpx over aiohttp),
    whose resolver refuses forbidden addresses again at connect time (DNS rebinding)."""
    resolver = _GuardedResolver(lambda address: address_problem(address, private_ok=private_ok))
    session = aiohttp.ClientSession(connector=connector(ROUND, resolver=resolver),
                                    auto_decompress=False)
    timeout = httpx.Timeout(TIMEOUT)
    results: dict[int, _Result] = {}

    async def in_order(of_job: list[_Due]) -> None:
        # A job's deliveries one after another, in the order they were written (its spend
        # crossings before its end); different jobs' at once.
        for delivery in of_job:
            results[delivery.id] = await _post(http, delivery, secret, private_ok)

    by_job: dict[int, list[_Due]] = {}
    for delivery in deliveries:
        by_job.setdefault(delivery.job_id, []).append(delivery)
    async with client(over_aiohttp(session, ROUND), connections=ROUND,
                      timeout=timeout) as http:
        await asyncio.gather(*(in_order(of_job) for of_job in by_job.values()))
    return [results[d.id] for d in deliveries]


async def _post(http: Client, delivery: _Due, secret: str, private_ok: bool
                ) -> _Result:
    problem = url_problem(delivery.url)
    if problem is not None:
        return _Result(f"refused: the notify URL: {problem}", final=True)
    host = _parse_url(delivery.url).host
    try:
        refusal = await address_refusal(delivery.url, private_ok=private_ok)
    except (OSError, UnicodeError):
        return _Result(f"cannot resolve {host}")
    if refusal is not None:
        return _Result(f"refused: {refusal}", final=True)
    body = delivery.body.encode("utf-8")
    request = httpx.Request("POST", httpx.URL(delivery.url), content=body, headers={
        "Content-Type": "application/json",
        "User-Agent": "imagebatch-webhook",
        "X-Imagebatch-Event": delivery.event,
        "X-Imagebatch-Delivery": delivery.delivery_id,
        "X-Imagebatch-Signature": signature(secret, body),
    })
    try:
        async with asyncio.timeout(TIMEOUT):
            # The status is all we read: the answer's body is never read (whatever its size).
            async with http.sending(request) as response:
                status = response.status_code
    except TimeoutError:
        return _Result(f"{host} did not answer within {TIMEOUT:g} s")
    except (*TRANSPORT_ERRORS, ValueError) as exc:
        return _Result(f"{host}: {_why(exc)}")
    if 200 <= status < 300:
        return _Result()
    moved = " (redirects are not followed)" if 300 <= status < 400 else ""
    return _Result(f"{host} answered HTTP {status}{moved}")


def _why(exc: BaseException) -> str:
    """A few words on a failed POST, never the exception's text (it can hold the URL)."""
    for cause in causes(exc):
        if isinstance(cause, _RefusedAddress):
            return "the host resolved only to refused addresses at connect time"
        if isinstance(cause, aiohttp.ClientConnectorDNSError | socket.gaierror):
            return "the host name did not resolve"
        if isinstance(cause, aiohttp.ClientConnectorError):
            return f"cannot connect ({cause.os_error.strerror or 'refused'})"
        if isinstance(cause, aiohttp.ServerDisconnectedError):
            return "the server closed the connection"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
    return type(exc).__name__
