"""Model capabilities (image_caps from /models): parsing, and the SQL cache with its TTL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeGuard

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import transaction
from pipeline.models import ModelCaps, utcnow
from pipeline.redact import redact_url

if TYPE_CHECKING:
    from pipeline.settings import Settings

# The largest price per image we believe (1,000,000 cents: $10,000). A catalogue can say
# anything; a price past this is a mistake (or hostile), and it must stay far inside SQL's
# BIGINT once multiplied by n (at most 10,000) and summed over a job's renders.
MAX_PRICE_PER_IMAGE_CENTS = 1_000_000
# The most images one request may ask for, as the job lines' own bound on n.
MAX_MAX_N = 10_000
# Model ids are stored in VARCHAR(200) columns (renders, ledger, the cache).
MAX_MODEL_ID = 200


@dataclass(frozen=True)
class Caps:
    """What one model accepts. None on an axis means no limit there (price: unknown).

    `refused` says why the model cannot run at all (a price or max_n the catalogue gives
    that cannot be meant); such a model also has no price, so nothing can be priced on it."""

    model: str
    modalities: tuple[str, ...] = ("image",)
    max_n: int | None = None
    aspect_ratios: tuple[str, ...] | None = None
    qualities: tuple[str, ...] | None = None
    sizes: tuple[str, ...] | None = None
    max_input_images: int | None = None
    price_per_image_cents: int | None = None
    refused: str | None = None


def caps_from_entry(entry: Mapping[str, Any], *, allow_free: bool = False) -> Caps | None:
    """A /models entry as Caps, or None for a model that makes no media (a chat model) or
    whose id cannot be a model name. Never raises, whatever the entry holds."""
    model = entry.get("id")
    if not _usable_id(model):
        return None
    modalities = _strings_or_none(entry.get("output_modalities")) or ()
    raw = entry.get("image_caps")
    if not isinstance(raw, Mapping):
        if "image" not in modalities:
            return None
        raw = {}
    caps = Caps(
        model=model,
        modalities=modalities or ("image",),
        max_n=_int_or_none(raw.get("max_n")),
        aspect_ratios=_strings_or_none(raw.get("aspect_ratios")),
        qualities=_strings_or_none(raw.get("qualities")),
        sizes=_strings_or_none(raw.get("sizes")),
        max_input_images=_int_or_none(raw.get("max_input_images")),
        price_per_image_cents=_int_or_none(raw.get("price_per_image_cents")),
    )
    problem = caps_problem(raw, allow_free=allow_free)
    if problem is None:
        return caps
    # No price and no max_n: whatever reads these caps can neither price nor split on them.
    return replace(caps, max_n=None, price_per_image_cents=None,
                   refused=f"model {model!r} is refused: {problem}")


def _usable_id(model: object) -> TypeGuard[str]:
    """An id that can be a row's key: text that fits the column, with no control character
    (PostgreSQL refuses NUL) or lone surrogate (not UTF-8, so no database can store it)."""
    return (isinstance(model, str) and bool(model.strip()) and len(model) <= MAX_MODEL_ID
            and model.isprintable())


def caps_problem(raw: Mapping[str, Any], *, allow_free: bool = False) -> str | None:
    """Why a model's image_caps cannot be trusted, or None. A missing (or null) field is no
    limit on its axis, as UPSTREAM.md says; a field that is there must make sense."""
    price = raw.get("price_per_image_cents")
    if price is not None:
        cents = _int_or_none(price)
        lowest = 0 if allow_free else 1
        if cents is None:
            return f"its price_per_image_cents {_shown(price)} is not a whole number of cents"
        if cents == 0 and not allow_free:
            return ("its price_per_image_cents is 0: a free model is not bounded by any cap "
                    "(IMAGEBATCH_ALLOW_FREE_MODELS=1 allows it)")
        if not lowest <= cents <= MAX_PRICE_PER_IMAGE_CENTS:
            return (f"its price_per_image_cents {_shown(price)} is outside "
                    f"{lowest}-{MAX_PRICE_PER_IMAGE_CENTS}")
    for name, lowest, highest in (("max_n", 1, MAX_MAX_N), ("max_input_images", 0, None)):
        value = raw.get(name)
        if value is None:
            continue
        number = _int_or_none(value)
        if number is None or number < lowest or (highest is not None and number > highest):
            bounds = f"from {lowest} to {highest}" if highest else f"of {lowest} or more"
            return f"its {name} {_shown(value)} is not a whole number {bounds}"
    return None


def _shown(value: object) -> str:
    """A catalogue value for a message: short, whatever it is."""
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


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


def caps_by_model(entries: list[Mapping[str, Any]], *, allow_free: bool = False
                  ) -> dict[str, Caps]:
    """Every usable entry's caps (a bad entry is refused or skipped alone, never the list)."""
    found = (caps_from_entry(e, allow_free=allow_free) for e in entries if isinstance(e, Mapping))
    return {c.model: c for c in found if c is not None}


ModelsFetcher = Callable[[], list[dict[str, Any]]]


def load_caps(
    sessions: sessionmaker[Session],
    api_base: str,
    fetch: ModelsFetcher,
    *,
    ttl_seconds: int,
    refresh: bool = False,
    allow_free: bool = False,
) -> dict[str, Caps]:
    """Caps for every model, from the SQL cache while fresh, else from /models (then cached).
    The cache is keyed by the API base without its credentials (they never reach SQL)."""
    cache_key = api_base_key(api_base)
    if not refresh:
        cached = _cached_entries(sessions, cache_key, ttl_seconds)
        if cached is not None:
            return caps_by_model(cached, allow_free=allow_free)
    entries = fetch()
    _store_entries(sessions, cache_key, entries)
    return caps_by_model(entries, allow_free=allow_free)


def current_caps(settings: Settings, sessions: sessionmaker[Session],
                 fetch: ModelsFetcher | None = None, *, refresh: bool = False
                 ) -> dict[str, Caps]:
    """The caps every path reads (a command, the dispatcher, a schedule's check): the
    settings' API base, `MODELS_TTL` and `ALLOW_FREE_MODELS`. `fetch` asks /models (a
    worker's own client on its loop); by default a client of its own, opened and closed."""
    return load_caps(sessions, settings.api_base, fetch or (lambda: fetch_models(settings)),
                     ttl_seconds=settings.models_ttl, refresh=refresh,
                     allow_free=settings.allow_free_models)


def fetch_models(settings: Settings) -> list[dict[str, Any]]:
    """GET /models once, outside any worker (a command that checks a file)."""
    import asyncio

    from pipeline.runtime import build_upstream

    async def fetch() -> list[dict[str, Any]]:
        client = build_upstream(settings)
        try:
            return await client.list_models()
        finally:
            await client.aclose()

    return asyncio.run(fetch())


def api_base_key(api_base: str) -> str:
    """The API base as the cache's key: credentials and query masked (redact_url), and
    short enough for its VARCHAR(500) column (a longer one keeps a digest of the rest)."""
    shown = redact_url(api_base)
    if len(shown) <= 500:
        return shown
    return shown[:436] + "…" + hashlib.sha256(shown.encode()).hexdigest()


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
                # The id is the row's key: one that is no model name (see caps_from_entry)
                # is not kept, so no entry can fail the cache's INSERT for all the others.
                model = entry.get("id") if isinstance(entry, Mapping) else None
                if not _usable_id(model) or model in seen:
                    continue
                seen.add(model)
                session.add(ModelCaps(id=model, api_base=api_base, entry=json.dumps(entry),
                                      fetched_at=now))
    except IntegrityError:
        # Another process (a second dispatcher, a worker's ticker) cached the same /models
        # answer in the same moment (PostgreSQL: our DELETE did not see its uncommitted rows).
        # Its rows are as fresh as ours; the caller uses the entries it fetched either way.
        return
