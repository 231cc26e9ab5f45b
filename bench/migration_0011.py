"""How long `imagebatch db upgrade` takes over migration 0011 on PostgreSQL, and what it saves.

    python bench/migration_0011.py --renders 1000000

Starts its own PostgreSQL (tests/servers.py), migrates it to 0010, writes a finished job of N
renders the way the pipeline leaves one (a line, a render, an attempt, two ledger rows and a
file each; team `default`) with INSERT ... SELECT, VACUUM FULL, then times the upgrade to head
as a user runs it (`imagebatch db upgrade` in its own process: 0011 rewrites the five tables)
and prints the bytes a render before and after, at rest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.db import _alembic_config  # noqa: E402
from tests.servers import start_postgres  # noqa: E402

TABLES = ("job_items", "renders", "attempts", "ledger", "images")
FILL = [
    "INSERT INTO jobs (id, team, budget_cents, status, source) "
    "VALUES (1, 'default', 1000000000, 'succeeded', 'file')",
    "INSERT INTO job_items (id, job_id, line, body, status) SELECT i, 1, i, "
    "'{\"model\": \"flux-2-dev\", \"prompt\": \"bench ' || i || '\"}', 'succeeded' "
    "FROM generate_series(1, :n) i",
    "INSERT INTO renders (id, job_id, item_id, render_index, model, n, price_per_image_cents, "
    "status, attempts, retry_from, enqueued_at, deliveries) SELECT i, 1, i, 0, 'flux-2-dev', 1, "
    "3, 'succeeded', 1, 0, now(), 1 FROM generate_series(1, :n) i",
    "INSERT INTO attempts (id, render_id, number, outcome, amount_cents, team, "
    "price_per_image_cents, started_at, sent_at, settled_at) SELECT i, i, 1, 'charged', 3, "
    "'default', 3, now(), now(), now() FROM generate_series(1, :n) i",
    "INSERT INTO ledger (job_id, render_id, attempt_id, team, model, kind, amount_cents, images, "
    "price_per_image_cents, created_at) SELECT 1, i, i, 'default', 'flux-2-dev', kind, 3, 1, 3, "
    "now() FROM generate_series(1, :n) i, (VALUES ('reserve'), ('charge')) k(kind)",
    "INSERT INTO images (id, job_id, render_id, image_index, key, content_type, bytes, sha256, "
    "width, height, cost_cents) SELECT i, 1, i, 0, "
    "'job-000001/line-' || lpad(i::text, 5, '0') || '/r000-i00.png', 'image/png', 2048, "
    "sha256(i::text::bytea), 1024, 1024, 3 FROM generate_series(1, :n) i",
]


def migrate(engine: sa.Engine, revision: str) -> None:
    with engine.begin() as connection:
        from alembic import command

        command.upgrade(_alembic_config(connection), revision)  # type: ignore[arg-type]


def upgrade_as_a_user(url: str) -> float:
    """`imagebatch db upgrade` in its own process, start-up included: seconds."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as data:
        subprocess.run([sys.executable, "-m", "cli", "db", "upgrade"], cwd=ROOT, check=True,
                       env={**environ, "IMAGEBATCH_DATABASE_URL": url,
                            "IMAGEBATCH_DATA_DIR": data})
    return time.perf_counter() - started


def bytes_a_render(engine: sa.Engine, renders: int) -> float:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
        db.execute(sa.text("VACUUM FULL"))
        return sum(db.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": t}).scalar()
                   for t in TABLES) / renders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=1_000_000)
    args = parser.parse_args()
    url, stop = start_postgres()
    try:
        engine = sa.create_engine(url)
        migrate(engine, "0010")
        with engine.begin() as db:
            for statement in FILL:
                db.execute(sa.text(statement), {"n": args.renders})
        before = bytes_a_render(engine, args.renders)
        seconds = upgrade_as_a_user(url)
        after = bytes_a_render(engine, args.renders)
        print(f"{args.renders:,} renders: `imagebatch db upgrade` {seconds:.1f} s; "
              f"{before:,.0f} -> {after:,.0f} B a render at rest")
    finally:
        stop()


if __name__ == "__main__":
    main()
