"""Jobs: settling an item reads that item's renders only; status reads the job's counters."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from pipeline import queries
from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.runtime import Services
from tests.helpers import (
    assert_books_balance,
    assert_status_counts,
    render_all,
    submit,
    summary,
)

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}
ONE = {"model": "flux-2-klein-4b", "prompt": "an otter"}


def _rows_read(plan: dict[str, Any], indexes: set[str]) -> int:
    """Index entries a plan read through `indexes`, filtered-out rows included."""
    here = 0
    if plan.get("Index Name") in indexes:
        here = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0))
        here *= plan.get("Actual Loops", 1)
    return here + sum(_rows_read(child, indexes) for child in plan.get("Plans", ()))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_settling_an_item_reads_its_own_renders_only(
    svc: Services,
) -> None:
    """Settling one item reads its own renders, not every render of the database in some
    status: the statement asked "any failed render of this item?" and "any open one?" in a
    form PostgreSQL could answer through the status index, filtering by item afterwards.
    It did: here for the failed ones; in the benchmark for the open ones (3,160 index
    entries read per settlement of a 4,000-render job)."""
    failed = submit(svc, [FLUX] * 1500)
    dispatch_pending(svc)
    with transaction(svc.sessions) as session:
        session.execute(sa.text("UPDATE renders SET status = 'failed' WHERE job_id = :j"),
                        {"j": failed})
    job = submit(svc, [FLUX] * 10)
    dispatch_pending(svc)
    with svc.engine.connect() as db:
        render_id, item_id = db.execute(sa.text(
            "SELECT id, item_id FROM renders WHERE job_id = :j ORDER BY id LIMIT 1"),
            {"j": job}).one()
        db.execute(sa.text("UPDATE renders SET status = 'cancelled' WHERE id = :r"),
                   {"r": render_id})
        sent: list[tuple[str, Any]] = []

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
            sent.append((statement, parameters))

        sa.event.listen(db, "before_cursor_execute", capture)
        queries.close_item(db, item_id)  # as the pipeline sends it
        sa.event.remove(db, "before_cursor_execute", capture)
        statement, parameters = sent[-1]
        explained = db.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}",
                                       parameters).scalar_one()
        plan = (json.loads(explained) if isinstance(explained, str) else explained)[0]["Plan"]
        status = db.execute(sa.text("SELECT status FROM job_items WHERE id = :i"),
                            {"i": item_id}).scalar_one()
        indexes = db.execute(sa.text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'renders'")).scalars().all()
        db.rollback()
    assert status == "cancelled"
    assert _rows_read(plan, set(indexes)) <= 8


def test_status_counts_items_and_files_as_they_end_without_reading_the_job(svc, fake):
    """`status` reads the job's row: its item and file counts move with each render (a
    million-line job shows its progress as fast as a small one) and equal the rows."""
    job_id = submit(svc, [{"model": "flux-2-dev", "prompt": "p", "n": 6}, ONE, ONE,
                          {"model": "nope", "prompt": "p"}])
    first, *rest = dispatch_pending(svc)
    s = summary(svc, job_id)
    assert (s["items_total"], s["items_failed"], s["items_succeeded"], s["images"]) == (4, 1, 0, 0)
    render_all(svc, [first])
    with svc.sessions() as session:
        assert_status_counts(session, job_id)
    render_all(svc, rest)
    s = summary(svc, job_id)
    assert (s["status"], s["items_succeeded"], s["items_failed"], s["images"]) == (
        "partial", 3, 1, 8)
    assert_books_balance(svc, job_id)
