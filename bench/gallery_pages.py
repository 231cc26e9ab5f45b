"""How long a gallery page of `imagebatch serve` takes: the first and a late page of a
100,000-file job against the first page of a 100-file one, on SQLite and PostgreSQL.

    python bench/gallery_pages.py [--files 100000] [--older 100000] [--sqlite-only]

Writes the rows in SQL directly (jobs, job_items, renders, images: jobs already rendered:
an older job of `--older` files, then a small job, the big one and another small one, so
the big job's rows are neither the whole table nor its start), then
times `gallery.job_files` (keyset pages of 60) and prints the median of 20 reads of each
page, in milliseconds. Starts its own PostgreSQL (tests/servers.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.db import make_engine, session_factory, upgrade_schema  # noqa: E402
from pipeline.gallery import job_files, job_items  # noqa: E402
from pipeline.models import Image, Job, JobItem, Render  # noqa: E402
from tests.servers import start_postgres  # noqa: E402

CHUNK = 5_000


def add_job(engine: sa.Engine, files: int, failed_every: int = 50) -> int:
    """A finished job of `files` items, one render and one stored file each, plus a failed
    item every `failed_every` lines."""
    with engine.begin() as db:
        job_id = db.execute(sa.insert(Job).values(
            team="bench", name=f"{files} files", budget_cents=files * 10, status="partial",
            items_total=files, items_succeeded=files, images=files).returning(Job.id)).scalar()
        item_base = db.execute(sa.select(sa.func.coalesce(sa.func.max(JobItem.id), 0))).scalar()
        render_base = db.execute(sa.select(sa.func.coalesce(sa.func.max(Render.id), 0))).scalar()
        for start in range(0, files, CHUNK):
            lines = range(start, min(files, start + CHUNK))
            db.execute(sa.insert(JobItem), [
                {"id": item_base + i + 1, "job_id": job_id, "line": i, "custom_id": f"c{i}",
                 "body": json.dumps({"model": "flux-2-dev", "prompt": f"bench {i}"}),
                 "status": "failed" if i % failed_every == 0 else "succeeded",
                 "error": "invalid: bench" if i % failed_every == 0 else None}
                for i in lines])
            db.execute(sa.insert(Render), [
                {"id": render_base + i + 1, "job_id": job_id, "item_id": item_base + i + 1,
                 "render_index": 0, "model": "flux-2-dev", "n": 1, "seed": i,
                 "price_per_image_cents": 1, "status": "succeeded"} for i in lines])
            db.execute(sa.insert(Image), [
                {"job_id": job_id, "render_id": render_base + i + 1, "image_index": 0,
                 "key": f"job-{job_id:06d}/line-{i:05d}/r000-i00.png",
                 "content_type": "image/png", "bytes": 100, "sha256": "0" * 64,
                 "width": 64, "height": 64, "seed": i, "cost_cents": 1} for i in lines])
    return job_id


def median_ms(read: object, times: int = 20) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        read()  # type: ignore[operator]
        spent.append((time.perf_counter() - start) * 1000)
    return statistics.median(spent)


def late_after(sessions: sa.orm.sessionmaker, job_id: int, files: int) -> int:
    """The `after` of a page 90% of the way into the job (what a user paging on reaches)."""
    with sessions() as session:
        return session.execute(
            sa.select(Image.id).where(Image.job_id == job_id).order_by(Image.id)
            .offset(files * 9 // 10).limit(1)).scalar()


def bench(label: str, url: str, files: int, older: int) -> None:
    engine = make_engine(url)
    upgrade_schema(engine)
    if older:  # files of older jobs fill the table before the big job's
        add_job(engine, older)
    small_before = add_job(engine, 100)
    big = add_job(engine, files)
    small_after = add_job(engine, 100)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as db:
            db.execute(sa.text("VACUUM ANALYZE"))
    sessions = session_factory(engine)
    late = late_after(sessions, big, files)

    def page(job_id: int, after: int | None = None) -> float:
        def read() -> None:
            with sessions() as session:
                assert len(job_files(session, job_id, after=after).files) > 0

        return median_ms(read)

    def failed_page(job_id: int, after: int | None = None) -> float:
        def read() -> None:
            with sessions() as session:
                assert job_items(session, job_id, "failed", after=after).items

        return median_ms(read)

    print(f"{label}: files page of 60, median of 20 reads")
    print(f"  100-file job (before the big one), first page: {page(small_before):6.2f} ms")
    print(f"  100-file job (after the big one),  first page: {page(small_after):6.2f} ms")
    print(f"  {files:,}-file job, first page:                 {page(big):6.2f} ms")
    print(f"  {files:,}-file job, page at 90%:                {page(big, late):6.2f} ms")
    print(f"  {files:,}-file job, failed items first page:    {failed_page(big):6.2f} ms")
    print(f"  {files:,}-file job, failed items at 90%:        "
          f"{failed_page(big, files * 9 // 10):6.2f} ms")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--older", type=int, default=100_000,
                        help="files of an older job stored before the others")
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench("SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}", args.files, args.older)
    if not args.sqlite_only:
        url, stop = start_postgres()
        try:
            bench("PostgreSQL", url, args.files, args.older)
        finally:
            stop()


if __name__ == "__main__":
    main()
