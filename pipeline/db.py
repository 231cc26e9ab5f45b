"""Engines and sessions: SQLite tuned for concurrent writers, PostgreSQL as it is."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from pipeline.settings import Settings, SettingsError, check_database_url, mask_url

log = logging.getLogger("imagebatch.db")
WRITE_OPTION = "imagebatch_write"
_write_locks: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
T = TypeVar("T")


# Seconds a PostgreSQL connection attempt may take: an unreachable host must not hang a
# command for the kernel's TCP timeout (minutes).
CONNECT_TIMEOUT = 10
# pg_advisory_lock key held while migrating ("imagebatch" in ASCII, truncated to 63 bits).
MIGRATION_LOCK = 0x696D616765626174


class SchemaBehind(RuntimeError):
    """The database's schema is older than this code: run `imagebatch db upgrade`."""


class DatabaseUnavailable(SettingsError):
    """The database cannot be opened, reached or migrated: named by its setting."""


def open_engine(database_url: str, *, where: str | None = None, pool_size: int = 10
                ) -> Engine:
    """An engine on a database that answered, or DatabaseUnavailable naming the setting
    (`where`: Settings.database_label), the URL (password masked) and the reason: the check
    every command does first."""
    where = where or f"IMAGEBATCH_DATABASE_URL={mask_url(database_url)!r}"
    check_database_url(database_url, where)
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        _check_sqlite_file(Path(url.database or ""), where)
    engine = make_engine(database_url, pool_size=pool_size)
    try:
        with engine.connect() as connection:
            # sqlite_master is read from the file: "file is not a database" shows here.
            connection.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master" if url.get_backend_name() == "sqlite"
                else "SELECT 1")
    except SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseUnavailable(f"{where}: cannot open the database: {error_reason(exc)}"
                                  ) from None
    return engine


@contextmanager
def open_database(settings: Settings, *, upgrade: bool = True
                  ) -> Iterator[sessionmaker[Session]]:
    """The sessions of the configured database, with the schema rule every command follows:
    the embedded SQLite file is created and upgraded on the spot (`upgrade`); a server's
    schema is only checked (SchemaBehind names `imagebatch db upgrade`), because migrating
    a shared database is its operator's decision."""
    engine = open_engine(settings.database_url, where=settings.database_label)
    try:
        prepare_schema(engine, upgrade=settings.is_sqlite and upgrade,
                       where=settings.database_label)
        yield session_factory(engine)
    finally:
        engine.dispose()


def check_database(settings: Settings) -> None:
    """The rule of `open_database` applied now, for a process that opens it later."""
    with open_database(settings):
        pass


@contextmanager
def reading(settings: Settings) -> Iterator[Session]:
    """A session on the configured database, to read."""
    with open_database(settings) as sessions, sessions() as session:
        yield session


@contextmanager
def writing(settings: Settings) -> Iterator[Session]:
    """One transaction on the configured database."""
    with open_database(settings) as sessions, transaction(sessions) as session:
        yield session


def database_revisions(settings: Settings, *, upgrade: bool = False) -> tuple[str | None, str]:
    """(the database's schema revision, this code's), after an upgrade when `upgrade`
    (`imagebatch db upgrade`: any database, a server's too)."""
    engine = open_engine(settings.database_url, where=settings.database_label)
    try:
        if upgrade:
            prepare_schema(engine, upgrade=True, where=settings.database_label)
        return schema_revisions(engine)
    finally:
        engine.dispose()


def _check_sqlite_file(path: Path, where: str) -> None:
    """What SQLite would report as "unable to open database file", said precisely."""
    if path.is_dir():
        raise DatabaseUnavailable(f"{where}: {path} is a directory, not a database file")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DatabaseUnavailable(f"{where}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Append mode creates a missing file (an empty file is an empty SQLite database)
        # and changes nothing in an existing one; it fails as SQLite would, with a reason.
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise DatabaseUnavailable(f"{where}: cannot write {path}: {exc.strerror or exc}"
                                  ) from None
    # SQLite writes its journal (-wal, -shm) beside the file: the folder must be writable.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DatabaseUnavailable(f"{where}: the folder {path.parent} is not writable")


def error_reason(exc: BaseException) -> str:
    """The first line of a database error, from the driver, with any password masked."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [type(orig).__name__]
    return mask_url(lines[0])


def make_engine(database_url: str, *, pool_size: int = 10) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(database_url)
    # hide_parameters: a failing statement must not print bound values (prompts, keys) in logs.
    connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": CONNECT_TIMEOUT}
    return create_engine(
        database_url,
        hide_parameters=True,
        connect_args=connect_args,
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


def prepare_schema(engine: Engine, *, upgrade: bool, where: str) -> None:
    """Bring the schema up to date (`upgrade`: the embedded SQLite file) or make sure it is
    (a server's, upgraded by `imagebatch db upgrade`); a database error names `where`."""
    try:
        if upgrade:
            upgrade_schema(engine)
        else:
            require_current_schema(engine)
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(
            f"{where}: the schema could not be {'created' if upgrade else 'read'}: "
            f"{error_reason(exc)}") from None


def upgrade_schema(engine: Engine) -> None:
    """Apply every migration not yet applied (`imagebatch db upgrade`, and the embedded
    SQLite file on first use). Safe when many processes start at once on a fresh database:
    one migrates, under a lock (a file lock beside a SQLite file, an advisory lock on
    PostgreSQL), and the others find the revision current once they get the lock."""
    from alembic import command

    head = _head_revision()
    # BEGIN IMMEDIATE on SQLite: the migration reads, then writes; a deferred transaction
    # would get "database is locked" at once from a concurrent writer instead of waiting.
    with engine.connect().execution_options(**{WRITE_OPTION: True}) as connection:
        if _current_revision(connection) == head:
            return
        with _migration_lock(engine, connection):
            if _current_revision(connection) == head:
                return
            command.upgrade(_alembic_config(connection), "head")  # type: ignore[arg-type]


def _current_revision(connection: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    current = MigrationContext.configure(connection).get_current_revision()
    connection.rollback()  # the read's transaction ends; the migration starts its own
    return current


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head() or ""  # type: ignore[arg-type]


@contextmanager
def _migration_lock(engine: Engine, connection: Connection) -> Iterator[None]:
    """Held by one process at a time, across processes and machines."""
    if connection.dialect.name == "postgresql":
        # Session-level: it outlives the transactions the migration commits.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()
        try:
            yield
        finally:
            try:
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                   {"key": MIGRATION_LOCK})
                connection.commit()
            except SQLAlchemyError:  # a lost connection took its lock with it
                pass
        return
    database = engine.url.database
    with open(f"{database}.migrate-lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the database's revision, the code's head revision)."""
    with engine.connect() as connection:
        return _current_revision(connection), _head_revision()


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
