"""What `imagebatch serve` shows, read from SQL: the jobs, a job's files and failed items page
by page, team budgets and spend per day. Read-only; each page costs a few indexed statements
whatever the job's size (keyset paging, never OFFSET, never a count of a job's rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session

from pipeline.models import (
    Image,
    ItemStatus,
    Job,
    JobItem,
    JobStatus,
    LedgerEntry,
    LedgerKind,
    ModelCaps,
    Render,
    status_is,
    utcnow,
)
from pipeline.teams import TeamState, list_teams

__all__ = [
    "FILES",
    "ITEM_STATUSES",
    "DaySpend",
    "FilePage",
    "FileRow",
    "ItemPage",
    "ItemRow",
    "JobRow",
    "StoredFile",
    "eta_seconds",
    "job_files",
    "job_items",
    "job_row",
    "known_models",
    "list_job_rows",
    "spend_by_day",
    "stored_file",
    "team_budgets",
]

# The gallery's "status" filter: the stored files (of the renders that succeeded), or the
# items in one of these states, with their reasons.
FILES = "files"
ITEM_STATUSES = (ItemStatus.FAILED, ItemStatus.CANCELLED, ItemStatus.RUNNING,
                 ItemStatus.PENDING)
MEDIA_MODALITIES = frozenset({"image", "video", "audio"})
PAGE_MAX = 200  # rows a page may ask for: a page is bounded whatever the URL says


@dataclass(frozen=True)
class JobRow:
    id: int
    name: str | None
    team: str
    status: str
    items_total: int
    items_done: int  # succeeded, failed or cancelled
    items_failed: int
    files: int
    spent_cents: int
    reserved_cents: int
    budget_cents: int
    error: str | None
    created_at: datetime | None
    eta_seconds: int | None  # while running, from the pace since it started

    @property
    def progress(self) -> float:
        """0..1: items ended over items planned (0 while nothing is planned)."""
        return min(1.0, self.items_done / self.items_total) if self.items_total else 0.0


def eta_seconds(done: int, total: int, started_at: datetime | None, now: datetime
                ) -> int | None:
    """Seconds left at the pace so far (items ended per second since the job started);
    None until one item has ended, or without a start."""
    if started_at is None or done <= 0 or total <= done:
        return None
    elapsed = (now - started_at).total_seconds()
    if elapsed <= 0:
        return None
    return round((total - done) * elapsed / done)


def _job_row(job: Job, now: datetime) -> JobRow:
    done = job.items_succeeded + job.items_failed + job.items_cancelled
    running = job.status == JobStatus.RUNNING
    return JobRow(
        id=job.id, name=job.name, team=job.team, status=job.status,
        items_total=job.items_total, items_done=done, items_failed=job.items_failed,
        files=job.images, spent_cents=job.spent_cents, reserved_cents=job.reserved_cents,
        budget_cents=job.budget_cents, error=job.error, created_at=job.created_at,
        eta_seconds=eta_seconds(done, job.items_total, job.started_at, now) if running else None,
    )


def list_job_rows(session: Session, *, limit: int = 50, before: int | None = None
                  ) -> list[JobRow]:
    """The newest jobs first (ids below `before`), from their counters: one row each."""
    query = select(Job).order_by(Job.id.desc()).limit(max(1, min(limit, PAGE_MAX)))
    if before is not None:
        query = query.where(Job.id < before)
    now = utcnow()
    return [_job_row(job, now) for job in session.scalars(query)]


def job_row(session: Session, job_id: int) -> JobRow | None:
    job = session.get(Job, job_id)
    return None if job is None else _job_row(job, utcnow())


# --- a job's files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRow:
    id: int  # the image row's: the media route's key
    line: int
    custom_id: str | None
    prompt: str | None
    revised_prompt: str | None
    seed: int | None
    model: str
    size: str | None  # as asked: size, or aspect ratio / resolution
    width: int | None
    height: int | None
    content_type: str
    bytes: int
    cost_cents: int

    @property
    def kind(self) -> str:
        """image, video, audio or file: how the page shows it."""
        major = self.content_type.split("/", 1)[0]
        return major if major in ("image", "video", "audio") else "file"


@dataclass(frozen=True)
class FilePage:
    files: list[FileRow]
    next_after: int | None  # the `after` of the next page; None on the last


def _request_fields(body: str | None) -> tuple[str | None, str | None]:
    """The prompt and the size asked for, from an item's request body (JSON text)."""
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        return None, None
    if not isinstance(request, dict):
        return None, None
    prompt = request.get("prompt")
    size = next((str(request[key]) for key in ("size", "aspect_ratio", "resolution")
                 if request.get(key) not in (None, "")), None)
    return (prompt if isinstance(prompt, str) else None), size


def _page_size(limit: int) -> int:
    return max(1, min(limit, PAGE_MAX))


def job_files(session: Session, job_id: int, *, after: int | None = None,
              model: str | None = None, limit: int = 60) -> FilePage:
    """One page of a job's stored files in the order they were stored, keyset-paged on the
    image id through ix_images_job_file (job_id, id): a late page of a 100,000-file job
    reads the same few index entries as the first page of a small one."""
    size = _page_size(limit)
    query = (
        select(Image.id, Image.seed, Image.revised_prompt, Image.width, Image.height,
               Image.content_type, Image.bytes, Image.cost_cents, Render.model,
               JobItem.line, JobItem.custom_id, JobItem.body)
        .join(Render, Render.id == Image.render_id)
        .join(JobItem, JobItem.id == Render.item_id)
        .where(_one_job(session, job_id), Image.id > (after or 0))
        .order_by(Image.job_id, Image.id)
        .limit(size + 1)
    )
    if model:
        query = query.where(Render.model == model)
    rows = session.execute(query).all()
    files = []
    for row in rows[:size]:
        prompt, asked = _request_fields(row.body)
        files.append(FileRow(
            id=row.id, line=row.line, custom_id=row.custom_id, prompt=prompt,
            revised_prompt=row.revised_prompt, seed=row.seed, model=row.model, size=asked,
            width=row.width, height=row.height, content_type=row.content_type,
            bytes=row.bytes, cost_cents=row.cost_cents,
        ))
    return FilePage(files, files[-1].id if len(rows) > size else None)


def _one_job(session: Session, job_id: int) -> ColumnElement[bool]:
    """`images.job_id = J`, written so that each database pages through ix_images_job_file.
    PostgreSQL gets a range of one: told `job_id = J`, it knows the id order is the primary
    key's and walks that, filtering on job_id through every older job's files (86 ms for a
    100,000-file job's first page after 200,000 older files, 0.2 ms this way). SQLite picks
    the right index from `=` and, given the range, a worse one (bench/gallery_pages.py)."""
    if session.get_bind().dialect.name == "postgresql":
        return Image.job_id.between(job_id, job_id)
    return Image.job_id == job_id


# --- a job's items in one state (failed, with their reasons) ---------------------------------


@dataclass(frozen=True)
class ItemRow:
    line: int
    custom_id: str | None
    prompt: str | None
    size: str | None
    status: str
    reason: str | None  # the item's error, else its last render's


@dataclass(frozen=True)
class ItemPage:
    items: list[ItemRow]
    next_after: int | None  # the line after which the next page starts


def job_items(session: Session, job_id: int, status: str, *, after: int | None = None,
              model: str | None = None, limit: int = 60) -> ItemPage:
    """One page of a job's items in `status` (failed, cancelled, running, pending), by
    line, through ix_job_items_job_status (job_id, status, line). An item failed by one of
    its renders gets that render's reason."""
    if status not in ITEM_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ITEM_STATUSES)}, not {status!r}")
    size = _page_size(limit)
    render_error = (
        select(Render.error).where(Render.item_id == JobItem.id, Render.error.is_not(None))
        .order_by(Render.render_index).limit(1).scalar_subquery()
    )
    query = (
        select(JobItem.line, JobItem.custom_id, JobItem.body, JobItem.status,
               func.coalesce(JobItem.error, render_error).label("reason"))
        # The status as a literal: PostgreSQL's index holds only what did not succeed.
        .where(JobItem.job_id == job_id, status_is(JobItem.status, status),
               JobItem.line > (after if after is not None else -1))
        .order_by(JobItem.line)
        .limit(size + 1)
    )
    if model:
        query = query.where(exists().where(and_(Render.item_id == JobItem.id,
                                                Render.model == model)))
    rows = session.execute(query).all()
    items = []
    for row in rows[:size]:
        prompt, asked = _request_fields(row.body)
        items.append(ItemRow(line=row.line, custom_id=row.custom_id, prompt=prompt,
                             size=asked, status=row.status, reason=row.reason))
    return ItemPage(items, items[-1].line if len(rows) > size else None)


@dataclass(frozen=True)
class StoredFile:
    key: str  # the storage key, relative to the store's root or prefix
    content_type: str


def stored_file(session: Session, image_id: int) -> StoredFile | None:
    """Where a file's bytes are: only keys the pipeline stored are ever served."""
    row = session.execute(select(Image.key, Image.content_type).where(Image.id == image_id)
                          ).first()
    return None if row is None else StoredFile(row.key, row.content_type)


def known_models(session: Session) -> list[str]:
    """The media models the model cache knows (a small table), for the gallery's model
    filter: listing a job's own models would read all its renders."""
    models = set()
    for model_id, entry in session.execute(select(ModelCaps.id, ModelCaps.entry)):
        try:
            modalities = json.loads(entry).get("output_modalities") or ()
        except (ValueError, AttributeError):
            modalities = ()
        if not isinstance(modalities, list) or MEDIA_MODALITIES.intersection(
                m for m in modalities if isinstance(m, str)):
            models.add(model_id)  # media, or a model we cannot tell: shown
    return sorted(models)


# --- money -----------------------------------------------------------------------------------


def team_budgets(session: Session) -> list[TeamState]:
    """Each team's budget for its current period: limit, spent, reserved, left."""
    return list_teams(session)


@dataclass(frozen=True)
class DaySpend:
    day: str  # YYYY-MM-DD (UTC)
    key: str  # the team or the model
    spent_cents: int  # charged plus unknown: what counts against budgets


def spend_by_day(session: Session, by: str, *, days: int = 30,
                 now: datetime | None = None) -> list[DaySpend]:
    """Spend per UTC day over the last `days` days, by team or by model, from the ledger
    alone (charge and unknown rows), oldest day first."""
    if by not in ("team", "model"):
        raise ValueError(f"by must be team or model, not {by!r}")
    since = (now or utcnow()).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=max(1, days) - 1)
    day = _day_of(session, LedgerEntry.created_at).label("day")
    key = getattr(LedgerEntry, by).label("key")
    query = (
        select(day, key, func.sum(LedgerEntry.amount_cents))
        .where(LedgerEntry.kind.in_((LedgerKind.CHARGE, LedgerKind.UNKNOWN)),
               LedgerEntry.created_at >= since)
        .group_by(day, key)
        .order_by(day, key)
    )
    return [DaySpend(str(d), str(k), int(cents or 0)) for d, k, cents in session.execute(query)]


def _day_of(session: Session, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(column, "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)
