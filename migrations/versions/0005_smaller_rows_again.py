"""Smaller rows, again: status indexes without what succeeded; two columns nothing read

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 19:10:00

`ix_job_items_job_status` and `ix_renders_job_queue` serve the statements that look a job's
items or renders up by status: pending items to plan, queued renders to send, failed or
cancelled ones to retry or resume, running ones to count. None looks for what succeeded, yet
those were every entry of a finished job: 41 B a line and 50 B a render at rest on
PostgreSQL (`python bench/sql_bytes.py`). SQLite keeps whole indexes: it proves a partial
index applies only from the same condition written in the statement.

`renders.updated_at` goes: every statement wrote it and none read it (a render's history is
its attempts' started_at, sent_at and settled_at); 8 B a render. `job_items.model` goes: the
model is the request body's, planning copied it there and nothing read it; 11 B a line.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_SUCCEEDED = sa.text("status <> 'succeeded'")
INDEXES = (("ix_job_items_job_status", "job_items", ["job_id", "status", "line"]),
           ("ix_renders_job_queue", "renders", ["job_id", "status", "enqueued_at", "id"]))


def _postgresql() -> bool:
    return op.get_context().dialect.name == "postgresql"


def upgrade() -> None:
    # SQLite 3.35+ drops a column in place (no batch copy of the table and its indexes).
    op.drop_column("renders", "updated_at")
    op.drop_column("job_items", "model")
    if not _postgresql():
        return
    for name, table, columns in INDEXES:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns, postgresql_where=NOT_SUCCEEDED)


def downgrade() -> None:
    op.add_column("job_items", sa.Column("model", sa.String(length=200), nullable=True))
    if _postgresql():
        op.add_column("renders", sa.Column("updated_at", sa.DateTime(), nullable=False,
                                           server_default=sa.text("CURRENT_TIMESTAMP")))
    else:  # SQLite adds no column whose default is not a constant: fill it after
        op.add_column("renders", sa.Column("updated_at", sa.DateTime(), nullable=True))
        op.execute("UPDATE renders SET updated_at = CURRENT_TIMESTAMP")
    if not _postgresql():
        return
    for name, table, columns in INDEXES:
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)
