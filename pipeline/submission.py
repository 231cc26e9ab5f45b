"""Submitting a job file, streamed: read, validate, price and write its items in chunks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.caps import Caps
from pipeline.db import transaction
from pipeline.jobs import (
    close_job_if_done,
    insert_renders,
    job_summary,
    render_rows,
    unfinished_job_of,
)
from pipeline.models import ItemStatus, Job, JobItem, JobStatus, utcnow
from pipeline.plan import (
    JobLine,
    LineError,
    ModelSummary,
    PlannedItem,
    add_to_summary,
    parse_line,
    plan_line,
    repeated_id,
)
from pipeline.sample import Sampler

# Invalid lines kept (to show); all of them are counted.
MAX_ERRORS = 100
# Items per transaction: SQLite's one write lock is held for a chunk, never for a whole file.
CHUNK_ROWS = 5000
STDIN = "-"
# Line numbers are stored as 32-bit integers (job_items.line, PostgreSQL INTEGER).
MAX_LINE = 2**31 - 1

_items = JobItem.__table__
# job_id comes first; a row built by item_row is the rest, in this order.
ITEM_COLUMNS = ("job_id", "line", "custom_id", "body", "metadata", "status", "error")
INSERT_ITEMS = insert(_items)
SQLITE_INSERT_ITEMS = (f"INSERT INTO job_items ({', '.join(ITEM_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(ITEM_COLUMNS))})")
_RUNNING, _FAILED = ItemStatus.RUNNING.value, ItemStatus.FAILED.value
_PENDING = ItemStatus.PENDING.value
LINES_OF_CHUNK = (select(_items.c.line, _items.c.id)
                  .where(_items.c.job_id == bindparam("job"),
                         _items.c.line.between(bindparam("first"), bindparam("last"))))
_body_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps builds one per call


class JobFileError(ValueError):
    """The job file cannot be read, or holds no job lines: one line for the user."""


@dataclass
class Submission:
    """What a job file holds (valid items, their images, calls and maximum cost per model)
    and, once submitted, its job (None when nothing was written)."""

    job_id: int | None = None
    items: int = 0
    by_model: dict[str, ModelSummary] = field(default_factory=dict)
    errors: list[LineError] = field(default_factory=list)  # the first MAX_ERRORS only
    error_count: int = 0
    digest: str = ""  # sha256 of the bytes read

    @property
    def images(self) -> int:
        return sum(m.images for m in self.by_model.values())

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.by_model.values())

    @property
    def max_cost_cents(self) -> int:
        return sum(m.max_cost_cents for m in self.by_model.values())

    def add(self, outcome: PlannedItem | LineError) -> None:
        if isinstance(outcome, LineError):
            self.error_count += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(outcome)
        else:
            self.items += 1
            add_to_summary(self.by_model, outcome)


# --- reading -------------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes, read in blocks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_job_file(path: str) -> None:
    """Raise JobFileError (one line saying which) for what cannot be a job file: a missing
    file, a directory, a pipe or a device (a job file is read twice: its digest finds an
    earlier job, then its lines; a pipe goes through standard input), an unreadable or an
    empty one, or nothing on standard input ('-')."""
    if path == STDIN:
        peek = getattr(sys.stdin.buffer, "peek", None)  # the bytes stay for the reader
        if peek is not None and not peek(1):
            raise JobFileError("-: no job lines (standard input is empty)")
        return
    _regular_file(path)
    with open_job_file(path):
        pass
    if not _has_text(path):
        empty = os.stat(path).st_size == 0
        raise JobFileError(f"{path}: no job lines (the file is "
                           f"{'empty' if empty else 'blank lines only'})")


def _regular_file(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise JobFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise JobFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise JobFileError(f"{path}: is a directory, not a job file")
    if not stat.S_ISREG(mode):
        kind = ("a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a character device" if stat.S_ISCHR(mode) else "a block device")
        raise JobFileError(f"{path}: not a regular file ({kind}); give a job file, or - to "
                           "read standard input")


def _has_text(path: str) -> bool:
    """Whether the file holds anything but whitespace (read up to its first such byte)."""
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 16):
                if chunk.strip():
                    return True
    except OSError:
        return True  # the reader that follows says what is wrong
    return False


def job_name(path: str) -> str:
    """The file's name as text that can be stored and printed ('stdin' for '-'): bytes of
    a name that are not UTF-8 (Python reads them as lone surrogates) become U+FFFD."""
    if path == STDIN:
        return "stdin"
    return Path(path).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_job_text(path: str) -> tuple[str, str]:
    """The whole job file as text (a schedule keeps it), and its name; '-' reads standard
    input. Bytes that are not UTF-8 are kept as lone surrogates (surrogateescape), so
    `check_text` finds their lines as `submit` does, each with its own error."""
    check_job_file(path)
    data = sys.stdin.buffer.read() if path == STDIN else Path(path).read_bytes()
    return data.decode("utf-8", "surrogateescape"), job_name(path)


def _text_bytes(text: str) -> bytes:
    """The bytes a job text was read from (read_job_text), or, for a lone surrogate that
    came from elsewhere, bytes that fail its line alone."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def storable_text(text: str) -> str:
    """A job text as SQL can keep it: a line with bytes that are not UTF-8 or with a NUL
    (PostgreSQL text holds none) has them as U+FFFD and one more U+FFFD in front, which is
    not JSON: the line stays invalid and fails when its job is planned, as `submit` fails it,
    instead of becoming a valid request."""
    lines = []
    for raw in _text_bytes(text).split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if "\x00" in line or line.encode("utf-8") != raw:
            line = "\ufffd" + line.replace("\x00", "\ufffd")
        lines.append(line)
    return "\n".join(lines)


@contextmanager
def open_job_file(path: str) -> Iterator[IO[bytes]]:
    """The job file as a binary stream ('-': standard input, left open)."""
    if path == STDIN:
        yield sys.stdin.buffer
        return
    file = Path(path)
    if file.is_dir():
        raise JobFileError(f"{path}: is a directory, not a job file")
    try:
        stream = file.open("rb")
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise JobFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with stream:
        yield stream


def read_lines(stream: IO[bytes], digest: Any = None) -> Iterator[tuple[int, str] | LineError]:
    """The non-blank lines of a binary stream as (line number, text), one at a time.

    Lines end at LF only, a CR before it dropped: str.splitlines would also split at U+2028
    and U+2029, which JSON strings may carry raw. Each line is decoded on its own, so a line
    that is not UTF-8 is a LineError naming the byte (counted from 1 within the line), not
    the end of the file. `digest` (a hashlib object), when given, is fed every byte read."""
    for number, raw in enumerate(stream, start=1):
        if digest is not None:
            digest.update(raw)
        if number > MAX_LINE:
            raise JobFileError(f"line {number:,}: a job file has at most {MAX_LINE:,} lines "
                               "(blank ones included)")
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield LineError(number, f"not UTF-8 text (byte {exc.start + 1})",
                            raw=raw.decode("utf-8", "replace"))
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark some editors write
        if text.strip():
            yield number, text


def plan_stream(stream: IO[bytes], caps: Mapping[str, Caps], digest: Any = None
                ) -> Iterator[tuple[JobLine | LineError, PlannedItem | LineError]]:
    """Each job line parsed, then planned: (the parsed line, its PlannedItem or LineError).

    A custom_id seen on an earlier line makes the line an error (the only state kept per
    line is the custom_id -> first line dict)."""
    first_line: dict[str, int] = {}
    for read in read_lines(stream, digest):
        entry = read if isinstance(read, LineError) else parse_line(*read)
        cid = entry.custom_id
        if cid is not None:
            first = first_line.setdefault(cid, entry.line)
            if first != entry.line:
                yield entry, repeated_id(entry, first)
                continue
        yield entry, plan_line(entry, caps)


def check_file(path: str, caps: Mapping[str, Caps]) -> Submission:
    """Validate and price a job file without writing anything (`imagebatch plan`)."""
    with open_job_file(path) as stream:
        return _check_stream(stream, caps, path)


def check_text(text: str, caps: Mapping[str, Caps], where: str | None = None) -> Submission:
    """The same for a job file's text (a schedule's)."""
    return _check_stream(io.BytesIO(_text_bytes(text)), caps, where or "the job text")


def _check_stream(stream: IO[bytes], caps: Mapping[str, Caps], where: str) -> Submission:
    result = Submission()
    digest = hashlib.sha256()
    for _, outcome in plan_stream(stream, caps, digest):
        result.add(outcome)
    result.digest = digest.hexdigest()
    _require_lines(result, where)
    return result


# --- the rule ------------------------------------------------------------------------------


class InvalidLines(JobFileError):
    """A job file refused for its invalid lines, nothing written: `lines` says which and
    why (error_lines), str() how many and what to do."""

    def __init__(self, where: str | None, checked: Submission, what: str = "submitted"
                 ) -> None:
        self.lines = error_lines(checked, where)
        self.summary = (f"{checked.error_count:,} invalid line(s) in {where or 'the job file'}"
                        f"; nothing was "
                        f"{what} (fix them, or pass --allow-invalid to run the rest)")
        super().__init__(self.summary)


def error_lines(checked: Submission, where: str | None) -> list[str]:
    """The first MAX_ERRORS invalid lines as `FILE:LINE (custom_id): reason` ('line LINE'
    without a file), then how many more there are."""
    shown = [f"{where}:{e.line}" if where else f"line {e.line}" for e in checked.errors]
    lines = [f"{at}{f' ({e.custom_id})' if e.custom_id else ''}: {e.reason}"
             for at, e in zip(shown, checked.errors, strict=True)]
    if checked.error_count > len(checked.errors):
        lines.append(f"... and {checked.error_count - len(checked.errors):,} more invalid "
                     "lines")
    return lines


def accept(checked: Submission, where: str | None, *, allow_invalid: bool, what: str = "submitted",
           refusal: type[InvalidLines] = InvalidLines) -> Submission:
    """The submission rule, the same for `submit`, `run` and a schedule: every line is
    checked against the caps (check_file, check_text, submit_file); a file with an invalid
    line is refused (InvalidLines) unless `allow_invalid`, which makes those lines failed
    items carrying their reason. (A job another program writes with SQL is checked by the
    same per-line rule, `plan.plan_line`, when the dispatcher plans it: nobody is there to
    refuse it to, so its invalid lines fail.)"""
    if checked.error_count and not allow_invalid:
        raise refusal(where, checked, what)
    return checked


def _require_lines(result: Submission, path: str) -> None:
    if result.items == 0 and result.error_count == 0:
        raise JobFileError(f"{path}: no job lines (the file is empty)")


def check_not_unfinished(sessions: sessionmaker[Session], path: str) -> None:
    """JobFileError naming `resume` when the file (same sha256) was submitted as a job that
    has not ended: `run` continues a job instead of paying for its lines twice. Standard
    input is never matched."""
    if path == STDIN:
        return
    with sessions() as session:
        job = unfinished_job_of(session, file_digest(path))
        if job is None:
            return
        s = job_summary(session, job.id)
    done = s["items_succeeded"] + s["items_failed"] + s["items_cancelled"]
    raise JobFileError(
        f"{job_name(path)} was submitted as job {job.id}, which is {s['status']} "
        f"({done:,}/{s['items_total']:,} items done): continue it with "
        f"`imagebatch resume {job.id}`, or pass --new to start another copy")


# --- writing -------------------------------------------------------------------------------


def item_row(entry: JobLine | LineError, outcome: PlannedItem | LineError) -> tuple[Any, ...]:
    """A job_items row without its job_id (ITEM_COLUMNS[1:]). A valid line is running (its
    renders are written with it) with its request body; an invalid one is failed with its
    reason, and keeps its body (or, when it did not parse, its text) so `retry` can plan it
    again."""
    if isinstance(entry, LineError):
        return (entry.line, entry.custom_id, storable_raw(entry.raw), None, _FAILED,
                outcome.reason)
    meta = None if entry.metadata is None else json.dumps(entry.metadata)
    body = _body_json(entry.body)
    if isinstance(outcome, LineError):
        return (entry.line, entry.custom_id, body, meta, _FAILED, outcome.reason)
    return (entry.line, entry.custom_id, body, meta, _RUNNING, None)


def storable_raw(raw: str) -> str:
    """An invalid line's text as it can be stored: PostgreSQL text holds no NUL character
    (a line holding one is not JSON anyway, and stays invalid with U+FFFD instead)."""
    return raw.replace("\x00", "\ufffd")


def insert_items(session: Session, job_id: int, rows: list[tuple[Any, ...]]) -> None:
    """Write item rows in bulk: COPY on PostgreSQL, one executemany elsewhere."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy_items(connection.connection.driver_connection, job_id, rows)
        return
    if dialect.name == "sqlite":  # the driver's own: 0.9 s per 200,000 rows against Core's 2.2
        connection.exec_driver_sql(SQLITE_INSERT_ITEMS, [(job_id, *row) for row in rows])
        return
    names = ITEM_COLUMNS
    connection.execute(INSERT_ITEMS, [dict(zip(names, (job_id, *row), strict=True))
                                      for row in rows])


def _copy_items(driver_connection: Any, job_id: int, rows: list[tuple[Any, ...]]) -> None:
    import psycopg

    statement = f"COPY job_items ({', '.join(ITEM_COLUMNS)}) FROM STDIN"
    try:
        with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row((job_id, *row))
    except psycopg.Error as exc:
        # The server's message names the row's values (prompts): keep only its first line.
        reason = exc.diag.message_primary or type(exc).__name__
        raise RuntimeError(f"writing job items failed: {reason}") from None


class _JobWriter:
    """The job row, created with its first chunk (status submitting: nobody plans or sends
    it), then chunks of items with their renders, each chunk its own transaction; `finish`
    makes it running in one last one.

    The file was planned line by line as it was read (`plan_stream`), so its renders are
    written here, waiting in SQL for the broker's window: the dispatcher does not read a CLI
    job's million items a second time (a planning pass that took the worker's CPU and
    SQLite's write lock from the renders for a minute)."""

    def __init__(self, sessions: sessionmaker[Session], job: dict[str, Any],
                 sample: int | None = None) -> None:
        self.sessions, self.job, self.job_id = sessions, job, None
        self.rows: list[tuple[Any, ...]] = []
        self.planned: list[PlannedItem] = []
        self.items = self.failed = self.renders = 0
        # A sample run writes its valid lines pending and keeps the drawn ones to plan last.
        self.sampler = None if sample is None else Sampler(sample)

    def add(self, row: tuple[Any, ...], outcome: PlannedItem | LineError) -> None:
        self.items += 1
        if isinstance(outcome, LineError):
            self.failed += 1
        elif self.sampler is not None:
            row = (*row[:4], _PENDING, None)
            self.sampler.offer(row, outcome)
        else:
            self.planned.append(outcome)
        self.rows.append(row)
        if len(self.rows) >= CHUNK_ROWS:
            with transaction(self.sessions) as session:
                self._write(session)

    def _write(self, session: Session) -> int:
        if self.job_id is None:
            job = Job(**self.job, status=JobStatus.SUBMITTING.value)
            session.add(job)
            session.flush()
            self.job_id = job.id
        insert_items(session, self.job_id, self.rows)
        if self.planned:
            db = session.connection()
            ids = dict(db.execute(LINES_OF_CHUNK, {
                "job": self.job_id, "first": self.planned[0].line.line,
                "last": self.planned[-1].line.line}).all())
            renders = [row for planned in self.planned
                       for row in render_rows(self.job_id, ids[planned.line.line], planned)]
            insert_renders(db, renders)
            self.renders += len(renders)
        self.rows, self.planned = [], []
        return self.job_id

    def finish(self, digest: str) -> int:
        with transaction(self.sessions) as session:
            job_id = self._write(session)
            sample_lines = self._plan_sample(session)
            session.execute(update(Job).where(Job.id == job_id).values(
                status=JobStatus.RUNNING.value, source_digest=digest, started_at=utcnow(),
                open_renders=self.renders, items_total=self.items, items_failed=self.failed,
                sample_lines=sample_lines))
            close_job_if_done(session, job_id, self.renders)  # every line invalid
        return job_id

    def _plan_sample(self, session: Session) -> int | None:
        """The drawn lines running with their renders; how many, when the others wait
        (pending) for `resume`, else None (the sample took every valid line)."""
        if self.sampler is None or self.job_id is None:
            return None
        drawn: list[PlannedItem] = self.sampler.chosen()
        db = session.connection()
        for start in range(0, len(drawn), CHUNK_ROWS):
            chunk = drawn[start:start + CHUNK_ROWS]
            lines = [planned.line.line for planned in chunk]
            ids = dict(db.execute(select(_items.c.line, _items.c.id).where(
                _items.c.job_id == self.job_id, _items.c.line.in_(lines))).all())
            db.execute(update(_items).where(_items.c.id.in_(list(ids.values())))
                       .values(status=_RUNNING))
            renders = [row for planned in chunk
                       for row in render_rows(self.job_id, ids[planned.line.line], planned)]
            insert_renders(db, renders)
            self.renders += len(renders)
        valid = self.items - self.failed
        return len(drawn) if len(drawn) < valid else None

    def discard(self) -> None:
        """Forget the rows not written and delete the job, if any (its items cascade)."""
        self.rows, self.planned = [], []
        if self.job_id is not None:
            with transaction(self.sessions) as session:
                session.execute(delete(Job).where(Job.id == self.job_id))
            self.job_id = None


def submit_file(sessions: sessionmaker[Session], path: str, caps: Mapping[str, Caps], *,
                team: str, budget_cents: int, name: str | None, allow_invalid: bool,
                source: str = "cli", sample: int | None = None, reuse: bool = True,
                notify_url: str | None = None) -> Submission:
    """Validate, price and write a job file as one pass over it, in bounded memory.

    The job is written as `submitting` with its items and their renders in chunks, then made
    `running` (its renders wait in SQL for the broker's window) in one last transaction that
    also records the file's digest. With
    an invalid line and not `allow_invalid`, writing stops there, the rest is still read to
    count and collect the errors, the job is deleted and job_id is None. With
    `allow_invalid`, invalid lines become failed items carrying their reason. With `sample`,
    only that many valid lines, drawn by `sample.Sampler`, are planned: the others wait
    pending and the job pauses once the drawn ones have ended (`jobs.close_job_if_done`)."""
    result = Submission()
    digest = hashlib.sha256()
    writer = _JobWriter(sessions, {"team": team, "name": name, "budget_cents": budget_cents,
                                   "source": source, "reuse": reuse, "notify_url": notify_url},
                       sample)
    writing = True
    try:
        with open_job_file(path) as stream:
            for entry, outcome in plan_stream(stream, caps, digest):
                result.add(outcome)
                if not writing:
                    continue
                if isinstance(outcome, LineError) and not allow_invalid:
                    writing = False
                    writer.discard()
                    continue
                writer.add(item_row(entry, outcome), outcome)
        result.digest = digest.hexdigest()
        _require_lines(result, path)
        if writing:
            result.job_id = writer.finish(result.digest)
    except BaseException:
        writer.discard()
        raise
    return result


@dataclass(frozen=True)
class JobSpec:
    """What a user asks of a job besides its lines: who pays and up to what, and how it runs
    (`submit`, `run`, `demo`)."""

    team: str
    budget_cents: int
    name: str | None = None
    allow_invalid: bool = False
    sample: int | None = None  # `run --sample K`
    reuse: bool = True  # False: `--no-reuse`
    notify_url: str | None = None  # `--notify URL`


def submit_spec(sessions: sessionmaker[Session], path: str, caps: Mapping[str, Caps],
                spec: JobSpec) -> Submission:
    """`submit_job` of a JobSpec, named after its file when the spec names no job."""
    return submit_job(sessions, path, caps, **{**asdict(spec), "name": spec.name or job_name(path)})


def submit_job(sessions: sessionmaker[Session], path: str, caps: Mapping[str, Caps], *,
               team: str, budget_cents: int, name: str | None, allow_invalid: bool,
               source: str = "cli", sample: int | None = None, reuse: bool = True,
               notify_url: str | None = None) -> Submission:
    """A job file written as a job under the submission rule (`accept`); `reuse` False: its
    seeded requests are sent even when they already succeeded (reuse.py)."""
    submitted = submit_file(sessions, path, caps, team=team, budget_cents=budget_cents,
                            name=name, allow_invalid=allow_invalid, source=source,
                            sample=sample, reuse=reuse, notify_url=notify_url)
    return accept(submitted, path, allow_invalid=allow_invalid)
