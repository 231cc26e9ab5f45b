"""Smaller image rows: sha256 as its 32 bytes, and no created_at (nothing read it)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 23:40:00

A file's sha256 was 64 hex characters (65 B at rest on PostgreSQL); as bytes it is 33 B.
The code still reads and writes hex (models.HexDigest); in SQL it reads as
`encode(sha256, 'hex')` on PostgreSQL and `lower(hex(sha256))` on SQLite.

`images.created_at` goes: when a file was paid for is its ledger row's `created_at`, when it
was stored its attempt's `settled_at`; no statement, export or page read the row's own copy
(8 B a file). Together these pay for the gallery's (job_id, id) index (0007) and the reuse
columns (0008): SQL at rest stays under 1 KB a render (`python bench/sql_bytes.py`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 10_000


def upgrade() -> None:
    # SQLite 3.35+ drops a column in place.
    op.drop_column("images", "created_at")
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE images ALTER COLUMN sha256 TYPE bytea USING decode(sha256, 'hex')")
        return
    # SQLite (before 3.41, no unhex()): the values turned to bytes here, then the column's
    # declared type changed by copying the table (batch mode), which keeps them as they are.
    db = op.get_bind()
    last = 0
    while rows := db.execute(sa.text(
            "SELECT id, sha256 FROM images WHERE id > :last ORDER BY id LIMIT :batch"),
            {"last": last, "batch": BATCH}).all():
        db.execute(sa.text("UPDATE images SET sha256 = :digest WHERE id = :id"),
                   [{"id": id_, "digest": bytes.fromhex(digest) if isinstance(digest, str)
                     else digest} for id_, digest in rows])
        last = rows[-1][0]
    with op.batch_alter_table("images") as batch:
        batch.alter_column("sha256", type_=sa.LargeBinary(32), existing_nullable=False)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE images ALTER COLUMN sha256 TYPE varchar(64) "
                   "USING encode(sha256, 'hex')")
    else:
        with op.batch_alter_table("images") as batch:
            batch.alter_column("sha256", type_=sa.String(64), existing_nullable=False)
        op.execute("UPDATE images SET sha256 = lower(hex(sha256)) WHERE typeof(sha256) = 'blob'")
    op.add_column("images", sa.Column("created_at", sa.DateTime(), nullable=True))
