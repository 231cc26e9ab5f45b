"""A/B of two versions of the pipeline on this machine: alternating runs, medians, ratios.

    python bench/ab.py --against HEAD --rounds 3 -- --mode distributed-1 --preset overhead

A is this checkout as it is, uncommitted changes included; B is the commit `--against`
(default HEAD), checked out in a temporary git worktree. Both run under this checkout's
harness and fake upstream (`bench/run.py --pipeline`), in the order A B, B A, A B, ... so
that a drift of the machine's speed (bench/README.md, Machine) falls on both alike. Neither
writes to bench/results. Everything after `--` goes to bench/run.py for every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
METRICS = (("renders/s", "renders_per_s"), ("efficiency", "efficiency"),
           ("CPU ms/render", "cpu_ms_per_render"), ("peak RSS MB", "peak_rss_mb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/ab.py --rounds 3 -- --mode embedded --preset overhead")
    parser.add_argument("--against", default="HEAD", metavar="REV",
                        help="the commit B (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (default: 3)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="-- then bench/run.py's options")
    args = parser.parse_args(argv)
    bench_args = [a for a in args.bench_args if a != "--"]
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="imagebatch-ab-") as tmp:
        work = Path(tmp)
        try:
            tree = _worktree(args.against, work / "b")
        except subprocess.CalledProcessError as exc:
            print(f"cannot check out {args.against!r}: {exc.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            files = {"A": work / "a.json", "B": work / "b.json"}
            trees = {"A": ROOT, "B": tree}
            failed = 0
            for k in range(args.rounds):
                for side in ("AB" if k % 2 == 0 else "BA"):
                    print(f"[round {k + 1}/{args.rounds}] {side}", flush=True)
                    failed += _run(trees[side], files[side], bench_args)
            print(report(_load(files["A"]), _load(files["B"]), args.against))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True, check=False)
    return 1 if failed else 0


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT,
                   capture_output=True, text=True, check=True)
    return where


def _run(tree: Path, results: Path, bench_args: list[str]) -> int:
    command = [sys.executable, str(BENCH / "run.py"), *bench_args, "--pipeline", str(tree),
               "--results", str(results)]
    done = subprocess.run(command, cwd=ROOT, check=False)
    return 1 if done.returncode else 0


def _load(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else []


def report(a: list[dict[str, Any]], b: list[dict[str, Any]], against: str) -> str:
    """A Markdown table per run shape: each metric's runs of A and B, medians, A / B."""
    lines = [f"\nA: this checkout ({_revisions(a)}); B: {against} ({_revisions(b)})\n"]
    for shape in dict.fromkeys(map(_shape, a + b)):
        runs_a = [r for r in a if _shape(r) == shape]
        runs_b = [r for r in b if _shape(r) == shape]
        lines += [f"{shape}: {len(runs_a)} runs of A, {len(runs_b)} of B", "",
                  "| metric | A | B | median A | median B | A / B |", "|---|---|---|---|---|---|"]
        for title, key in METRICS:
            va = [r[key] for r in runs_a if r.get(key) is not None]
            vb = [r[key] for r in runs_b if r.get(key) is not None]
            if not va and not vb:
                continue
            ma, mb = _median(va), _median(vb)
            ratio = f"{ma / mb:.3f}" if ma is not None and mb else "-"
            lines.append(f"| {title} | {_list(va)} | {_list(vb)} | {_fmt(ma)} | {_fmt(mb)} "
                         f"| {ratio} |")
        lines.append("")
    return "\n".join(lines)


def _shape(r: dict[str, Any]) -> str:
    return (f"{r['preset']} {r['mode']} {r['workers']}×{r['concurrency_per_worker']} "
            f"N={r['n']} latency={r['latency_s']:g}")


def _revisions(records: list[dict[str, Any]]) -> str:
    return ", ".join(dict.fromkeys(str(r.get("git")) for r in records)) or "no runs"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _list(values: list[float]) -> str:
    return " / ".join(_fmt(v) for v in values) or "-"


if __name__ == "__main__":
    sys.exit(main())
