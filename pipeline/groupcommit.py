"""Group commit: the render threads' short transactions, run one after another by one thread
and committed together.

Hundreds of render threads each committing two short transactions queue on the database's
write lock (SQLite has one writer; on PostgreSQL, every render's hot row is its job's). The
thread holding it must win the GIL back after every statement, so the lock was held for
several times the work done under it (bench/README.md). Here the threads hand their work to
one committer thread instead: it runs whatever has queued up meanwhile in one transaction,
one COMMIT for the lot, and each caller gets its result only once that COMMIT succeeded.

A work must be a transaction's worth of database reads and writes and nothing else: it may
run twice. If any work of a group raises (or the COMMIT fails), the whole group is rolled
back and every caller runs its own work again alone, in its own transaction, exactly as it
would have without this; so one work's error stays its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import retry_on_disconnect, transaction

log = logging.getLogger("imagebatch.groupcommit")
T = TypeVar("T")

# More work per COMMIT saves little once the COMMIT is shared by dozens, and a big group
# keeps its callers (and the database's locks) waiting for the slowest of them.
MAX_GROUP = 64


class _Queued(Generic[T]):
    __slots__ = ("alone", "done", "result", "work")

    def __init__(self, work: Callable[[Session], T]) -> None:
        self.work = work
        self.done = threading.Event()
        self.result: T | None = None
        self.alone = False


class GroupCommit:
    """One committer thread; `run` blocks its caller until the caller's work is committed."""

    def __init__(self, sessions: sessionmaker[Session], *, max_group: int = MAX_GROUP) -> None:
        self._sessions = sessions
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Queued[object] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="imagebatch-commit",
                                        daemon=True)
        self._thread.start()

    def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` committed: in a group if it can be, else alone (see the module)."""
        queued: _Queued[T] = _Queued(work)
        self._queue.put(queued)  # type: ignore[arg-type]
        queued.done.wait()
        if queued.alone:
            return retry_on_disconnect(partial(run_alone, self._sessions, work))
        return queued.result  # type: ignore[return-value]

    def stop(self) -> None:
        """Commit what is queued, then end the committer thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

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
        try:
            with transaction(self._sessions) as outer:
                connection = outer.connection()
                for queued in group:
                    # A session of its own per work (its own identity map, nothing stale
                    # from the works before it) on the group's connection and transaction.
                    with Session(bind=connection, expire_on_commit=False) as session:
                        queued.result = queued.work(session)
                        session.flush()
        except Exception as exc:
            log.debug("a group of %d rolled back (%s); each runs alone", len(group),
                      exc.__class__.__name__)
            for queued in group:
                queued.alone = True
        finally:
            for queued in group:
                queued.done.set()


def run_alone(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """`work(session)` in a transaction of its own."""
    with transaction(sessions) as session:
        return work(session)
