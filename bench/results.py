"""Benchmark records: the machine, bench/results/latest.json (appended) and latest.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LATEST_JSON = RESULTS / "latest.json"
LATEST_MD = RESULTS / "latest.md"

COLUMNS = (
    ("preset", "preset"),
    ("mode", "mode"),
    ("workers × concurrency", "shape"),
    ("N", "n"),
    ("latency s", "latency_s"),
    ("media KB", "media_kb"),
    ("fail rate", "fail_rate"),
    ("wall s", "wall_s"),
    ("ideal s", "ideal_s"),
    ("efficiency", "efficiency"),
    ("renders/s", "renders_per_s"),
    ("CPU ms/render", "cpu_ms_per_render"),
    ("peak RSS MB", "peak_rss_mb"),
    ("errors", "errors"),
    ("upstream max in flight", "upstream_max_in_flight"),
)


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"nproc": os.cpu_count(), "memory_gib": round(pages / 2**30, 1), "cpu": model,
            "python": platform.python_version(), "kernel": platform.release()}


PIPELINE_PATHS = ("pipeline", "workers", "cli.py", "fake_upstream", "migrations")


def git_revision(root: Path) -> str | None:
    """The commit the pipeline was measured at ('+dirty': uncommitted changes to its code)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *PIPELINE_PATHS], cwd=root, capture_output=True, text=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def load(path: Path = LATEST_JSON) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text())


def append(record: dict[str, Any], path: Path = LATEST_JSON) -> None:
    """Add `record` to the JSON file `path`; latest.json also rewrites latest.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [*load(path), record]
    path.write_text(json.dumps(records, indent=1) + "\n")
    if path == LATEST_JSON:
        LATEST_MD.write_text(markdown(records))


def clear(path: Path = LATEST_JSON) -> None:
    for file in (path, LATEST_MD) if path == LATEST_JSON else (path,):
        file.unlink(missing_ok=True)


def markdown(records: list[dict[str, Any]]) -> str:
    lines = []
    if records:
        m = records[-1].get("machine", {})
        revisions = ", ".join(dict.fromkeys(str(r.get("git") or "?") for r in records))
        lines += [f"Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('memory_gib')} GiB, "
                  f"Python {m.get('python')}; pipeline at {revisions}.", ""]
    lines.append("| " + " | ".join(title for title, _ in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for record in records:
        lines.append("| " + " | ".join(_cell(record, key) for _, key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(record: dict[str, Any], key: str) -> str:
    if key == "shape":
        return f"{record['workers']} × {record['concurrency_per_worker']}"
    if key == "mode":
        return record["mode"] + (" (py-spy)" if record.get("profile") else "")
    if key == "media_kb":
        return f"{record['media_bytes'] / 1024:g}"
    value = record.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)
