"""Model capabilities (image_caps from /models): parsing, and the SQL cache with its TTL."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.models import ModelCaps, utcnow


@dataclass(frozen=True)
class Caps:
    """What one model accepts. None on an axis means no limit there (price: unknown)."""

    model: str
    modalities: tuple[str, ...] = ("image",)
    max_n: int | None = None
    aspect_ratios: tuple[str, ...] | None = None
    qualities: tuple[str, ...] | None = None
    sizes: tuple[str, ...] | None = None
    max_input_images: int | None = None
    price_per_image_cents: int | None = None


def caps_from_entry(entry: Mapping[str, Any]) -> Caps | None:
    """A /models entry as Caps, or None for a model that makes no media (a chat model)."""
    modalities = tuple(str(m) for m in entry.get("output_modalities") or ())
    raw = entry.get("image_caps")
    if not isinstance(raw, Mapping):
        if "image" not in modalities:
            return None
        raw = {}
    return Caps(
        model=str(entry["id"]),
        modalities=modalities or ("image",),
        max_n=_int_or_none(raw.get("max_n")),
        aspect_ratios=_strings_or_none(raw.get("aspect_ratios")),
        qualities=_strings_or_none(raw.get("qualities")),
        sizes=_strings_or_none(raw.get("sizes")),
        max_input_images=_int_or_none(raw.get("max_input_images")),
        price_per_image_cents=_int_or_none(raw.get("price_per_image_cents")),
    )


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _strings_or_none(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list | tuple):
        return None
    return tuple(str(v) for v in value)


def caps_by_model(entries: list[Mapping[str, Any]]) -> dict[str, Caps]:
    found = (caps_from_entry(e) for e in entries if isinstance(e, Mapping) and "id" in e)
    return {c.model: c for c in found if c is not None}


ModelsFetcher = Callable[[], list[dict[str, Any]]]


def load_caps(
    sessions: sessionmaker[Session],
    api_base: str,
    fetch: ModelsFetcher,
    *,
    ttl_seconds: int,
    refresh: bool = False,
) -> dict[str, Caps]:
    """Caps for every model, from the SQL cache while fresh, else from /models (then cached)."""
    if not refresh:
        cached = _cached_entries(sessions, api_base, ttl_seconds)
        if cached is not None:
            return caps_by_model(cached)
    entries = fetch()
    _store_entries(sessions, api_base, entries)
    return caps_by_model(entries)


def _cached_entries(
    sessions: sessionmaker[Session], api_base: str, ttl_seconds: int
) -> list[dict[str, Any]] | None:
    with sessions() as session:
        rows = session.scalars(select(ModelCaps).where(ModelCaps.api_base == api_base)).all()
    if not rows:
        return None
    oldest = min(r.fetched_at for r in rows)
    if utcnow() - oldest > timedelta(seconds=ttl_seconds):
        return None
    return [json.loads(r.entry) for r in rows]


def _store_entries(
    sessions: sessionmaker[Session], api_base: str, entries: list[dict[str, Any]]
) -> None:
    now = utcnow()
    try:
        with transaction(sessions) as session:
            session.execute(delete(ModelCaps).where(ModelCaps.api_base == api_base))
            seen: set[str] = set()
            for entry in entries:
                if not isinstance(entry, Mapping) or "id" not in entry or entry["id"] in seen:
                    continue
                seen.add(str(entry["id"]))
                session.add(
                    ModelCaps(id=str(entry["id"]), api_base=api_base, entry=json.dumps(entry),
                              fetched_at=now)
                )
    except IntegrityError:
        # Another process (a second dispatcher, a worker's ticker) cached the same /models
        # answer in the same moment (PostgreSQL: our DELETE did not see its uncommitted rows).
        # Its rows are as fresh as ours; the caller uses the entries it fetched either way.
        return
