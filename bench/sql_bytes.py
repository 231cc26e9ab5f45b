"""SQL bytes a render on PostgreSQL after VACUUM FULL, table by table (heap and each index).

    python bench/sql_bytes.py --renders 20000 [--seeded] [--team NAME]

Starts its own PostgreSQL (tests/servers.py) and the fake upstream in this process, renders a
job of N bench lines ({"model": "flux-2-dev", "prompt": "bench i"}) through the pipeline
(dispatch, then every render; `--seeded`: each line with a seed of its own, so every render
gets a request key for seeded reuse) for team `default` (what `run` and `submit` use unless
told; a team's name is in every attempt and ledger row), runs VACUUM FULL (what the rows take
at rest, without the dead tuples a live run leaves behind) and prints each table's bytes per
render.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fake_upstream.app import FakeConfig, FakeServer  # noqa: E402
from pipeline.db import make_engine, upgrade_schema  # noqa: E402
from pipeline.dispatch import dispatch_pending  # noqa: E402
from pipeline.runtime import start_services  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.helpers import render_all, submit, summary  # noqa: E402
from tests.servers import start_postgres  # noqa: E402

TABLES = ("job_items", "renders", "attempts", "ledger", "images")


def render_job(url: str, renders: int, seeded: bool = False, team: str = "default"
               ) -> None:
    with FakeServer(FakeConfig(latency=0.01, keepalive_interval=0.5)) as fake, \
            tempfile.TemporaryDirectory() as tmp:
        svc = start_services(make_settings(Path(tmp), fake.base_url, database_url=url,
                                           concurrency=64))
        try:
            seeds = ({"seed": i} if seeded else {} for i in range(renders))
            lines = [{"model": "flux-2-dev", "prompt": f"bench {i}", **seed}
                     for i, seed in enumerate(seeds)]
            job_id = submit(svc, lines, budget_cents=10 * renders, team=team)
            while render_ids := dispatch_pending(svc):
                render_all(svc, render_ids, concurrency=64)
            status = summary(svc, job_id)["status"]
        finally:
            svc.close()
    if status != "succeeded":
        raise SystemExit(f"the job ended {status}")


def report(url: str, renders: int) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as db:
        db.execute(sa.text("VACUUM FULL"))
        total = 0
        for table in TABLES:
            size = db.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar()
            heap = db.execute(sa.text("SELECT pg_relation_size(:t)"), {"t": table}).scalar()
            indexes = db.execute(sa.text(
                "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
                "WHERE relname = :t ORDER BY 1"), {"t": table}).all()
            total += size
            parts = "  ".join(f"{name} {b / renders:.0f}" for name, b in indexes)
            print(f"{table:10} {size / renders:6.0f} B   heap {heap / renders:.0f}  {parts}")
        print(f"{'total':10} {total / renders:6.0f} B a render "
              f"({(total - _size(db, 'job_items')) / renders:.0f} without the job's lines)")


def _size(db: sa.Connection, table: str) -> int:
    return int(db.execute(sa.text("SELECT pg_total_relation_size(:t)"), {"t": table}).scalar())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renders", type=int, default=20_000)
    parser.add_argument("--seeded", action="store_true",
                        help="seeded lines: what seeded reuse's request key costs")
    parser.add_argument("--team", default="default", help="the job's team (default: default)")
    args = parser.parse_args()
    url, stop = start_postgres()
    try:
        upgrade_schema(make_engine(url))
        render_job(url, args.renders, args.seeded, args.team)
        report(url, args.renders)
    finally:
        stop()


if __name__ == "__main__":
    main()
