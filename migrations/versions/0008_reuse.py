"""Seeded reuse: a render's request key and where its files came from; jobs that opt out

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 22:30:00

- `renders.request_key`: a 64-bit digest of the seeded request sent upstream (NULL without a
  seed), and `ix_renders_request_key` over the renders that succeeded with one only: a later
  render of the same request copies their files instead of paying again (pipeline/reuse.py).
  Unseeded renders cost nothing (a NULL is a bit of the row's null bitmap).
- `renders.reused_from`: the render whose files were copied (NULL: rendered here).
- `jobs.reuse`: False for jobs submitted with `--no-reuse`; jobs written with SQL reuse.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REUSABLE = sa.text("status = 'succeeded' AND request_key IS NOT NULL")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("reuse", sa.Boolean(), nullable=False,
                                    server_default=sa.true()))
    op.add_column("renders", sa.Column("request_key", sa.BigInteger(), nullable=True))
    op.add_column("renders", sa.Column("reused_from", sa.Integer(), nullable=True))
    op.create_index("ix_renders_request_key", "renders", ["request_key"],
                    postgresql_where=REUSABLE, sqlite_where=REUSABLE)


def downgrade() -> None:
    op.drop_index("ix_renders_request_key", table_name="renders")
    op.drop_column("renders", "reused_from")
    op.drop_column("renders", "request_key")
    op.drop_column("jobs", "reuse")
