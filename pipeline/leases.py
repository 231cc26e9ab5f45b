"""Render leases kept alive: while a worker keeps a render, it renews its lease in SQL.

Leases are short (IMAGEBATCH_LEASE_SECONDS) so a killed worker's renders come back within
a minute, however long the render deadline; a live worker renews all of its renders with
one UPDATE per beat, so long calls and retry waits keep their lease.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from pipeline import queries
from pipeline.db import transaction
from pipeline.models import utcnow
from pipeline.queue import announce_worker, forget_worker

log = logging.getLogger("imagebatch.leases")


class LeaseKeeper:
    def __init__(self, sessions: sessionmaker[Session], lease_seconds: float) -> None:
        self.sessions = sessions
        self.lease_seconds = lease_seconds
        self._kept: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # This process as a worker (name, render slots), announced with every beat so the
        # broker's window is sized from the workers alive (pipeline/queue.py).
        self._worker: tuple[str, int] | None = None
        self._thread = threading.Thread(target=self._beat, name="imagebatch-leases", daemon=True)
        self._thread.start()

    @contextmanager
    def keep(self, render_id: int) -> Iterator[None]:
        with self._lock:
            self._kept[render_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._kept[render_id] -= 1
                if self._kept[render_id] <= 0:
                    del self._kept[render_id]

    def kept(self) -> frozenset[int]:
        """The renders this process is working on: never another's to sweep, even when
        their leases ran out while the database refused the renewals."""
        with self._lock:
            return frozenset(self._kept)

    def renew(self) -> int:
        with self._lock:
            kept = list(self._kept)
        if not kept:
            return 0
        until = utcnow() + timedelta(seconds=self.lease_seconds)
        renewed = 0
        for start in range(0, len(kept), 500):
            with transaction(self.sessions) as session:
                # Rows another transaction locks are skipped (see queries.renew_leases).
                renewed += queries.renew_leases(session.connection(),
                                                kept[start:start + 500], until)
        return renewed

    def announce(self, name: str, slots: int) -> None:
        """Say, now and with every beat, that this process renders with `slots` slots."""
        self._worker = (name, slots)
        announce_worker(self.sessions, name, slots)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
                if self._worker is not None:
                    announce_worker(self.sessions, *self._worker)
            except Exception as exc:  # the database may be briefly away; try again next beat
                log.warning("renewing render leases failed: %s",
                            str(getattr(exc, "orig", None) or exc).splitlines()[0])

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            try:
                forget_worker(self.sessions, self._worker[0])
            except Exception as exc:  # it is forgotten anyway once its beats stop
                log.warning("unregistering the worker failed: %s", exc)
