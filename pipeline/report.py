"""Cost reports, computed from the ledger alone: calls, images, charged, unknown, released,
and the images reused (copied from an earlier render of the same seeded request) with the
money they saved: what the original paid for them (`reused` rows: images x its price)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, select
from sqlalchemy.orm import Session

from pipeline.models import LedgerEntry, LedgerKind

GROUPS = ("team", "model", "job", "day", "month")


@dataclass(frozen=True)
class ReportFilter:
    team: str | None = None
    job: int | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass
class ReportRow:
    group: str
    calls: int = 0
    images: int = 0
    charged_cents: int = 0
    unknown_cents: int = 0
    released_cents: int = 0
    reused_images: int = 0
    saved_cents: int = 0

    @property
    def spent_cents(self) -> int:
        return self.charged_cents + self.unknown_cents

    @property
    def avg_cents_per_image(self) -> float | None:
        """What each delivered image cost, unknown outcomes included: spent / images."""
        return round(self.spent_cents / self.images, 4) if self.images else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spent_cents": self.spent_cents,
                "avg_cents_per_image": self.avg_cents_per_image}


def _group_key(session: Session, by: str | None) -> ColumnElement[Any]:
    if by is None:
        return literal("all")
    if by in ("team", "model"):
        return getattr(LedgerEntry, by)
    if by == "job":
        return LedgerEntry.job_id
    fmt = {"day": ("%Y-%m-%d", "YYYY-MM-DD"), "month": ("%Y-%m", "YYYY-MM")}[by]
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(LedgerEntry.created_at, fmt[1])
    return func.strftime(fmt[0], LedgerEntry.created_at)


def _amount_of(kind: LedgerKind) -> ColumnElement[Any]:
    return func.coalesce(
        func.sum(case((LedgerEntry.kind == kind, LedgerEntry.amount_cents), else_=0)), 0
    )


def _reused(value: ColumnElement[Any]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((LedgerEntry.kind == LedgerKind.REUSED, value),
                                       else_=0)), 0)


def ledger_report(session: Session, filters: ReportFilter, by: str | None = None
                  ) -> list[ReportRow]:
    key = _group_key(session, by).label("grp")
    # A call is a reservation that asked for images: a reused render's 0-cent reservation
    # asks for none (ledger.reserve_nothing).
    called = and_(LedgerEntry.kind == LedgerKind.RESERVE, LedgerEntry.images > 0)
    query = select(
        key,
        func.coalesce(func.sum(case((called, 1), else_=0)), 0),
        func.coalesce(func.sum(
            case((LedgerEntry.kind == LedgerKind.CHARGE, LedgerEntry.images), else_=0)), 0),
        _amount_of(LedgerKind.CHARGE),
        _amount_of(LedgerKind.UNKNOWN),
        _amount_of(LedgerKind.RELEASE),
        _reused(LedgerEntry.images),
        _reused(LedgerEntry.images * LedgerEntry.price_per_image_cents),
    ).group_by(key).order_by(key)
    for column, value in (("team", filters.team), ("job_id", filters.job),
                          ("model", filters.model)):
        if value is not None:
            query = query.where(getattr(LedgerEntry, column) == value)
    if filters.since is not None:
        query = query.where(LedgerEntry.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(LedgerEntry.created_at < filters.until)
    return [
        ReportRow(str(grp), int(calls), int(images), int(charged), int(unknown), int(released),
                  int(reused), int(saved))
        for grp, calls, images, charged, unknown, released, reused, saved
        in session.execute(query)
    ]


def total_of(rows: list[ReportRow]) -> ReportRow:
    total = ReportRow("total")
    for row in rows:
        total.calls += row.calls
        total.images += row.images
        total.charged_cents += row.charged_cents
        total.unknown_cents += row.unknown_cents
        total.released_cents += row.released_cents
        total.reused_images += row.reused_images
        total.saved_cents += row.saved_cents
    return total


def parse_moment(value: str | None, option: str) -> datetime | None:
    """--since/--until: a UTC date or time (a trailing Z allowed), or ValueError naming it."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.removesuffix("Z")).replace(tzinfo=None)
    except ValueError:
        raise ValueError(f"{option} {value!r} is not a date (YYYY-MM-DD)") from None
