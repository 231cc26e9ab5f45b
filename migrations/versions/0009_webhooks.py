"""Webhooks: a job's notify URL, a schedule's, and the deliveries waiting to be POSTed

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 22:20:00

`jobs.notify_url` and `schedules.notify_url` are NULL unless a user asked (a NULL costs a
bit of the row's null bitmap: nothing per render). `deliveries` holds one row per POST to
make (a job's end, a spend crossing): a few rows a job, none per render.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("notify_url", sa.String(length=2000), nullable=True))
    op.add_column("schedules", sa.Column("notify_url", sa.String(length=2000), nullable=True))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("once_key", sa.String(length=100), nullable=True),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), server_default=sa.text("'pending'"),
                  nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("delivery_id"),
        sa.UniqueConstraint("once_key"),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_at"])
    op.create_index("ix_deliveries_job", "deliveries", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_job", table_name="deliveries")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_column("schedules", "notify_url")
    op.drop_column("jobs", "notify_url")
