"""A job's files in id order from one index: ix_images_job_id (job_id) becomes (job_id, id)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 22:40:00

`imagebatch serve` pages a job's files by image id (keyset: `job_id = J AND id > A ORDER BY
id LIMIT 61`). On PostgreSQL an index on job_id alone gives no id order: the planner walked
the primary key and filtered on job_id instead, through every older job's files first (86 ms
for the first page of a 100,000-file job stored after 200,000 others, and growing with the
table). With (job_id, id) each page reads its 61 entries (`python bench/gallery_pages.py`).
The exports' `job_id = J` lookups use it as they used the old one. It costs 15.5 B a file at
rest on PostgreSQL (22.6 B against the old index's 7.1 B, which deduplicated its one
repeated key). SQLite's index already ended with the rowid (the id): the same order, now
written down.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_job_file", "images", ["job_id", "id"])
    op.drop_index("ix_images_job_id", table_name="images")


def downgrade() -> None:
    op.create_index("ix_images_job_id", "images", ["job_id"])
    op.drop_index("ix_images_job_file", table_name="images")
