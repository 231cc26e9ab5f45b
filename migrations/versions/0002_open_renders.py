"""jobs.open_renders: a job's renders still queued or running

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 17:50:00

Each settled render used to ask whether its job had any open render left, a query that
visits every render of the job that ever was open (dead index entries included): the cost of
settling a render grew with the size of its job. The count lives on the job row instead, which
every settlement locks anyway.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("open_renders", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Every render updates its job's row (and its team's period row) a few times. Room
        # left on the page lets PostgreSQL keep those versions on it (HOT updates) instead of
        # adding index entries that every later lookup of the row must step over.
        op.execute("ALTER TABLE jobs SET (fillfactor = 50)")
        op.execute("ALTER TABLE team_budgets SET (fillfactor = 50)")
    op.execute(
        "UPDATE jobs SET open_renders = (SELECT count(*) FROM renders "
        "WHERE renders.job_id = jobs.id AND renders.status IN ('queued', 'running'))"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
        op.execute("ALTER TABLE team_budgets RESET (fillfactor)")
    # Not batch mode: on SQLite that copies and drops `jobs`, and with foreign keys on the
    # drop cascades to every item, render and ledger row. SQLite 3.35+ drops a column itself.
    op.execute("ALTER TABLE jobs DROP COLUMN open_renders")
