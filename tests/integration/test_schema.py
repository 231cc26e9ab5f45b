"""The schema the migrations build is the one the models describe, on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pipeline.db import make_engine, upgrade_schema
from pipeline.models import Base


def test_migrations_build_the_models_schema(database_url):
    """A column or index the models name and the migrations forgot (or the reverse) would
    fail at the first statement that uses it, on a user's database and not in tests."""
    engine = make_engine(database_url)
    upgrade_schema(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        indexes = {ix["name"]: ix for ix in sa.inspect(connection).get_indexes("renders")}
    engine.dispose()
    assert differences == []
    assert "ix_renders_job_queue" in indexes

