"""Jobs written by another program with plain SQL (the README's exact statements) are picked
up, validated and planned like CLI jobs; a schema that is behind is refused."""

from __future__ import annotations

import json
import re
import sqlite3

import sqlalchemy as sa

from pipeline.dispatch import dispatch_pending
from pipeline.jobs import job_summary
from tests import ROOT
from tests.helpers import render_all


def readme_sql(dialect: str) -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sql\n-- (\w+)\n(.*?)```", text, re.S)
    return next(body for name, body in blocks if name == dialect)


def run_readme_sql(database_url: str) -> None:
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        connection.executescript(readme_sql("sqlite"))
        connection.close()
        return
    import psycopg

    url = sa.engine.make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(url.render_as_string(hide_password=False)) as connection:
        connection.execute(readme_sql("postgresql"))


def test_readme_sql_jobs_are_planned_and_rendered(svc, fake):
    run_readme_sql(svc.settings.database_url)
    run_readme_sql(svc.settings.database_url)  # a second job: ids must not mix
    render_all(svc, dispatch_pending(svc))
    with svc.sessions() as session:
        jobs = [job_summary(session, job_id) for job_id in (1, 2)]
    for job in jobs:
        assert (job["status"], job["team"], job["images"], job["spent_cents"]) == (
            "succeeded", "data", 3, 9)
    assert fake.stats()["billed_cents"] == 18


def test_invalid_sql_items_fail_with_their_reason_and_the_rest_runs(svc, fake):
    engine = sa.create_engine(svc.settings.database_url)
    with engine.begin() as connection:
        job_id = connection.execute(sa.text(
            "INSERT INTO jobs (team, name, budget_cents, status) "
            "VALUES ('t', 'x', 100, 'pending') RETURNING id")).scalar_one()
        rows = [(1, '{"model": "flux-2-dev", "prompt": "ok"}'), (2, "{not json"),
                (3, '{"model": "flux-2-dev", "prompt": "bad", "aspect_ratio": "2:1"}'),
                (4, '{"model": "flux-2-dev"}')]
        for line, body in rows:
            connection.execute(sa.text(
                "INSERT INTO job_items (job_id, line, body) VALUES (:j, :l, :b)"),
                {"j": job_id, "l": line, "b": body})
    engine.dispose()
    render_all(svc, dispatch_pending(svc))
    with svc.sessions() as session:
        job = job_summary(session, job_id)
        from pipeline.jobs import item_errors

        errors = {e["line"]: e["error"] for e in item_errors(session, job_id)}
    assert (job["status"], job["items_succeeded"], job["items_failed"]) == ("partial", 1, 3)
    assert "not valid JSON" in errors[2]
    assert "aspect_ratio '2:1'" in errors[3]
    assert errors[4] == "missing prompt"


def test_upgrading_an_existing_database_counts_its_open_renders(svc, fake):
    """Revision 0002 adds jobs.open_renders: jobs already running keep closing correctly."""
    from alembic import command

    from pipeline.db import _alembic_config

    run_readme_sql(svc.settings.database_url)
    planned = dispatch_pending(svc)
    engine = svc.engine
    with engine.begin() as connection:
        command.downgrade(_alembic_config(connection), "0001")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE renders SET status = 'succeeded' WHERE id = :id"),
                           {"id": planned[0]})
    with engine.begin() as connection:
        command.upgrade(_alembic_config(connection), "head")
    with engine.connect() as connection:
        counted = connection.execute(sa.text("SELECT open_renders FROM jobs")).scalar_one()
    assert counted == len(planned) - 1
    render_all(svc, planned[1:])
    with svc.sessions() as session:
        summary = job_summary(session, 1)
    assert summary["finished_at"] is not None  # the count reached zero with the last render


def insert_sql_job(database_url: str, bodies: list[str], budget_cents: int = 1_000) -> int:
    """A job written the way another program would: plain INSERTs, one item per body."""
    engine = sa.create_engine(database_url)
    with engine.begin() as connection:
        job_id = connection.execute(sa.text(
            "INSERT INTO jobs (team, name, budget_cents, status) "
            "VALUES ('t', 'sql', :b, 'pending') RETURNING id"), {"b": budget_cents}).scalar_one()
        for line, body in enumerate(bodies, start=1):
            connection.execute(sa.text(
                "INSERT INTO job_items (job_id, line, body) VALUES (:j, :l, :b)"),
                {"j": job_id, "l": line, "b": body})
    engine.dispose()
    return job_id


def errors_of(svc, job_id: int) -> dict[int, str]:
    from pipeline.jobs import item_errors

    with svc.sessions() as session:
        return {e["line"]: e["error"] for e in item_errors(session, job_id)}


def test_sql_items_sql_cannot_hold_fail_alone_and_other_jobs_finish(svc, fake):
    """Issue 16 item 1: a seed of 2**70 in a row written with SQL made the dispatcher fail
    every second ("Python int too large to convert to SQLite INTEGER") and every other job
    stopped. Now each such item fails with its reason, the rest of its job runs, and a second
    job in the same database finishes."""
    from tests.helpers import assert_books_balance

    ok = '{"model": "flux-2-dev", "prompt": "fine"}'
    poisoned = insert_sql_job(svc.settings.database_url, [
        ok,
        '{"model": "flux-2-dev", "prompt": "p", "seed": ' + str(2**70) + "}",
        '{"model": "flux-2-dev", "prompt": "p", "n": 4, "seed": 9223372036854775806}',
        '{"model": "flux-2-dev", "prompt": "p", "n": ' + str(2**64) + "}",
        '{"model": "flux-2-dev", "prompt": "a lone \\ud800 surrogate"}',
        '{"model": "flux-2-dev", "prompt": "p", "guidance": NaN}',
        json.dumps({"model": "m" * 300, "prompt": "p"}),
        '[' * 5000 + ']' * 5000,
        ok,
    ])
    other = insert_sql_job(svc.settings.database_url, [ok, ok])
    render_all(svc, dispatch_pending(svc))
    errors = errors_of(svc, poisoned)
    assert "seed must be an integer from 0 to 9223372036854775807" in errors[2]
    assert "seed must be an integer from 0 to 9223372036854775804 with n 4" in errors[3]
    assert "n must be an integer from 1 to 10000" in errors[4]
    assert "prompt holds a lone surrogate (\\ud800)" in errors[5]
    assert "NaN is not a number" in errors[6]
    assert "model is 300 characters long, more than 200" in errors[7]
    assert "nested deeper than" in errors[8]
    with svc.sessions() as session:
        first, second = job_summary(session, poisoned), job_summary(session, other)
    assert (first["status"], first["items_succeeded"], first["items_failed"]) == (
        "partial", 2, 7)
    assert (second["status"], second["images"], second["spent_cents"]) == ("succeeded", 2, 6)
    assert fake.stats()["billed_cents"] == 12
    for job_id in (poisoned, other):
        assert_books_balance(svc, job_id)


def test_a_chunk_sql_refuses_is_planned_item_by_item_and_other_jobs_finish(tmp_path,
                                                                          database_url):
    """Whatever value gets past the line checks and SQL then refuses (here a catalogue price
    of 10**30 cents, beyond BIGINT, if caps let it through), it fails its own item: the rest
    of its job and every other job still run."""
    from fake_upstream.app import FakeConfig, FakeServer
    from fake_upstream.catalog import MODELS
    from pipeline.runtime import start_services
    from tests.conftest import make_settings
    from tests.helpers import assert_books_balance

    huge = {"id": "huge", "object": "model", "output_modalities": ["image"],
            "image_caps": {"max_n": 1, "price_per_image_cents": 10**30}}
    config = FakeConfig(latency=0.05, keepalive_interval=0.02, models=[*MODELS, huge])
    with FakeServer(config) as server:
        svc = start_services(make_settings(tmp_path / "data", server.base_url,
                                           database_url=database_url))
        try:
            ok = '{"model": "flux-2-dev", "prompt": "fine"}'
            poisoned = insert_sql_job(database_url, [ok, '{"model": "huge", "prompt": "p"}', ok])
            other = insert_sql_job(database_url, [ok])
            render_all(svc, dispatch_pending(svc))
            with svc.sessions() as session:
                first, second = job_summary(session, poisoned), job_summary(session, other)
            assert errors_of(svc, poisoned)[2]  # failed, with a reason
            assert (first["status"], first["items_succeeded"], first["items_failed"]) == (
                "partial", 2, 1)
            assert (second["status"], second["spent_cents"]) == ("succeeded", 3)
            assert server.stats()["billed_cents"] == 9
            for job_id in (poisoned, other):
                assert_books_balance(svc, job_id)
        finally:
            svc.close()
