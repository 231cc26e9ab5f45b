"""The SQL schema as SQLAlchemy 2 typed models; migrations/ builds it, this module reads it."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    literal_column,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class HexDigest(TypeDecorator[str]):
    """A SHA-256 digest stored as its 32 bytes and read back as 64 hex characters: the hex
    text cost 33 B more a file at rest. In SQL: `encode(sha256, 'hex')` (PostgreSQL),
    `hex(sha256)` (SQLite)."""

    impl = LargeBinary(32)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        return None if value is None else bytes.fromhex(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else bytes(value).hex()


class Base(DeclarativeBase):
    pass


class JobStatus(enum.StrEnum):
    SUBMITTING = "submitting"  # `submit`/`run` is still writing its items; nobody plans it
    PENDING = "pending"  # written by submit or by another program's INSERT; not planned yet
    RUNNING = "running"  # planned: its renders are queued or under way
    SUCCEEDED = "succeeded"  # every item delivered all its images
    PARTIAL = "partial"  # some items delivered, some failed
    FAILED = "failed"  # nothing delivered
    CANCELLED = "cancelled"  # cancelled by a user; in-flight renders finished first
    PAUSED = "paused"  # nothing new is sent; in-flight renders finish; `resume` continues it


TERMINAL_JOB = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELLED}
)


class ItemStatus(enum.StrEnum):
    PENDING = "pending"  # not planned yet
    RUNNING = "running"  # has renders not yet terminal
    SUCCEEDED = "succeeded"  # every render succeeded
    FAILED = "failed"  # invalid, or at least one render failed
    CANCELLED = "cancelled"  # the job was cancelled before its renders ran


class RenderStatus(enum.StrEnum):
    QUEUED = "queued"  # planned; waits in SQL (enqueued_at NULL) or in the broker's window
    RUNNING = "running"  # an attempt holds the lease and may be calling the upstream
    SUCCEEDED = "succeeded"  # its images are stored and charged
    FAILED = "failed"  # gave up: budget, a non-retryable refusal, or attempts exhausted
    CANCELLED = "cancelled"  # the job was cancelled before this render called the upstream


TERMINAL_RENDER = (RenderStatus.SUCCEEDED, RenderStatus.FAILED, RenderStatus.CANCELLED)


class AttemptOutcome(enum.StrEnum):
    RESERVED = "reserved"  # money held; the call is under way (or its worker died)
    CHARGED = "charged"  # a result came back: the provider did the work
    RELEASED = "released"  # a definite refusal: nothing was billed
    UNKNOWN = "unknown"  # cut, timed out or killed: charged, the provider may have billed it
    REUSED = "reused"  # not sent: a succeeded render of the same seeded request was copied


class LedgerKind(enum.StrEnum):
    RESERVE = "reserve"  # money held before a call
    CHARGE = "charge"  # a reservation turned into spend: result delivered
    RELEASE = "release"  # a reservation given back: definite refusal
    UNKNOWN = "unknown"  # a reservation turned into spend whose outcome is unknown
    # 0 cents: the render's files were copied from an earlier render of the same seeded
    # request (pipeline/reuse.py); `images` x `price_per_image_cents` is what that one paid.
    REUSED = "reused"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team: Mapped[str] = mapped_column(String(200), server_default="default")
    name: Mapped[str | None] = mapped_column(String(500))
    budget_cents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"), index=True)
    # Counters kept equal to the ledger's sums in the same transaction as each ledger row.
    # spent_cents includes unknown_cents: both count against the budget.
    spent_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    reserved_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    unknown_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # Renders queued or running: recounted when the job is planned or cancelled, and taken
    # down by one as each render ends (under the job's row lock), so closing needs no scan.
    open_renders: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # What `status` shows, kept with the money (ledger.Moves) as items end and files are
    # stored, and recounted whole when a job is planned, cancelled, retried or resumed.
    items_total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    items_succeeded: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    items_failed: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    items_cancelled: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    images: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    source: Mapped[str] = mapped_column(String(20), server_default=text("'sql'"))
    # Seeded renders whose request already succeeded copy its files instead of calling
    # (pipeline/reuse.py); `--no-reuse` stores False. Jobs written with SQL reuse.
    reuse: Mapped[bool] = mapped_column(Boolean, server_default=true())
    # Planned in chunks: the last line planned so far, NULL once every item is planned.
    plan_cursor: Mapped[int | None] = mapped_column(Integer)
    # `run --sample K`: the job renders K of its lines, then pauses instead of closing until
    # `resume` clears this and plans the rest (pending items).
    sample_lines: Mapped[int | None] = mapped_column(Integer)
    # sha256 of the submitted file: `run` of the same file finds this job if it is unfinished.
    source_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=text("CURRENT_TIMESTAMP"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Where the job's end and its spend crossings are POSTed (pipeline/webhooks.py); NULL:
    # nowhere. A program submitting with SQL may set it too.
    notify_url: Mapped[str | None] = mapped_column(String(2000))


# The condition of the partial indexes: statements that should use them name the status as a
# literal (`status_is`), because PostgreSQL proves a partial index applies from the SQL text,
# and a generic plan of `status = $1` proves nothing.
NOT_SUCCEEDED = text("status <> 'succeeded'")
# The renders a seeded request can be reused from: succeeded, with a key.
REUSABLE = text("status = 'succeeded' AND request_key IS NOT NULL")


def status_is(column: ColumnElement[str], status: str) -> ColumnElement[bool]:
    """`column = 'status'` written into the SQL, so PostgreSQL can use a partial index."""
    return column == literal_column(f"'{status}'")


class JobItem(Base):
    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "line", name="uq_job_items_job_line"),
        # On PostgreSQL only the items that have not succeeded: what a job looks up by status
        # (pending to plan, failed or cancelled to retry), and nothing of a job that succeeded
        # (41 B a line at rest). SQLite keeps them all: it cannot tell that `status = ?`
        # implies the condition, and its rows are small already.
        Index("ix_job_items_job_status", "job_id", "status", "line",
              postgresql_where=NOT_SUCCEEDED),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Not indexed alone: uq_job_items_job_line (job_id, line) begins with it.
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text)  # the request body as JSON text
    meta: Mapped[str | None] = mapped_column("metadata", Text)  # JSON text
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    error: Mapped[str | None] = mapped_column(Text)


class Render(Base):
    """One upstream call's worth of work: an item's `n` split into calls of at most max_n."""

    __tablename__ = "renders"
    __table_args__ = (
        UniqueConstraint("item_id", "render_index", name="uq_renders_item_index"),
        # The window: a job's renders sent and not started, and its next unsent ones in id
        # order, both read from the index alone.
        # On PostgreSQL without succeeded renders (50 B a render at rest), as above.
        Index("ix_renders_job_queue", "job_id", "status", "enqueued_at", "id",
              postgresql_where=NOT_SUCCEEDED),
        # Running renders only: the sweep looks for those whose lease ran out.
        Index("ix_renders_status_lease", "status", "lease_until",
              postgresql_where=text("status = 'running'"),
              sqlite_where=text("status = 'running'")),
        # Seeded reuse looks a request up by its key among the renders that succeeded only
        # (reuse.find_source): unseeded and unfinished renders cost the index nothing.
        Index("ix_renders_request_key", "request_key",
              postgresql_where=REUSABLE, sqlite_where=REUSABLE),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("job_items.id", ondelete="CASCADE"))
    render_index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    price_per_image_cents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'queued'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Attempts made before the last `retry JOB`: the attempt limit counts from here.
    retry_from: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    # When its broker message was sent; NULL while it waits in SQL (SQL is the queue).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime)
    deliveries: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    # A digest of the seeded request sent upstream (reuse.request_key; NULL without a seed):
    # a later render of the same request copies this one's files once it succeeded.
    request_key: Mapped[int | None] = mapped_column(BigInteger)
    # The render whose files this one copied instead of calling (NULL: rendered here).
    reused_from: Mapped[int | None] = mapped_column(Integer)
    # The provider's name for the call that delivered (x-request-id or request-id header,
    # else the body's `id`; NULL when it sent none): what its support asks for. Exported.
    request_id: Mapped[str | None] = mapped_column(String(200))


class Attempt(Base):
    """One upstream call, with the reservation that preceded it and how it settled."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("render_id", "number", name="uq_attempts_render_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Not indexed alone: uq_attempts_render_number (render_id, number) begins with it.
    render_id: Mapped[int] = mapped_column(ForeignKey("renders.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20), server_default=text("'reserved'"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    # What the reservation drew on and at what price, so settling needs no other lookup.
    team: Mapped[str] = mapped_column(String(200))
    team_budget_id: Mapped[int | None] = mapped_column(Integer)
    price_per_image_cents: Mapped[int] = mapped_column(BigInteger)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime, server_default=text("CURRENT_TIMESTAMP"))
    # Committed before the call: an attempt that lost its worker with no send recorded never
    # reached the upstream, so it is released, not charged as unknown.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    settled_at: Mapped[datetime | None] = mapped_column(DateTime)


class LedgerEntry(Base):
    """Append-only: one row per money movement of one attempt, on every budget it draws on."""

    __tablename__ = "ledger"
    __table_args__ = (Index("ix_ledger_job_kind", "job_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    render_id: Mapped[int] = mapped_column(Integer)
    # Not indexed, like team_budget_id: no statement looks a ledger row up by them (reports
    # and checks go by job, ix_ledger_job_kind), and each index cost every render two entries.
    attempt_id: Mapped[int] = mapped_column(Integer)
    # The team period budget this movement also drew on, when the team has one.
    team_budget_id: Mapped[int | None] = mapped_column(Integer)
    team: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    images: Mapped[int] = mapped_column(Integer)
    # The price this attempt was reserved at: a later price change rewrites no history.
    price_per_image_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Image(Base):
    """A stored media file. The row exists only once its bytes are in storage."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("render_id", "image_index", name="uq_images_render_index"),
        # A job's files in id order: the gallery's keyset pages (`imagebatch serve`), and the
        # exports' lookups by job.
        Index("ix_images_job_file", "job_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # Its item is its render's (deleting an item cascades through its renders); its URI is
    # the store's URI of `key` (storage.MediaStore.uri): neither is repeated here.
    render_id: Mapped[int] = mapped_column(ForeignKey("renders.id", ondelete="CASCADE"))
    image_index: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(1000))
    content_type: Mapped[str] = mapped_column(String(100))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(HexDigest)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    revised_prompt: Mapped[str | None] = mapped_column(Text)
    cost_cents: Mapped[int] = mapped_column(BigInteger)
    # No created_at: when a file was paid for is its ledger row's, when it was stored its
    # attempt's settled_at (8 B a file at rest, read by nothing).


class Worker(Base):
    """A live worker process: its render slots, renewed with its leases. The broker's window
    is sized from the workers seen lately."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(DateTime)


class ModelCaps(Base):
    """The /models answer, cached so planning needs no network while it is fresh."""

    __tablename__ = "model_caps"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    api_base: Mapped[str] = mapped_column(String(500), primary_key=True)
    entry: Mapped[str] = mapped_column(Text)  # the raw /models entry as JSON text
    fetched_at: Mapped[datetime] = mapped_column(DateTime)


class Team(Base):
    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    budget_cents: Mapped[int | None] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(10), server_default=text("'month'"))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TeamBudget(Base):
    """A team's budget for one period, keyed by the period's start: a new period is a new row."""

    __tablename__ = "team_budgets"
    __table_args__ = (UniqueConstraint("team", "period_start", name="uq_team_budgets_period"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team: Mapped[str] = mapped_column(ForeignKey("teams.name", ondelete="CASCADE"))
    period_start: Mapped[datetime] = mapped_column(DateTime)
    period_end: Mapped[datetime | None] = mapped_column(DateTime)
    spent_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    reserved_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    unknown_cents: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class Schedule(Base):
    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    cron: Mapped[str] = mapped_column(String(100))
    timezone: Mapped[str] = mapped_column(String(100), server_default=text("'UTC'"))
    team: Mapped[str] = mapped_column(String(200))
    budget_cents: Mapped[int] = mapped_column(BigInteger)
    job_text: Mapped[str] = mapped_column(Text)
    source_name: Mapped[str | None] = mapped_column(String(1000))
    # When it last fired (its cron's firing time, not the clock's): a firing is claimed with
    # a conditional UPDATE of this column. The column keeps its first name, last_slot.
    last_fired: Mapped[datetime | None] = mapped_column("last_slot", DateTime)
    last_job_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Each firing's job gets it as its notify_url.
    notify_url: Mapped[str | None] = mapped_column(String(2000))


class Delivery(Base):
    """One webhook POST to make (pipeline/webhooks.py), written in the transaction that ends
    the job or crosses a spend threshold, so it outlives the process that did; sent and
    retried by the workers' and beat's notifier, never on a render's path."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # The notifier's look for what is due: pending rows by time.
        Index("ix_deliveries_due", "status", "next_at"),
        # `status JOB` lists a job's.
        Index("ix_deliveries_job", "job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # X-Imagebatch-Delivery: the same on every retry, unique across databases.
    delivery_id: Mapped[str] = mapped_column(String(36), unique=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))
    # Set on spend crossings ("job:J:spend.50", "team:B:spend.50"): unique, so each crossing
    # is told once whatever races or cap changes happen; NULL for job ends.
    once_key: Mapped[str | None] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(String(2000))
    body: Mapped[str] = mapped_column(Text)  # the exact JSON sent (and signed)
    status: Mapped[str] = mapped_column(String(20), server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # When it is next due (pending), or taken by a sender until then.
    next_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
