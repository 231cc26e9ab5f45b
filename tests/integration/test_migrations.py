"""Migration 0011 on a database that already holds a job: rows, names and grants survive the
rewrite of the per-render tables (PostgreSQL), and the request id column comes and goes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from pipeline.db import _alembic_config

TABLES = ("job_items", "renders", "attempts", "ledger", "images")
# One job as the pipeline leaves it (0010's columns), with a render that used two attempts.
ROWS = [
    "INSERT INTO jobs (id, team, budget_cents, status, source) "
    "VALUES (7, 'default', 500, 'succeeded', 'file')",
    "INSERT INTO job_items (id, job_id, line, custom_id, body, metadata, status) VALUES "
    "(70, 7, 1, 'otter', '{\"model\": \"flux-2-dev\", \"prompt\": \"an otter\", \"seed\": 4}',"
    " '{\"split\": \"train\"}', 'succeeded')",
    "INSERT INTO renders (id, job_id, item_id, render_index, model, n, seed, "
    "price_per_image_cents, status, attempts, retry_from, enqueued_at, deliveries, "
    "request_key) VALUES (700, 7, 70, 0, 'flux-2-dev', 1, 4, 3, 'succeeded', 2, 0, "
    "'2026-12-01 10:00:00', 2, 9007199254740993)",
    "INSERT INTO attempts (id, render_id, number, outcome, amount_cents, team, "
    "price_per_image_cents, http_status, error, started_at, sent_at, settled_at) VALUES "
    "(7000, 700, 1, 'unknown', 3, 'default', 3, NULL, 'stream cut', '2026-12-01 10:00:01', "
    "'2026-12-01 10:00:01', '2026-12-01 10:00:09'), "
    "(7001, 700, 2, 'charged', 3, 'default', 3, 200, NULL, '2026-12-01 10:00:10', "
    "'2026-12-01 10:00:10', '2026-12-01 10:00:12')",
    "INSERT INTO ledger (id, job_id, render_id, attempt_id, team, model, kind, amount_cents, "
    "images, price_per_image_cents, created_at) VALUES "
    "(1, 7, 700, 7000, 'default', 'flux-2-dev', 'reserve', 3, 1, 3, '2026-12-01 10:00:01'), "
    "(2, 7, 700, 7000, 'default', 'flux-2-dev', 'unknown', 3, 1, 3, '2026-12-01 10:00:09'), "
    "(3, 7, 700, 7001, 'default', 'flux-2-dev', 'reserve', 3, 1, 3, '2026-12-01 10:00:10'), "
    "(4, 7, 700, 7001, 'default', 'flux-2-dev', 'charge', 3, 1, 3, '2026-12-01 10:00:12')",
    "INSERT INTO images (id, job_id, render_id, image_index, key, content_type, bytes, sha256, "
    "width, height, seed, revised_prompt, cost_cents) VALUES (70000, 7, 700, 0, "
    "'job-000007/line-00001/r000-i00.png', 'image/png', 2048, {digest}, 1024, 768, 4, "
    "'an otter, swimming', 3)",
]
DIGEST = "ab" * 32


@pytest.fixture
def empty_database(request: pytest.FixtureRequest, tmp_path) -> Iterator[sa.Engine]:
    """A database with no schema yet, on each of the two."""
    if request.param == "sqlite":
        engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
        yield engine
        engine.dispose()
        return
    url = sa.engine.make_url(request.getfixturevalue("postgres_url"))
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"migrations_{id(request)}"
    with admin.connect() as db:
        db.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(url.set(database=name))
    yield engine
    engine.dispose()
    with admin.connect() as db:
        db.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        db.execute(sa.text(f'DROP ROLE IF EXISTS "reader_{name}"'))
    admin.dispose()


def migrate(engine: sa.Engine, revision: str, *, down: bool = False) -> None:
    with engine.begin() as connection:
        config = _alembic_config(connection)
        (command.downgrade if down else command.upgrade)(config, revision)  # type: ignore[arg-type]


def contents(db: sa.Connection) -> dict[str, list[dict[str, Any]]]:
    """Every row of the per-render tables, by column name (the order of columns aside)."""
    return {table: [dict(row._mapping) for row in
                    db.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))]
            for table in TABLES}


def catalog(db: sa.Connection) -> dict[str, Any]:
    """What hangs on the tables besides their rows (PostgreSQL)."""
    names = {"t": list(TABLES)}
    return {
        "constraints": db.execute(sa.text(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE conrelid::regclass::text = ANY(:t) "
            "OR confrelid::regclass::text = ANY(:t) ORDER BY 1, 2"), names).all(),
        "indexes": db.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(:t) ORDER BY 1"),
            names).all(),
        "triggers": db.execute(sa.text(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid::regclass::text = ANY(:t) AND NOT tgisinternal ORDER BY 1"),
            names).all(),
        "grants": db.execute(sa.text(
            "SELECT table_name, grantee, privilege_type FROM information_schema.table_privileges "
            "WHERE table_name = ANY(:t) AND grantee = :reader ORDER BY 1, 3"),
            {**names, "reader": reader_of(db)}).all(),
        "comments": db.execute(sa.text(
            "SELECT coalesce(a.attname, ''), d.description FROM pg_description d "
            "LEFT JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid "
            "WHERE d.objoid = CAST('ledger' AS regclass) ORDER BY 1")).all(),
        "columns": db.execute(sa.text(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_name = ANY(:t) "
            "AND column_name <> 'request_id' ORDER BY 1, 2"), names).all(),
    }


def reader_of(db: sa.Connection) -> str:
    return f"reader_{db.engine.url.database}"


def fill(db: sa.Connection) -> None:
    postgres = db.dialect.name == "postgresql"
    digest = f"decode('{DIGEST}', 'hex')" if postgres else f"X'{DIGEST}'"
    for statement in ROWS:
        db.execute(sa.text(statement.replace("{digest}", digest)))
    if postgres:  # what a team's DBA adds: a read-only role, an audit trigger, a comment
        reader = reader_of(db)  # roles belong to the server: one per database
        db.execute(sa.text(f"CREATE ROLE {reader}"))
        db.execute(sa.text(f"GRANT SELECT ON ledger, images TO {reader}"))
        db.execute(sa.text("CREATE TABLE audit (item_id int)"))
        db.execute(sa.text(
            "CREATE FUNCTION note_item() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO audit VALUES (NEW.id); RETURN NEW; END $$"))
        db.execute(sa.text("CREATE TRIGGER items_noted AFTER INSERT ON job_items "
                           "FOR EACH ROW EXECUTE FUNCTION note_item()"))
        db.execute(sa.text("COMMENT ON TABLE ledger IS 'every cent'"))
        db.execute(sa.text("COMMENT ON COLUMN ledger.amount_cents IS 'whole cents'"))
        for table, top in (("job_items", 70), ("renders", 700), ("attempts", 7001),
                           ("ledger", 4), ("images", 70000)):
            db.execute(sa.text(f"SELECT setval('{table}_id_seq', {top})"))


@pytest.mark.parametrize("empty_database", ["sqlite", "postgresql"], indirect=True)
def test_a_database_with_a_job_upgrades_to_0011_keeping_every_row_and_name(empty_database):
    engine = empty_database
    migrate(engine, "0010")
    with engine.begin() as db:
        fill(db)
        before = contents(db)
        names_before = catalog(db) if db.dialect.name == "postgresql" else None
    migrate(engine, "head")
    with engine.begin() as db:
        after = contents(db)
        assert [row.pop("request_id") for row in after["renders"]] == [None]
        assert after == before
        if db.dialect.name != "postgresql":
            return
        assert catalog(db) == names_before
        # 8-byte columns first: no padding after a text or a lone integer.
        first = db.execute(sa.text(
            "SELECT attname FROM pg_attribute WHERE attrelid = CAST('ledger' AS regclass) "
            "AND attnum = 1")).scalar()
        assert first == "amount_cents"
        dropped = db.execute(sa.text(
            "SELECT count(*) FROM pg_attribute WHERE attrelid::regclass::text = ANY(:t) "
            "AND attisdropped"), {"t": list(TABLES)}).scalar()
        assert dropped == 0
        # The sequences go on from where they were, the audit trigger still fires...
        new_item = db.execute(sa.text(
            "INSERT INTO job_items (job_id, line, body) VALUES (7, 2, '{}') RETURNING id"
        )).scalar()
        assert new_item == 71
        assert db.execute(sa.text("SELECT item_id FROM audit")).scalars().all() == [71]
        # ...the foreign keys still refuse an orphan and still cascade.
        with pytest.raises(sa.exc.IntegrityError), db.begin_nested():
            db.execute(sa.text("INSERT INTO images (job_id, render_id, image_index, key, "
                               "content_type, bytes, sha256, cost_cents) VALUES "
                               "(7, 999, 0, 'k', 'image/png', 1, '\\x00', 0)"))
        db.execute(sa.text("DELETE FROM jobs WHERE id = 7"))
        assert all(not rows for rows in contents(db).values())


@pytest.mark.parametrize("empty_database", ["sqlite", "postgresql"], indirect=True)
def test_0011_goes_down_and_up_again(empty_database):
    engine = empty_database
    migrate(engine, "head")
    with engine.begin() as db:
        fill(db)
    migrate(engine, "0010", down=True)
    with engine.begin() as db:
        assert "request_id" not in {c["name"] for c in sa.inspect(db).get_columns("renders")}
    migrate(engine, "head")
    with engine.begin() as db:
        assert len(contents(db)["ledger"]) == 4
