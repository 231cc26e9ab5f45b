"""Smaller rows a render: indexes no statement needs, and columns that repeat others

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:40:00

A job of 1,000,000 renders writes each of these a million times (about 1 KB a
render with its ledger, attempt and image rows).
- `images.uri` goes: it was the storage URL + `key`; exports build it from the store.
- `images.item_id` (and its index) goes: an image's item is its render's; deleting an item
  cascades to its renders and from them to their images.
- `ix_job_items_job_id` and `ix_attempts_render_id` go: `uq_job_items_job_line` (job, line)
  and `uq_attempts_render_number` (render, number) begin with the same column.
- `ix_renders_status_lease` keeps only running renders (partial): the sweep looks for
  running renders whose lease ran out, never for others.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.drop_index("ix_images_item_id", table_name="images")
    with op.batch_alter_table("images") as batch:
        if op.get_context().dialect.name == "postgresql":
            batch.drop_constraint("images_item_id_fkey", type_="foreignkey")
        batch.drop_column("item_id")
        batch.drop_column("uri")
    op.drop_index("ix_job_items_job_id", table_name="job_items")
    op.drop_index("ix_attempts_render_id", table_name="attempts")
    op.drop_index("ix_renders_status_lease", table_name="renders")
    op.create_index("ix_renders_status_lease", "renders", ["status", "lease_until"],
                    postgresql_where=RUNNING, sqlite_where=RUNNING)


def downgrade() -> None:
    op.drop_index("ix_renders_status_lease", table_name="renders")
    op.create_index("ix_renders_status_lease", "renders", ["status", "lease_until"])
    op.create_index("ix_attempts_render_id", "attempts", ["render_id"])
    op.create_index("ix_job_items_job_id", "job_items", ["job_id"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("uri", sa.String(length=2000), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("item_id", sa.Integer(), nullable=True))
    op.execute("UPDATE images SET item_id = (SELECT item_id FROM renders "
               "WHERE renders.id = images.render_id)")
    with op.batch_alter_table("images") as batch:
        batch.alter_column("item_id", nullable=False)
        batch.create_foreign_key("images_item_id_fkey", "job_items", ["item_id"], ["id"],
                                 ondelete="CASCADE")
    op.create_index("ix_images_item_id", "images", ["item_id"])
