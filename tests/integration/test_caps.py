"""The /models answer is cached in SQL and fetched again after its TTL or on request."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from pipeline.caps import load_caps
from pipeline.db import make_engine, session_factory, transaction, upgrade_schema
from pipeline.models import ModelCaps, utcnow

ENTRIES = [{"id": "m", "output_modalities": ["image"],
            "image_caps": {"max_n": 2, "price_per_image_cents": 7}}]


def test_caps_come_from_sql_until_the_ttl_runs_out(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade_schema(engine)
    sessions = session_factory(engine)
    fetches: list[int] = []

    def fetch() -> list[dict]:
        fetches.append(1)
        return ENTRIES

    def load(**kwargs: bool) -> dict:
        return load_caps(sessions, "http://api/v1", fetch, ttl_seconds=60, **kwargs)

    assert load()["m"].price_per_image_cents == 7
    assert load()["m"].max_n == 2
    assert len(fetches) == 1  # the second came from SQL
    load(refresh=True)
    assert len(fetches) == 2
    with transaction(sessions) as session:
        session.execute(update(ModelCaps).values(fetched_at=utcnow() - timedelta(seconds=61)))
    load()
    assert len(fetches) == 3
    other_base = load_caps(sessions, "http://other/v1", fetch, ttl_seconds=60)
    assert "m" in other_base and len(fetches) == 4  # caches are per API base
