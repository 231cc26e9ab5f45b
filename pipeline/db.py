"""Engines and sessions: SQLite tuned for concurrent writers, PostgreSQL as it is."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

log = logging.getLogger("imagebatch.db")
WRITE_OPTION = "imagebatch_write"
_write_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
T = TypeVar("T")


class SchemaBehind(RuntimeError):
    """The database's schema is older than this code: run `imagebatch db upgrade`."""


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(database_url)
    # hide_parameters: a failing statement must not print bound values (prompts, keys) in logs.
    return create_engine(
        database_url,
        hide_parameters=True,
        # No pre-ping: it is a transaction of its own (BEGIN, SELECT 1) on every checkout, two
        # per render. A connection that died in the pool fails its first statement instead,
        # and the render's transactions retry on a new one (retry_on_disconnect); the
        # dispatcher, sweeper and lease renewals try again on their next beat.
        # No overflow: a connection opened and closed per burst costs PostgreSQL a backend
        # fork each time; render threads wait briefly for a pooled one instead.
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=300,
        pool_recycle=1800,
    )


def _sqlite_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    # Connections are kept open: closing the last one checkpoints the WAL (milliseconds each),
    # and every new one repeats the PRAGMAs below.
    engine = create_engine(
        database_url,
        hide_parameters=True,
        poolclass=QueuePool,
        pool_size=8,
        max_overflow=64,
        pool_timeout=120,
        connect_args={"timeout": 60, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not the driver, decide when a transaction starts: see "begin".
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        # A transaction that reads then writes must hold the write lock from its start,
        # or a concurrent writer gets "database is locked" at once instead of waiting.
        # Read-only sessions begin deferred: in WAL mode they never wait for a writer.
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    # SQLite has one writer at a time. Threads of this process queue on a lock instead of in
    # SQLite's busy handler, which sleeps and polls: with hundreds of render threads that
    # polling, not the work, was the cost. Other processes still wait in busy_timeout.
    _write_locks[engine] = threading.Lock()
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One read-write transaction: committed on success, rolled back on any error."""
    engine = sessions.kw["bind"]
    lock = _write_locks.get(engine)
    with lock or nullcontext(), sessions() as session, session.begin():
        session.connection(execution_options={WRITE_OPTION: True})
        yield session


def _alembic_config(connection: object) -> object:
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade_schema(engine: Engine) -> None:
    """Apply every migration not yet applied (`imagebatch db upgrade`)."""
    from alembic import command

    with engine.connect() as connection:
        command.upgrade(_alembic_config(connection), "head")  # type: ignore[arg-type]


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's revision, the code's head revision)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        script = ScriptDirectory.from_config(_alembic_config(connection))  # type: ignore[arg-type]
    return current, script.get_current_head() or ""


def require_current_schema(engine: Engine) -> None:
    current, head = schema_revisions(engine)
    if current != head:
        raise SchemaBehind(
            f"the database schema is at revision {current or 'none'} but this imagebatch needs "
            f"{head}: run `imagebatch db upgrade`"
        )


def retry_on_disconnect(work: Callable[[], T], *, tries: int = 6, delay: float = 0.25) -> T:
    """Run `work` (which opens its own transaction) again when the database connection was
    lost or refused: a dropped PostgreSQL connection must not strand a paid-for result."""
    for attempt in range(tries):
        try:
            return work()
        except OperationalError as exc:
            if attempt == tries - 1:
                raise
            # Quietly: the callers that must not give up say so once, louder
            # (GroupCommit.run_durably), and a full disk would repeat this every second.
            log.log(logging.INFO if attempt == 0 else logging.DEBUG,
                    "database unavailable (%s); retrying", exc.orig)
            time.sleep(delay * 2**attempt)
        except DBAPIError as exc:
            if not exc.connection_invalidated or attempt == tries - 1:
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")
