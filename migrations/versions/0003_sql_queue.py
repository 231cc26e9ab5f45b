"""SQL is the queue: renders wait unsent, attempts record their send, jobs plan in chunks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 13:20:00

- `renders.enqueued_at` is NULL while a render waits in SQL and set when its broker message
  is sent; `ix_renders_job_queue` (job, status, sent time, id) serves both the window count
  and "the job's next unsent renders in id order" from the index alone.
- `attempts.sent_at`: committed before the upstream call, so an attempt that lost its worker
  with no send recorded provably never reached the upstream and is released, not charged.
- `jobs.plan_cursor`: the last line planned while a job is planned in chunks (NULL: none left).
- `jobs.source_digest`: sha256 of the submitted file, so `run` finds an unfinished copy.
- `workers`: each live worker's render slots and last beat, so the window is sized from
  what the live workers can run at once.
- The ledger's indexes on attempt_id and team_budget_id go: nothing reads by them.
- `jobs.items_*` and `jobs.images`: counters kept with the job's money, so `status` reads one
  row however big the job; `ix_job_items_job_status` finds a job's failed (or pending) items
  without walking the others.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTERS = ("items_total", "items_succeeded", "items_failed", "items_cancelled", "images")


def upgrade() -> None:
    op.drop_index("ix_renders_job_status", table_name="renders")
    op.create_index("ix_renders_job_queue", "renders", ["job_id", "status", "enqueued_at", "id"])
    op.add_column("attempts", sa.Column("sent_at", sa.DateTime(), nullable=True))
    # Attempts made before this revision were all sent (the send was not recorded then).
    op.execute("UPDATE attempts SET sent_at = started_at")
    op.add_column("jobs", sa.Column("plan_cursor", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("source_digest", sa.String(length=64), nullable=True))
    op.create_index("ix_jobs_source_digest", "jobs", ["source_digest"])
    for column in COUNTERS:
        op.add_column("jobs", sa.Column(column, sa.Integer(), server_default=sa.text("0"),
                                        nullable=False))
    for column, status in (("items_succeeded", "succeeded"), ("items_failed", "failed"),
                           ("items_cancelled", "cancelled")):
        op.execute(f"UPDATE jobs SET {column} = (SELECT count(*) FROM job_items "
                   f"WHERE job_items.job_id = jobs.id AND job_items.status = '{status}')")
    op.execute("UPDATE jobs SET items_total = (SELECT count(*) FROM job_items "
               "WHERE job_items.job_id = jobs.id)")
    op.execute("UPDATE jobs SET images = (SELECT count(*) FROM images "
               "WHERE images.job_id = jobs.id)")
    op.create_index("ix_job_items_job_status", "job_items", ["job_id", "status", "line"])
    # Deleting items (a refused submission) cascades to their images: without this index
    # SQLite scans every image of the database once per item.
    op.create_index("ix_images_item_id", "images", ["item_id"])
    # Nothing looks a ledger row up by attempt or team budget: two index entries a ledger
    # row, four a render, for no reader.
    op.drop_index("ix_ledger_attempt_id", table_name="ledger")
    op.drop_index("ix_ledger_team_budget_id", table_name="ledger")
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.create_index("ix_ledger_team_budget_id", "ledger", ["team_budget_id"])
    op.create_index("ix_ledger_attempt_id", "ledger", ["attempt_id"])
    op.drop_index("ix_images_item_id", table_name="images")
    op.drop_index("ix_job_items_job_status", table_name="job_items")
    for column in COUNTERS:
        op.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    op.drop_index("ix_jobs_source_digest", table_name="jobs")
    # Not batch mode (see 0002): SQLite 3.35+ drops a column itself.
    op.execute("ALTER TABLE jobs DROP COLUMN source_digest")
    op.execute("ALTER TABLE jobs DROP COLUMN plan_cursor")
    op.execute("ALTER TABLE attempts DROP COLUMN sent_at")
    op.drop_index("ix_renders_job_queue", table_name="renders")
    op.create_index("ix_renders_job_status", "renders", ["job_id", "status"])
