"""Group commit: the renders' short transactions, run one after another by a committer
thread and committed together.

Hundreds of renders each committing two short transactions from threads of their own queued
on the database's write lock (SQLite has one writer; on PostgreSQL, every render's hot row is
its job's). The thread holding it had to win the GIL back after every statement, so the lock
was held for several times the work done under it (bench/README.md). Here the renders, which
are coroutines on the worker's event loop, hand their work to a committer thread instead:
it runs whatever has queued up meanwhile in one transaction, one COMMIT for the lot, and each
caller gets its result only once that COMMIT succeeded. One committer is the default on
both databases: SQLite has one writer, and on PostgreSQL more committers overlap their round
trips but split the work into smaller groups, which cost more CPU than the overlap saves.

A work must be a transaction's worth of database reads and writes and nothing else: it may
run twice. If any work of a group raises (or the COMMIT fails), the whole group is rolled
back and every caller runs its own work again alone, in its own transaction, exactly as it
would have without this; so one work's error stays its own.

Writes to rows every work touches (a job's counters) gather in one object per group
(`at_group_end`) and are made once, after the group's last work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Generic, Protocol, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import retry_on_disconnect, transaction

log = logging.getLogger("imagebatch.groupcommit")
T = TypeVar("T")

# More work per COMMIT saves little once the COMMIT is shared by dozens, and a big group
# keeps its callers (and the database's locks) waiting for the slowest of them.
MAX_GROUP = 64
_GROUP_END = "imagebatch_group_end"
E = TypeVar("E", bound="GroupEnd")


class GroupEnd(Protocol):
    """What the works of a group gather for its end (see `at_group_end`)."""

    def apply(self, session: Session) -> None: ...


class _Queued(Generic[T]):
    __slots__ = ("future", "result", "work")

    def __init__(self, work: Callable[[Session], T], future: asyncio.Future[bool]) -> None:
        self.work = work
        self.future = future  # True: committed with its group; False: run it alone
        self.result: T | None = None


class GroupCommit:
    """Committer threads taking groups from one queue; `run` returns once the caller's work
    is committed."""

    def __init__(self, sessions: sessionmaker[Session], *, committers: int = 1,
                 max_group: int = MAX_GROUP) -> None:
        self._sessions = sessions
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Queued[object] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"imagebatch-commit-{i}", daemon=True)
            for i in range(committers)
        ]
        for thread in self._threads:
            thread.start()
        # The database refusing writes (disk full, restarting), as `run` reports it: since
        # when (monotonic), why, and how many paid results wait to be recorded meanwhile.
        self.failing_since: float | None = None
        self.failure = ""
        self.waiting = 0
        self.lost = 0  # paid results given up after `patience`: charged unknown later

    async def run_durably(self, work: Callable[[Session], T], patience: float, *,
                          paid: bool = False) -> T:
        """`run`, tried again (backing off) while the database refuses writes, for up to
        `patience` seconds: for what must reach SQL, a paid result's settlement (`paid`)
        above all (given up, the sweeper charges it unknown and the render is paid again)."""
        give_up_at = time.monotonic() + patience
        delay = 0.5
        waiting = False
        try:
            while True:
                try:
                    result = await self.run(work)
                except OperationalError as exc:
                    if time.monotonic() + delay > give_up_at:
                        if paid:
                            self.lost += 1
                            log.error("a paid result could not be recorded (%s): its attempt "
                                      "is charged unknown once the database takes writes, "
                                      "and its render is sent again", _reason(exc))
                        raise
                    if paid and not waiting:
                        waiting = True
                        self.waiting += 1
                        log.error("the database refuses writes (%s); a paid result waits "
                                  "to be recorded", _reason(exc))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                return result
        finally:
            if waiting:
                self.waiting -= 1

    async def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` committed: in a group if it can be, else alone (see the module).
        The caller's event loop goes on meanwhile; the work runs on a committer thread."""
        loop = asyncio.get_running_loop()
        queued: _Queued[T] = _Queued(work, loop.create_future())
        self._queue.put(queued)  # type: ignore[arg-type]
        if await queued.future:
            self.failing_since = None
            return queued.result  # type: ignore[return-value]
        again = partial(retry_on_disconnect, partial(_run_alone, self._sessions, work))
        try:
            result = await loop.run_in_executor(None, again)
        except OperationalError as exc:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.failure = _reason(exc)
            raise
        self.failing_since = None
        return result

    def stop(self) -> None:
        """Commit what is queued, then end the committer threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stopping = False
            while len(group) < self._max_group:
                try:
                    queued = self._queue.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True
                    break
                group.append(queued)
            self._commit(group)
            if stopping:
                return

    def _commit(self, group: list[_Queued[object]]) -> None:
        committed = False
        ends: dict[str, GroupEnd] = {}
        try:
            with transaction(self._sessions) as session:
                # One session for the group's works, emptied before each (its identity map:
                # nothing stale from the works before it). A session of its own per work
                # cost about 30 µs to make, join and close: as much as a statement.
                session.info[_GROUP_END] = ends
                for queued in group:
                    session.expunge_all()
                    queued.result = queued.work(session)
                    session.flush()
                session.expunge_all()
                for end in ends.values():
                    end.apply(session)
                session.flush()
            committed = True
        except Exception as exc:
            log.debug("a group of %d rolled back (%s); each runs alone", len(group),
                      exc.__class__.__name__)
        finally:
            # One wake-up of each caller loop for the whole group, not one per work.
            by_loop: defaultdict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]]
            by_loop = defaultdict(list)
            for queued in group:
                by_loop[queued.future.get_loop()].append(queued.future)
            for loop, futures in by_loop.items():
                loop.call_soon_threadsafe(_answer, futures, committed)


def _reason(exc: OperationalError) -> str:
    """The driver's own words ("database or disk is full"), never the statement or its values."""
    return str(exc.orig).splitlines()[0] if exc.orig is not None else exc.__class__.__name__


def _answer(futures: list[asyncio.Future[bool]], committed: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(committed)


def at_group_end(session: Session, key: str, start: Callable[[], E]) -> E | None:
    """The one `start()` under `key` that every work of the session's group shares, applied
    (`apply(session)`) after the group's last work, just before its COMMIT; None in any
    other session. Works gather their writes to hot rows in it, so a group writes each such
    row once, and holds its lock only from there to the COMMIT."""
    ends = session.info.get(_GROUP_END)
    if ends is None:
        return None
    if key not in ends:
        ends[key] = start()
    return ends[key]  # type: ignore[no-any-return]


def _run_alone(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """`work(session)` in a transaction of its own."""
    with transaction(sessions) as session:
        return work(session)
