"""A /models catalogue that says things no price can mean: negative, zero, beyond any sum SQL
can hold, not whole cents; a max_n of 0, below, or absurd. Such a model is refused the way
an unpriced model is (its lines fail with the reason), and no bad entry stops the others."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select

from fake_upstream.app import FakeConfig, FakeServer
from pipeline.caps import MAX_PRICE_PER_IMAGE_CENTS
from pipeline.dispatch import dispatch_pending
from pipeline.models import JobItem, ModelCaps
from pipeline.runtime import start_services
from pipeline.settings import Settings
from tests.helpers import assert_books_balance, render_all, submit, summary


def model(model_id: str, **caps: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "output_modalities": ["image"],
            "image_caps": {"max_n": 2, "price_per_image_cents": 2, **caps}}


# model id -> (its entry, what the refusal says)
BAD = {
    "negative": (model("negative", price_per_image_cents=-5), "-5 is outside 1-1000000"),
    "free": (model("free", price_per_image_cents=0), "IMAGEBATCH_ALLOW_FREE_MODELS=1"),
    "huge": (model("huge", price_per_image_cents=10**30), "outside 1-1000000"),
    "past-max": (model("past-max", price_per_image_cents=MAX_PRICE_PER_IMAGE_CENTS + 1),
                 "outside 1-1000000"),
    "fraction": (model("fraction", price_per_image_cents=2.5), "not a whole number of cents"),
    "text-price": (model("text-price", price_per_image_cents="3"), "not a whole number"),
    "bool-price": (model("bool-price", price_per_image_cents=True), "not a whole number"),
    "infinite": (model("infinite", price_per_image_cents=float("inf")), "not a whole number"),
    "n-zero": (model("n-zero", max_n=0), "max_n 0 is not a whole number from 1 to 10000"),
    "n-negative": (model("n-negative", max_n=-3), "max_n -3"),
    "n-huge": (model("n-huge", max_n=10**30), "max_n"),
    "n-text": (model("n-text", max_n="4"), "max_n"),
    "inputs-negative": (model("inputs-negative", max_input_images=-1), "max_input_images"),
}
ODD_ENTRIES: list[Any] = [
    {"id": "x" * 300, "output_modalities": ["image"], "image_caps": {"price_per_image_cents": 1}},
    {"id": 12345, "output_modalities": ["image"], "image_caps": {"price_per_image_cents": 1}},
    {"id": "modalities-text", "output_modalities": "image", "image_caps": "nonsense"},
    {"id": "caps-list", "output_modalities": ["image"], "image_caps": [1, 2]},
    {"no-id": True},
]
GOOD = model("good", max_n=2, price_per_image_cents=2)


@pytest.fixture
def odd_catalogue() -> Iterator[FakeServer]:
    models = [GOOD, *(entry for entry, _ in BAD.values()), *ODD_ENTRIES]
    with FakeServer(FakeConfig(latency=0.02, keepalive_interval=0.01, models=models)) as server:
        yield server


def test_every_bad_model_is_refused_alone_and_the_rest_runs(settings: Settings,
                                                             odd_catalogue: FakeServer) -> None:
    """A job written with SQL (no CLI check first) with a line per bad model and good
    lines: each bad line fails with its model's reason, the good ones are rendered and
    charged, and a second job in the same database finishes too."""
    svc = start_services(replace(settings, api_base=odd_catalogue.base_url))
    try:
        lines = [{"custom_id": name, "model": name, "prompt": "p", "n": 3} for name in BAD]
        job = submit(svc, [*lines, {"custom_id": "ok", "model": "good", "prompt": "p", "n": 3}])
        other = submit(svc, [{"model": "good", "prompt": "q"}])
        render_all(svc, dispatch_pending(svc))
        s, o = summary(svc, job), summary(svc, other)
        assert_books_balance(svc, job)
        assert_books_balance(svc, other)
        with svc.sessions() as session:
            reasons = dict(session.execute(select(JobItem.custom_id, JobItem.error)
                                           .where(JobItem.job_id == job)).all())
            cached = set(session.scalars(select(ModelCaps.id)))
    finally:
        svc.close()
    assert (s["status"], s["items_succeeded"], s["items_failed"]) == ("partial", 1, len(BAD))
    assert (s["images"], s["spent_cents"]) == (3, 6)  # the good line: 2 calls, 3 images at 2¢
    assert (o["status"], o["spent_cents"]) == ("succeeded", 2)
    assert odd_catalogue.stats()["billed_cents"] == 8  # nothing was sent for a bad model
    for name, (_, reason) in BAD.items():
        assert reasons[name].startswith(f"model {name!r} is refused: "), reasons[name]
        assert reason in reasons[name], (name, reasons[name])
    assert reasons["ok"] is None
    # The cache keeps what could be a model's row; an id too long for it is not kept.
    assert "good" in cached and "x" * 300 not in cached


def test_free_models_run_only_when_allowed(settings: Settings, odd_catalogue: FakeServer) -> None:
    """IMAGEBATCH_ALLOW_FREE_MODELS=1 lets a model priced 0 run: its calls cost nothing, so
    the cap does not bound them (only the job's lines and the attempts rules do)."""
    svc = start_services(replace(settings, api_base=odd_catalogue.base_url,
                                 allow_free_models=True))
    try:
        s = summary(svc, _run(svc, [{"model": "free", "prompt": "p", "n": 4},
                                    {"model": "negative", "prompt": "p"}], budget=1))
    finally:
        svc.close()
    assert (s["status"], s["items_succeeded"], s["images"]) == ("partial", 1, 4)
    assert s["spent_cents"] == 0


def _run(svc: Any, lines: list[dict[str, Any]], budget: int) -> int:
    job = submit(svc, lines, budget_cents=budget)
    render_all(svc, dispatch_pending(svc))
    return job


def test_ids_no_database_can_hold_are_not_cached_and_stop_nothing(database_url: str) -> None:
    """A lone surrogate, a NUL or 300 characters in a model id: that entry is skipped (it
    can be no row's key), the others are cached and read back, on SQLite and PostgreSQL."""
    from pipeline.caps import load_caps
    from pipeline.db import make_engine, session_factory

    entries = [{"id": "bad\ud800", "image_caps": {"price_per_image_cents": 1}},
               {"id": "nul\x00", "image_caps": {"price_per_image_cents": 1}},
               {"id": "y" * 300, "image_caps": {"price_per_image_cents": 1}},
               {"id": "weird-price", "image_caps": {"price_per_image_cents": 10**30}}, GOOD]
    engine = make_engine(database_url)
    sessions = session_factory(engine)
    try:
        fetched = load_caps(sessions, "http://api/v1", lambda: entries, ttl_seconds=60)
        cached = load_caps(sessions, "http://api/v1", lambda: [], ttl_seconds=60)
    finally:
        engine.dispose()
    assert set(fetched) == set(cached) == {"good", "weird-price"}
    assert cached["weird-price"].refused and cached["good"].price_per_image_cents == 2
