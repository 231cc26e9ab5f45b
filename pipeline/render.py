"""One render, start to end: reserve, call the upstream, store the media, settle.

A render runs as a loop of attempts, a coroutine on the worker's one event loop (the thread
that received its task waits for it). Each attempt is three transactions: `begin_attempt`
(lease + reservation), `record_send` once a call slot is free (the job still running? then
the send is recorded, committed before the call) and `finish_attempt` (settlement, image
rows, render, item and job state), each run by the group committer (groupcommit.py) with
other renders' transactions. Nothing holds a transaction while the call runs.

A render whose job is paused (or not running yet: pending, submitting) goes back to the SQL
queue (`queued`, `enqueued_at` NULL) instead of starting or calling: the dispatcher sends it
again once the job runs. It stays open (the job's `open_renders` does not move) and keeps its
item running.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from pipeline import ledger, queries, reuse
from pipeline.attempts import out_of_attempts, rate_limited_too_long
from pipeline.exhaustion import end_rest_for_budget, mark_if_exhausted
from pipeline.jobs import STORAGE_FAILING, close_item, pause_job, unpause_job
from pipeline.media import MediaInfo, NotMedia, sniff
from pipeline.models import (
    TERMINAL_JOB,
    TERMINAL_RENDER,
    AttemptOutcome,
    JobStatus,
    RenderStatus,
    utcnow,
)
from pipeline.plan import RenderSpec, render_request
from pipeline.runtime import Services
from pipeline.storage import StorageError, media_key
from pipeline.upstream import (
    Delivered,
    MediaRefused,
    Refused,
    Unknown,
    decode_b64,
    rate_limited,
)

log = logging.getLogger("imagebatch.render")

MAX_RETRY_WAIT = 600.0
# Job statuses in which a render neither starts nor calls: it waits in SQL until the job runs.
WAIT_IN_SQL = frozenset({JobStatus.PAUSED, JobStatus.PENDING, JobStatus.SUBMITTING})
HASH_ON_LOOP_MAX = 256 * 1024  # about 0.15 ms of SHA-256
# How long a paid result waits for storage that refuses it (its job paused meanwhile).
STORAGE_PATIENCE = 120.0


class Stop(enum.StrEnum):
    """How a render task ended (what `run_render` returns, a task's result)."""

    FINISHED = "finished"  # the render reached a terminal status, or waits for a retry no more
    MISSING = "missing"  # no such render (its job was deleted)
    TERMINAL = "terminal"  # it had ended already: a redelivered task
    BUSY = "busy"  # another task holds its live lease: a redelivered task
    PAUSED = "paused"  # its job is paused (or not running yet): back in the SQL queue
    CANCELLED = "cancelled"  # its job was cancelled: the render ended cancelled
    SWEPT = "swept"  # its lease ran out while it waited: the sweeper settled it, owns it now
    BUDGET = "budget"  # a hold was refused: the render failed for budget
    ATTEMPTS = "attempts"  # every attempt it may make was made: it failed
    REDELIVERED = "redelivered"  # its task came back too many times: it failed
    JOB = "job"  # its job ended otherwise: it failed
    DATABASE = "database"  # the database refused writes: SQL says what is left


@dataclass(frozen=True)
class NotStarted:
    """Why a render ends without an attempt, and the error it ends with (None: cancelled)."""

    stop: Stop
    error: str | None = None


@dataclass(frozen=True)
class Begun:
    """An attempt that holds its lease and its reservation: it may call the upstream."""

    render_id: int
    job_id: int
    line: int
    custom_id: str | None
    render_index: int
    n: int
    seed: int | None
    attempt_id: int
    number: int
    amount_cents: int
    price_per_image_cents: int
    request: dict[str, Any]
    # Set: the request already succeeded there; its files are copied, nothing is sent.
    source: reuse.Source | None = None


@dataclass(frozen=True)
class EndRest:
    """This render's hold was refused and no other render of its job can fit what is left
    of the budget: the rest of the job is ended in bulk (exhaustion.py), after the commit."""

    job_id: int
    reason: str


@dataclass(frozen=True)
class StoredMedia:
    index: int
    key: str
    info: MediaInfo
    revised_prompt: str | None


@dataclass(frozen=True)
class Settled:
    """What `finish_attempt` leaves to do once its transaction is committed."""

    retry_in: float | None = None  # seconds before the next attempt; None: the render ended
    # Stored objects no image row describes (a stale attempt's, or an earlier attempt's
    # replaced by this one): deleted after the commit.
    unkept: tuple[str, ...] = ()


@dataclass(frozen=True)
class Collected:
    """What became of a delivered result: the files stored and why any others were not."""

    stored: tuple[StoredMedia, ...]
    problems: tuple[str, ...]


def run_render(svc: Services, render_id: int) -> Stop:
    """Do what is left of one render; safe to call again for the same render at any time.
    Blocks the calling thread; the render itself runs on the worker's event loop."""
    return svc.io.run(render_to_end(svc, render_id))


async def render_to_end(svc: Services, render_id: int) -> Stop:
    try:
        return await _attempts_until_done(svc, render_id)
    except OperationalError as exc:
        # The database refused a write before any call was sent, or for longer than the
        # render deadline after one: SQL still says what is left (a reservation with no send
        # recorded is released, a send recorded is charged unknown), and the render is sent
        # again once its lease or message is found lost.
        log.warning("render %d stopped: the database refuses writes (%s)", render_id,
                    str(exc.orig).splitlines()[0] if exc.orig is not None else exc)
        return Stop.DATABASE


async def _attempts_until_done(svc: Services, render_id: int) -> Stop:
    own_attempt: int | None = None
    may_reuse = True  # until a copy fails: then the render calls
    with svc.leases.keep(render_id):
        while True:
            # In a group the holds come last (ledger.Moves); a group rolled back (a refused
            # hold among them) is redone work by work with the holds first, which says why.
            # The database refusing writes for a while (disk full, a restart) is waited out
            # for up to a lease, here and before the call (`_send_or_not`).
            step = await svc.commits.run_durably(
                partial(begin_attempt, svc, render_id, own_attempt, may_reuse=may_reuse),
                svc.settings.lease_seconds)
            if isinstance(step, EndRest):
                await asyncio.to_thread(end_rest_for_budget, svc.sessions, step.job_id,
                                        step.reason)
                return Stop.BUDGET
            if not isinstance(step, Begun):
                return step
            own_attempt = step.number
            if step.source is not None:  # reused: copied and settled at 0, nothing sent
                settled = await copy_reused(svc, step)
                if settled.unkept:
                    await _delete_unkept(svc, settled.unkept)
                if settled.retry_in is None:
                    return Stop.FINISHED
                may_reuse = False
                continue
            outcome = await call_upstream(svc, step)
            if isinstance(outcome, Stop):  # nothing was sent: cancelled, paused or swept
                return outcome
            collected = (await collect_media(svc, step, outcome)
                         if isinstance(outcome, Delivered) else None)
            # A refused write waits for the database (up to the deadline): a settlement
            # given up is a paid result paid again.
            settled = await svc.commits.run_durably(
                partial(finish_attempt, svc, step, outcome, collected),
                svc.settings.render_deadline, paid=True)
            if settled.unkept:
                await _delete_unkept(svc, settled.unkept)
            if settled.retry_in is None:
                return Stop.FINISHED
            await asyncio.sleep(settled.retry_in)


# --- first transaction: lease and reservation ------------------------------------------------


def begin_attempt(svc: Services, render_id: int, own_attempt: int | None, session: Session,
                  *, may_reuse: bool = True) -> Begun | EndRest | Stop:
    """Take the render's lease and reserve its price, or say why there is nothing to do.

    `own_attempt` is the attempt number this task already holds (a retry in the same task);
    a task delivered again while another copy holds a live lease does nothing. A seeded
    request that already succeeded (and `may_reuse`, and the job allows it) reserves nothing:
    the Begun names its source, whose files are copied instead of calling (reuse.py).
    """
    settings = svc.settings
    db = session.connection()
    render = queries.start_facts(db, render_id)
    if render is None:
        return Stop.MISSING
    if render.status in TERMINAL_RENDER:
        return Stop.TERMINAL
    now = utcnow()
    lease_live = render.lease_until is not None and render.lease_until > now
    if render.status == RenderStatus.RUNNING and lease_live and own_attempt != render.attempts:
        return Stop.BUSY
    if render.status == RenderStatus.RUNNING:  # only then can an attempt be left open
        ledger.settle_abandoned_attempt(session, render)
    if render.job_status in WAIT_IN_SQL:
        return _back_to_sql_queue(db, render.id, forgiven=False)  # no delivery counted
    delivered = render.deliveries + (1 if own_attempt is None else 0)
    refused = _cannot_start(render, render.job_status, delivered, settings.max_attempts)
    request = render_request(json.loads(render.body),
                             RenderSpec(render.render_index, render.n, render.seed))
    key = reuse.request_key(request)  # None without a seed: never reused
    source = None
    if refused is None and key is not None and may_reuse and render.job_reuse:
        source = reuse.find_source(db, key, request, render.id)
    if source is not None:
        reservation = ledger.reserve_nothing(session, render, render.team, svc.clock(),
                                             price_per_image_cents=source.price_per_image_cents)
    elif refused is None:
        reservation = ledger.reserve(session, render, render.team, svc.clock(),
                                     team_period=render.team_period, sent=False)
        if reservation is None:
            job = queries.job_money_state(db, render.job_id)
            refused = _no_reservation_reason(render, job)
            if refused.stop == Stop.PAUSED:  # the job was paused since START_FACTS read it
                return _back_to_sql_queue(db, render.id, forgiven=False)
    if refused is not None:
        queries.count_delivery(db, render_id, delivered)
        status = RenderStatus.CANCELLED if refused.stop == Stop.CANCELLED else RenderStatus.FAILED
        end_render(session, render, status, refused.error)
        if refused.stop == Stop.BUDGET:
            rest = mark_if_exhausted(session, render.job_id, render.team)
            if rest is not None:
                return EndRest(render.job_id, rest)
        return refused.stop
    # The lease runs from now, after the holds: they may have queued on the job's hot row,
    # and a lease already spent by then gets a live worker's call swept as lost.
    # Only a render that calls gets the key: lookups find originals, never copies.
    _start_attempt(db, render, delivered, utcnow(), settings.lease_seconds,
                   request_key=None if source is not None else key)
    return Begun(
        render_id=render.id,
        job_id=render.job_id,
        line=render.line,
        custom_id=render.custom_id,
        render_index=render.render_index,
        n=render.n,
        seed=render.seed,
        attempt_id=reservation.attempt_id,
        number=reservation.number,
        amount_cents=reservation.amount_cents,
        price_per_image_cents=render.price_per_image_cents,
        request=request,
        source=source,
    )


def _start_attempt(db: Connection, render: queries.RenderRow, delivered: int, now: datetime,
                   lease_seconds: float, request_key: int | None) -> None:
    queries.start_attempt(db, render.id, render.attempts + 1, delivered=delivered,
                          lease_until=now + timedelta(seconds=lease_seconds),
                          request_key=request_key)


def _locked(db: Connection, render_id: int) -> queries.RenderRow:
    """The render's row and its item's, locked (a render being settled exists)."""
    render = queries.lock_render_and_item(db, render_id)
    if render is None:  # renders are deleted only with their job, never while one runs
        raise LookupError(f"render {render_id} is gone")
    return render


def _back_to_sql_queue(db: Connection, render_id: int, *, forgiven: bool) -> Stop:
    """The render waits in SQL (queued, no broker message) until its job runs again."""
    queries.back_to_sql_queue(db, render_id, forgiven=forgiven)
    return Stop.PAUSED


def _cannot_start(render: queries.RenderRow, job_status: str, delivered: int, max_attempts: int
                  ) -> NotStarted | None:
    if job_status == JobStatus.CANCELLED:
        return NotStarted(Stop.CANCELLED)
    if out_of_attempts(render, max_attempts):
        last = render.error or "no result"
        return NotStarted(Stop.ATTEMPTS,
                          f"attempts: gave up after {max_attempts} attempts ({last})")
    if delivered > 3 * max_attempts + 3:
        return NotStarted(Stop.REDELIVERED,
                          f"redelivered: the task was delivered {delivered} times")
    return None


def _no_reservation_reason(render: queries.RenderRow, job: queries.JobMoneyState
                           ) -> NotStarted:
    if job.status == JobStatus.CANCELLED:
        return NotStarted(Stop.CANCELLED)
    if job.status in WAIT_IN_SQL:
        return NotStarted(Stop.PAUSED)
    if job.status != JobStatus.RUNNING:
        return NotStarted(Stop.JOB, f"job: the job is {job.status}")
    price = render.n * render.price_per_image_cents
    left = job.budget_cents - job.spent_cents - job.reserved_cents
    if left < price:
        return NotStarted(Stop.BUDGET, f"budget: this render costs {price}¢ and the job has "
                                       f"{max(left, 0)}¢ left")
    return NotStarted(Stop.BUDGET, f"budget: this render costs {price}¢ and its team's period "
                                   "budget has too little left")


def end_render(session: Session, render: queries.RenderRow, status: RenderStatus, error: str | None,
               *, claim: ledger.Settlement | None = None, item_locked: bool = False,
               reused_from: int | None = None, request_id: str | None = None) -> None:
    """Move a render (an ORM Render or a renders row) to a terminal status, settle its item,
    apply its last attempt's settlement and maybe close its job.

    The item's row lock (taken here unless the caller has it) comes before the item's status
    is decided: two renders of one item finishing at once are ordered by it, so the later
    sees the earlier committed. The job's hot row comes last: just before the commit, with
    the other moves of a committer's group (`ledger.Moves`)."""
    db = session.connection()
    if not item_locked:
        queries.lock_item(db, render.item_id)
    queries.end_render(db, render.id, status, error, reused_from=reused_from,
                       request_id=request_id)
    final = close_item(session, render.item_id)
    if final is not None:
        ledger.item_ended(session, render.job_id, final)
    if claim is None:
        ledger.render_ended(session, render.job_id)
    else:
        ledger.apply_settlement(session, claim, render_ended=True)


# --- seeded reuse: the files copied, settled at 0 -------------------------------------------


async def copy_reused(svc: Services, begun: Begun) -> Settled:
    """The source's files copied under this render's keys (on a thread: S3 CopyObject or a
    hard link), then `finish_reuse` records them."""
    assert begun.source is not None
    copied = await asyncio.to_thread(
        reuse.copy_files, svc.store, begun.source, job_id=begun.job_id, line=begun.line,
        custom_id=begun.custom_id, render_index=begun.render_index, attempt=begun.number)
    return await svc.commits.run_durably(partial(finish_reuse, svc, begun, copied),
                                         svc.settings.lease_seconds)


def finish_reuse(svc: Services, begun: Begun, copied: reuse.Copied, session: Session
                 ) -> Settled:
    """Copied: the attempt settles `reused` (0 cents), the files are recorded and the render
    succeeds, as if rendered. A copy that failed (the original's files deleted since) releases
    the attempt (0 cents, not counted against the render's attempts) and the render calls
    the upstream at once. Either way the keys no image row describes are deleted after."""
    source = begun.source
    assert source is not None
    db = session.connection()
    render = _locked(db, begun.render_id)
    if copied.problem is not None:
        error = f"reuse: {copied.problem}"
        claim = ledger.claim_settlement(session, begun.attempt_id, AttemptOutcome.RELEASED,
                                        error=error, render=render)
        if claim is None:
            return Settled(unkept=copied.keys)  # the sweeper settled it; it owns the render
        queries.wait_for_retry(db, render.id, error, forgiven=True, lease_until=utcnow()
                               + timedelta(seconds=svc.settings.lease_seconds))
        ledger.apply_settlement(session, claim)
        return Settled(retry_in=0.0, unkept=copied.keys)
    claim = ledger.claim_settlement(session, begun.attempt_id, AttemptOutcome.REUSED,
                                    render=render)
    if claim is None:
        return Settled(unkept=copied.keys)
    replaced = _replace_earlier_files(session, render, begun)
    ledger.files_stored(session, render.job_id, len(copied.keys))
    queries.insert_images(db, [queries.image_row(
        job_id=render.job_id, render_id=render.id, image_index=file.index, key=key,
        content_type=file.content_type, size=file.size, sha256=file.sha256,
        width=file.width, height=file.height, seed=file.seed,
        revised_prompt=file.revised_prompt, cost_cents=0)
        for file, key in zip(source.files, copied.keys, strict=True)])
    end_render(session, render, RenderStatus.SUCCEEDED, None, claim=claim, item_locked=True,
               reused_from=source.render_id)
    return Settled(unkept=replaced)


def _replace_earlier_files(session: Session, render: queries.RenderRow, begun: Begun
                           ) -> tuple[str, ...]:
    """An earlier attempt of this render (before `retry JOB`) may have stored some files:
    their rows go (the keys are returned, to delete), as this attempt's replace them."""
    if begun.number == 1:
        return ()
    replaced = tuple(queries.delete_images(session.connection(), render.id))
    if replaced:
        ledger.files_stored(session, render.job_id, -len(replaced))
    return replaced


# --- the call and the media, outside any transaction ----------------------------------------


async def call_upstream(svc: Services, begun: Begun) -> Delivered | Refused | Unknown | Stop:
    """The call, once one of the worker's call slots is free (the render has its reservation
    by then, so the slot goes straight to the upstream) and its send is recorded. A Stop
    when nothing was sent: CANCELLED or PAUSED (the job was, while the render waited;
    its reservation is released), or SWEPT (its lease ran out meanwhile: the sweeper
    settled the attempt and owns the render)."""
    async with svc.call_slots:
        return await _call_in_slot(svc, begun)


async def _send_or_not(svc: Services, begun: Begun) -> Stop | None:
    """`record_send`, committed with other renders' writes: None to go on and call."""
    return await svc.commits.run_durably(partial(record_send, begun),
                                         svc.settings.lease_seconds)


def record_send(begun: Begun, session: Session) -> Stop | None:
    """Just before the call: if the job still runs, record the send (committed before the
    call is made: an attempt whose worker dies with no send recorded is released, not
    charged unknown) and return None. Otherwise nothing is sent and the reservation is
    released: a cancelled job's render ends cancelled; a paused job's render goes back to
    the SQL queue, the attempt and its delivery not counted against it (BACK_TO_SQL_QUEUE).
    Every render reads its job's state here once, in the statement that records the send."""
    db = session.connection()
    if queries.record_send(db, begun.attempt_id, begun.job_id, utcnow()):
        return None
    render = _locked(db, begun.render_id)
    status = queries.job_money_state(db, begun.job_id).status
    cancelled = status == JobStatus.CANCELLED
    # A job running again by now (resumed between the two reads) is treated as paused: the
    # render waits in SQL and is sent again, which is always safe.
    why = "cancelled" if cancelled else (
        "paused" if status == JobStatus.RUNNING else str(status))
    claim = ledger.claim_settlement(session, begun.attempt_id, AttemptOutcome.RELEASED,
                                    error=f"the job was {why} before the call was sent",
                                    render=render)
    if claim is None:
        return Stop.SWEPT  # the sweeper settled the attempt first and owns the render
    if cancelled:
        end_render(session, render, RenderStatus.CANCELLED, None, claim=claim,
                   item_locked=True)
        return Stop.CANCELLED
    ledger.apply_settlement(session, claim)  # the render is still open: no render_ended
    return _back_to_sql_queue(db, render.id, forgiven=True)


async def _call_in_slot(svc: Services, begun: Begun) -> Delivered | Refused | Unknown | Stop:
    limiter = svc.limiter
    if limiter is None:
        stop = await _send_or_not(svc, begun)
        return stop if stop is not None else await _generate(svc, begun)
    model = str(begun.request.get("model", ""))
    try:
        slot = await _enter_slot(limiter, model, svc.settings.render_deadline)
    except Exception as exc:
        # The shared limits (Redis) stayed away: nothing was sent, so this is a definite
        # refusal (released), not an unknown outcome charged by the sweeper later.
        return Refused(f"the shared limits are unavailable: {exc.__class__.__name__}", None,
                       retryable=True)
    try:
        # Recorded once the shared limits let the call go (a rate or a 429 pause may have
        # held it): a worker lost while it waited there sent nothing either.
        stop = await _send_or_not(svc, begun)
        if stop is not None:
            return stop
        # The worker's window for the model adapts: shrinks on a 429, grows on results.
        outcome = await _generate(svc, begun, on_accepted=slot.accepted)
        slot.answered("served" if isinstance(outcome, Delivered) else
                      "rate_limited" if rate_limited(outcome) else "other")
    finally:
        try:
            await slot.__aexit__(None, None, None)
        except Exception as exc:  # the outcome is known; a lost slot expires on its own
            log.warning("releasing a limiter slot failed: %s", exc.__class__.__name__)
    if rate_limited(outcome):
        try:
            await limiter.slow_down(model, outcome.retry_after)
        except Exception as exc:
            log.warning("sharing a 429 pause failed: %s", exc.__class__.__name__)
    return outcome


async def _generate(svc: Services, begun: Begun, on_accepted: Callable[[], None] | None = None
                    ) -> Delivered | Refused | Unknown:
    svc.calls_in_flight += 1  # on the loop's one thread: no lock needed
    try:
        return await svc.upstream.generate(begun.request, on_accepted=on_accepted)
    finally:
        svc.calls_in_flight -= 1


async def _enter_slot(limiter: Any, model: str, patience: float) -> Any:
    """Enter the limiter's slot for `model`, waiting out a limiter that is briefly away (Redis
    restarting) for up to `patience` seconds; the render's lease is renewed meanwhile."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + patience
    delay = 0.1
    while True:
        slot = limiter.slot(model)
        try:
            await slot.__aenter__()
            return slot
        except Exception as exc:
            if loop.time() + delay > give_up_at:
                raise
            log.warning("the shared limits are unavailable (%s); waiting %.1fs",
                        exc.__class__.__name__, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def collect_media(svc: Services, begun: Begun, delivered: Delivered) -> Collected:
    """Fetch or decode every result, check it is media, and store it under its fixed key."""
    async with svc.media_slots:
        payloads = await _fetch_all(svc, delivered.data)
        stored: list[StoredMedia] = []
        problems = [delivered.refused] if delivered.refused else []
        for index, (entry, payload) in enumerate(zip(delivered.data, payloads, strict=True)):
            if isinstance(payload, str):
                problems.append(f"result {index}: {payload}")
                continue
            try:
                stored.append(await _store_one(svc, begun, index, entry, payload))
            except NotMedia as exc:
                problems.append(f"result {index} is not media: {exc}")
            except StorageError as exc:
                problems.append(f"result {index} could not be stored: {exc}")
    if len(delivered.data) < begun.n and not delivered.refused:
        problems.append(f"the upstream returned {len(delivered.data)} of {begun.n} results")
    return Collected(tuple(stored), tuple(problems))


async def _fetch_all(svc: Services, data: list[dict[str, Any]]) -> list[bytes | str]:
    return list(await asyncio.gather(*(_fetch_one(svc, entry) for entry in data)))


async def _fetch_one(svc: Services, entry: Any) -> bytes | str:
    try:
        if isinstance(entry, dict) and isinstance(entry.get("b64_json"), str):
            return decode_b64(entry["b64_json"], svc.settings.max_media_bytes)
        if isinstance(entry, dict) and isinstance(entry.get("url"), str):
            return await svc.upstream.fetch_media(entry["url"])
    except MediaRefused as exc:
        return str(exc)
    return "neither url nor b64_json in the result"


async def _store_one(svc: Services, begun: Begun, index: int, entry: dict[str, Any],
                     data: bytes) -> StoredMedia:
    # Hashing megabytes takes milliseconds without the GIL: on a thread, the loop goes on.
    info = (sniff(data) if len(data) <= HASH_ON_LOOP_MAX
            else await asyncio.to_thread(sniff, data))
    key = media_key(begun.job_id, begun.line, begun.custom_id, begun.render_index, index,
                    info.extension, attempt=begun.number)
    await _put_with_retries(svc, begun, key, data, info.content_type)
    revised = entry.get("revised_prompt")
    return StoredMedia(index, key, info, revised if isinstance(revised, str) else None)


async def _put_with_retries(svc: Services, begun: Begun, key: str, data: bytes,
                            content_type: str) -> None:
    """Storage that refuses must not lose a result we have paid for, nor have us pay for more
    that cannot be kept: the job is paused at the first refusal (nothing new is sent; the
    reason is the job's error) while this result keeps trying (backing off) for up to
    STORAGE_PATIENCE. Stored at last, the job runs again if the pause was storage's."""
    give_up_at = time.monotonic() + min(svc.settings.render_deadline, STORAGE_PATIENCE)
    attempt = 0
    while True:
        try:
            await svc.store.put_async(key, data, content_type)
        except StorageError as exc:
            attempt += 1
            if attempt == 1:
                await _quietly(svc, partial(pause_job, job_id=begun.job_id,
                                            reason=f"{STORAGE_FAILING}{exc}"))
            delay = backoff_delay(attempt, None, svc.settings.backoff_base, 30.0)
            if time.monotonic() + delay > give_up_at:
                raise
            log.warning("storing %s failed (try %d); retrying in %.1fs", key, attempt, delay)
            await asyncio.sleep(delay)
            continue
        if attempt:
            await _quietly(svc, partial(unpause_job, job_id=begun.job_id,
                                        cause=STORAGE_FAILING))
        return


async def _quietly(svc: Services, work: Any) -> None:
    """A job's pause or unpause: the result in hand matters more than either."""
    try:
        await svc.commits.run(work)
    except Exception as exc:
        log.warning("changing the job's state failed: %s", exc.__class__.__name__)


async def _delete_unkept(svc: Services, keys: tuple[str, ...]) -> None:
    def delete_all() -> None:
        for key in keys:
            try:
                svc.store.delete(key)
            except StorageError as exc:  # an object left over costs space, not money
                log.warning("deleting %s, which no image row describes, failed: %s", key, exc)

    await asyncio.to_thread(delete_all)


# --- second transaction: settle and record --------------------------------------------------


def finish_attempt(
    svc: Services,
    begun: Begun,
    outcome: Delivered | Refused | Unknown,
    collected: Collected | None,
    session: Session,
) -> Settled:
    """Settle the attempt and move the render on: when to try again, and what to delete."""
    render = _locked(session.connection(), begun.render_id)
    if isinstance(outcome, Delivered):
        assert collected is not None
        return Settled(unkept=_record_delivery(session, render, begun, collected,
                                               outcome.request_id))
    settled_as = (
        AttemptOutcome.RELEASED if isinstance(outcome, Refused) else AttemptOutcome.UNKNOWN
    )
    status = outcome.status if isinstance(outcome, Refused) else None
    claim = ledger.claim_settlement(session, begun.attempt_id, settled_as,
                                    http_status=status, error=outcome.message, render=render)
    if claim is None:
        return Settled()  # the sweeper settled it first; it owns the render now
    error = _describe(outcome)
    not_now = rate_limited(outcome)  # a 429 uses no attempt, unless 429s go on too long
    gave_up = (rate_limited_too_long(session.connection(), render.id,
                                     svc.settings.max_rate_limited) if not_now else None)
    if gave_up or not _should_retry(session, render, outcome, svc.settings.max_attempts,
                                    forgiven=not_now):
        end_render(session, render, RenderStatus.FAILED,
                   f"{error} ({gave_up})" if gave_up else error, claim=claim, item_locked=True)
        return Settled()
    retry_after = outcome.retry_after if isinstance(outcome, Refused) else None
    delay = backoff_delay(render.attempts, retry_after, svc.settings.backoff_base,
                          svc.settings.backoff_cap)
    now = utcnow()
    queries.wait_for_retry(session.connection(), render.id, error, forgiven=not_now,
                           lease_until=now + timedelta(seconds=svc.settings.lease_seconds))
    ledger.apply_settlement(session, claim)
    return Settled(retry_in=delay)


def _record_delivery(session: Session, render: queries.RenderRow, begun: Begun,
                     collected: Collected, request_id: str | None) -> tuple[str, ...]:
    """Charge the attempt and record its files; returns the keys of stored objects that no
    image row describes (to delete)."""
    # Charged even if we reject what came back: the provider did the work.
    claim = ledger.claim_settlement(session, begun.attempt_id, AttemptOutcome.CHARGED,
                                    render=render)
    if claim is None:
        # Stale: the attempt's lease ran out (its worker froze) and the sweeper settled it;
        # the render may have been done again since. Its files were stored under keys of
        # its own and are not recorded: the rows describe the attempt that settled.
        return tuple(m.key for m in collected.stored)
    replaced = _replace_earlier_files(session, render, begun)
    if collected.stored:
        ledger.files_stored(session, render.job_id, len(collected.stored))
        queries.insert_images(session.connection(),
                              [_image_row(render, begun, m) for m in collected.stored])
    error = "; ".join(collected.problems) or None
    end_render(session, render, RenderStatus.FAILED if error else RenderStatus.SUCCEEDED, error,
               claim=claim, item_locked=True, request_id=request_id)
    return replaced


def _image_row(render: queries.RenderRow, begun: Begun, media: StoredMedia) -> dict[str, Any]:
    info = media.info
    return queries.image_row(
        job_id=render.job_id, render_id=render.id, image_index=media.index, key=media.key,
        content_type=info.content_type, size=info.size, sha256=info.sha256,
        width=info.width, height=info.height,
        # Upstreams make image i of a call seeded s with s + i (see plan.split_into_renders).
        seed=None if begun.seed is None else begun.seed + media.index,
        revised_prompt=media.revised_prompt, cost_cents=begun.price_per_image_cents)


def _should_retry(session: Session, render: queries.RenderRow, outcome: Refused | Unknown,
                  max_attempts: int, *, forgiven: bool = False) -> bool:
    if isinstance(outcome, Refused) and not outcome.retryable:
        return False
    if out_of_attempts(render, max_attempts, forgiven=forgiven):
        return False
    # A paused job's render retries too: its next begin_attempt puts it back in the SQL
    # queue, so the pause costs it nothing.
    job = queries.job_money_state(session.connection(), render.job_id)
    return job.status not in TERMINAL_JOB


def _describe(outcome: Refused | Unknown) -> str:
    if isinstance(outcome, Refused):
        code = f"HTTP {outcome.status}: " if outcome.status else ""
        return f"upstream refused: {code}{outcome.message}"
    return f"outcome unknown: {outcome.message}"


def backoff_delay(attempt: int, retry_after: float | None, base: float, cap: float,
                  rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter, never shorter than the upstream's
    Retry-After (itself capped, so one bad header cannot park a render for hours)."""
    rng = rng or random.Random()
    # The exponent is bounded: a render's attempts count its 429s too (up to
    # IMAGEBATCH_MAX_RATE_LIMITED, 10,000), and 2 ** 1024 is beyond any float.
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_WAIT))
    return delay
