"""Sample runs: the lines a job renders first before it asks to go on

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 22:30:00

`jobs.sample_lines` is set by `imagebatch run FILE --sample K` to the number of lines the job
renders before it pauses to be looked at: while it is set, the job pauses instead of closing
once those lines have ended, and `resume` clears it and plans the rest. NULL (every other
job) costs nothing at rest on PostgreSQL (the row's null bitmap).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("sample_lines", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "sample_lines")
