"""Peak memory of `imagebatch export` on a large synthetic job: FILES image rows (tiny files in
the media folder, metadata with a split and a label), exported by the real command in a child
process whose peak RSS is read from the kernel (ru_maxrss). Bounded memory means the peak
does not grow with FILES.

    python bench/export_memory.py 100000 hf webdataset parquet jsonl
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.db import make_engine, upgrade_schema  # noqa: E402
from pipeline.models import Image, Job, JobItem, Render  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + bytes(92)  # 100 bytes: the files' size does not matter here
CHUNK = 10_000


def make_job(data_dir: Path, files: int) -> int:
    engine = make_engine(f"sqlite:///{data_dir / 'imagebatch.db'}")
    upgrade_schema(engine)
    media = data_dir / "media"
    with engine.begin() as db:
        job = db.execute(sa.insert(Job).values(team="bench", budget_cents=3 * files,
                                               status="succeeded").returning(Job.id)).scalar()
    for start in range(0, files, CHUNK):
        lines = range(start + 1, min(start + CHUNK, files) + 1)
        with engine.begin() as db:
            db.execute(sa.insert(JobItem), [
                {"id": n, "job_id": job, "line": n, "custom_id": f"c{n}", "status": "succeeded",
                 "body": json.dumps({"model": "flux-2-dev", "prompt": f"an otter {n}"}),
                 "meta": json.dumps({"split": "test" if n % 10 == 0 else "train",
                                     "label": f"l{n % 7}"})} for n in lines])
            db.execute(sa.insert(Render), [
                {"id": n, "job_id": job, "item_id": n, "render_index": 1, "model": "flux-2-dev",
                 "n": 1, "seed": n, "price_per_image_cents": 3, "status": "succeeded"}
                for n in lines])
            rows = []
            for n in lines:
                key = f"job-{job:06d}/line-{n:08d}/r001-i01.png"
                path = media / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(PNG)
                rows.append({"job_id": job, "render_id": n, "image_index": 1, "key": key,
                             "content_type": "image/png", "bytes": len(PNG), "sha256": "0" * 64,
                             "width": 1, "height": 1, "seed": n, "cost_cents": 3})
            db.execute(sa.insert(Image), rows)
    engine.dispose()
    return job


def export_peak(data_dir: Path, job: int, fmt: str, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one export in a child process."""
    env = {**os.environ, "IMAGEBATCH_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    args = [sys.executable, "-m", "cli", "export", str(job), "--format", fmt, "-o", str(out)]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return time.monotonic() - started, int(done.stdout.strip()) / 1024


def main() -> None:
    files, formats = int(sys.argv[1]), sys.argv[2:] or ["hf", "webdataset", "parquet"]
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        started = time.monotonic()
        job = make_job(data_dir, files)
        print(f"{files:,} files made in {time.monotonic() - started:.0f} s", flush=True)
        for fmt in formats:
            out = Path(tmp) / (f"out.{fmt}" if fmt in ("jsonl", "csv", "parquet") else fmt)
            seconds, peak = export_peak(data_dir, job, fmt, out)
            print(f"{fmt:>10}: {files:,} files in {seconds:.0f} s, peak RSS {peak:.0f} MiB",
                  flush=True)


if __name__ == "__main__":
    main()
