"""The upstream's request id per render, and the per-render tables rewritten without padding

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 04:00:00

`renders.request_id` is the provider's name for the call that delivered (its `x-request-id` or
`request-id` header, else the body's `id`; NULL when it sent none), exported with each file.

PostgreSQL aligns an 8-byte value (bigint, timestamp) to 8 bytes: every bigint that followed
a text or a lone integer cost up to 7 bytes of padding, on every row. The five tables a render
writes to (job_items, renders, attempts, ledger, images) are rewritten here with their 8-byte
columns first, then the 4-byte ones, then the texts, and without the columns earlier
migrations dropped (each still took a bit of every row's null bitmap). That saves about 40 B a
render at rest (`python bench/sql_bytes.py`), which pays for the request id and keeps SQL
under 1 KB a render.

The rewrite keeps everything a user or a later migration may rely on: every column's type,
NOT NULL and default, the id sequences (they go on from where they were), every constraint and
index under its own name (foreign keys from other tables included), grants and triggers. It is
one transaction: if anything stops it (a view of the user's over one of these tables: drop it
first), nothing changed. It copies each table once, so on a database of millions of renders
it takes minutes. SQLite has no alignment: there only the column is added.

Downgrade drops the column; the order of the others does not matter to anything.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each table's columns as they will lie in a row: 8-byte values, then 4-byte ones, then texts.
ALIGNED = {
    "job_items": ("id", "job_id", "line", "custom_id", "body", "metadata", "status", "error"),
    "renders": ("price_per_image_cents", "seed", "request_key", "lease_until", "enqueued_at",
                "id", "job_id", "item_id", "render_index", "n", "attempts", "retry_from",
                "deliveries", "reused_from", "model", "status", "error", "request_id"),
    "attempts": ("amount_cents", "price_per_image_cents", "started_at", "sent_at", "settled_at",
                 "id", "render_id", "number", "team_budget_id", "http_status", "outcome", "team",
                 "error"),
    "ledger": ("amount_cents", "price_per_image_cents", "created_at", "id", "job_id",
               "render_id", "attempt_id", "team_budget_id", "images", "team", "model", "kind"),
    "images": ("bytes", "cost_cents", "seed", "id", "job_id", "render_id", "image_index",
               "width", "height", "key", "content_type", "sha256", "revised_prompt"),
}


def upgrade() -> None:
    op.add_column("renders", sa.Column("request_id", sa.String(length=200), nullable=True))
    if op.get_context().dialect.name != "postgresql":
        return
    db = op.get_bind()
    for table, order in ALIGNED.items():
        rewrite(db, table, order)


def downgrade() -> None:
    op.drop_column("renders", "request_id")


def rewrite(db: sa.Connection, table: str, order: tuple[str, ...]) -> None:
    """Copy `table` into a new one with its columns in `order`, then put back under their own
    names everything that hung on the old one."""
    columns = _columns(db, table)
    if set(columns) != set(order):
        raise RuntimeError(f"{table}: the columns are {sorted(columns)}, not {sorted(order)}")
    kept = _what_hangs_on(db, table)
    listed = ", ".join(_quoted(name) for name in order)
    db.exec_driver_sql(f"CREATE TABLE {table}__aligned ({', '.join(columns[n] for n in order)})")
    db.exec_driver_sql(f"INSERT INTO {table}__aligned ({listed}) SELECT {listed} FROM {table}")
    for sequence, _ in kept.sequences:
        db.exec_driver_sql(f"ALTER SEQUENCE {sequence} OWNED BY NONE")
    for other, name, _ in kept.incoming:
        db.exec_driver_sql(f"ALTER TABLE {other} DROP CONSTRAINT {_quoted(name)}")
    db.exec_driver_sql(f"DROP TABLE {table}")
    db.exec_driver_sql(f"ALTER TABLE {table}__aligned RENAME TO {table}")
    for sequence, column in kept.sequences:
        db.exec_driver_sql(f"ALTER SEQUENCE {sequence} OWNED BY {table}.{_quoted(column)}")
    for name, definition in kept.constraints:
        db.exec_driver_sql(f"ALTER TABLE {table} ADD CONSTRAINT {_quoted(name)} {definition}")
    for statement in kept.statements:
        db.exec_driver_sql(statement)
    for other, name, definition in kept.incoming:
        db.exec_driver_sql(f"ALTER TABLE {other} ADD CONSTRAINT {_quoted(name)} {definition}")


@dataclass
class _Kept:
    """What a table carries besides its rows, read from the catalog before it is dropped."""

    sequences: list[tuple[str, str]] = field(default_factory=list)  # (sequence, its column)
    constraints: list[tuple[str, str]] = field(default_factory=list)  # primary, unique, ...
    incoming: list[tuple[str, str, str]] = field(default_factory=list)  # others' foreign keys
    statements: list[str] = field(default_factory=list)  # indexes, triggers, grants, comments


def _columns(db: sa.Connection, table: str) -> dict[str, str]:
    """Each live column's definition (name, type, NOT NULL, default), by name."""
    rows = db.execute(sa.text(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
        "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a "
        "LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
        "WHERE a.attrelid = CAST(:t AS regclass) AND a.attnum > 0 AND NOT a.attisdropped"),
        {"t": table}).all()
    return {name: " ".join(part for part in (
        _quoted(name), kind, "NOT NULL" if not_null else "",
        f"DEFAULT {default}" if default is not None else "") if part)
        for name, kind, not_null, default in rows}


def _what_hangs_on(db: sa.Connection, table: str) -> _Kept:
    kept = _Kept()
    params = {"t": table}
    kept.sequences = [(sequence, column) for column, sequence in db.execute(sa.text(
        "SELECT attname, pg_get_serial_sequence(:t, attname) FROM pg_attribute "
        "WHERE attrelid = CAST(:t AS regclass) AND attnum > 0 AND NOT attisdropped"), params)
        if sequence is not None]
    # Primary and unique keys first: the foreign keys of other tables need them.
    kept.constraints = [(name, definition) for name, definition in db.execute(sa.text(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = CAST(:t AS regclass) "
        "ORDER BY array_position(ARRAY['p', 'u', 'c', 'f', 'x'], contype::text), conname"),
        params)]
    kept.incoming = [(other, name, definition) for other, name, definition in db.execute(
        sa.text("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE confrelid = CAST(:t AS regclass) AND contype = 'f' "
                "AND conrelid <> confrelid ORDER BY conname"), params)]
    kept.statements += [definition for (definition,) in db.execute(sa.text(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
        "WHERE indrelid = CAST(:t AS regclass) AND indexrelid NOT IN "
        "(SELECT conindid FROM pg_constraint WHERE conrelid = CAST(:t AS regclass)) "
        "ORDER BY indexrelid"), params)]
    kept.statements += [definition for (definition,) in db.execute(sa.text(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE tgrelid = CAST(:t AS regclass) AND NOT tgisinternal ORDER BY tgname"), params)]
    kept.statements += [
        f"GRANT {privilege} ON {table} TO {grantee}"
        + (" WITH GRANT OPTION" if grantable else "")
        for privilege, grantee, grantable in db.execute(sa.text(
            "SELECT g.privilege_type, CASE WHEN g.grantee = 0 THEN 'PUBLIC' "
            "ELSE quote_ident(pg_get_userbyid(g.grantee)) END, g.is_grantable "
            "FROM pg_class c, aclexplode(c.relacl) g "
            "WHERE c.oid = CAST(:t AS regclass) AND g.grantee <> c.relowner"), params)]
    kept.statements += [
        f"COMMENT ON {'TABLE' if column is None else 'COLUMN'} "
        f"{table}{'' if column is None else '.' + _quoted(column)} IS {literal}"
        for column, literal in db.execute(sa.text(
            "SELECT a.attname, quote_literal(d.description) FROM pg_description d "
            "LEFT JOIN pg_attribute a ON a.attrelid = d.objoid AND a.attnum = d.objsubid "
            "WHERE d.objoid = CAST(:t AS regclass) AND d.classoid = 'pg_class'::regclass"),
            params)]
    return kept


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
