"""Draw efficiency (ideal / wall) against concurrency, one line per mode, into
bench/efficiency.png, from bench/results/latest.json.

    python bench/plot.py                 # the `sweep` runs (any run with latency > 0 if none)
    python bench/plot.py --preset all    # every run with latency > 0
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
DEFAULT_INPUT = BENCH / "results" / "latest.json"
DEFAULT_OUTPUT = BENCH / "efficiency.png"


def points(records: list[dict[str, Any]], preset: str) -> dict[str, list[tuple[int, float]]]:
    """mode -> [(total concurrency, efficiency)], the latest run winning for each point."""
    usable = [r for r in records if r.get("efficiency") is not None]
    if preset != "all":
        chosen = [r for r in usable if r.get("preset") == preset]
        usable = chosen or usable
    latest: dict[tuple[str, int], float] = {}
    for r in usable:
        latest[(r["mode"], r["concurrency"])] = r["efficiency"]
    by_mode: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for (mode, concurrency), efficiency in sorted(latest.items()):
        by_mode[mode].append((concurrency, efficiency))
    return dict(by_mode)


def draw(series: dict[str, list[tuple[int, float]]], records: list[dict[str, Any]],
         output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for mode, values in sorted(series.items()):
        xs, ys = zip(*values, strict=True)
        ax.plot(xs, ys, marker="o", label=mode)
    concurrencies = sorted({c for values in series.values() for c, _ in values})
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.set_ylim(0, 1.05)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("upstream calls in flight (total concurrency)")
    ax.set_ylabel("efficiency = N × latency / concurrency / wall")
    ax.set_title(_title(records))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output)


def _title(records: list[dict[str, Any]]) -> str:
    if not records:
        return "efficiency"
    m = records[-1].get("machine", {})
    latencies = sorted({r["latency_s"] for r in records if r.get("efficiency") is not None})
    shown = ", ".join(f"{x:g}" for x in latencies)
    return f"efficiency vs concurrency (latency {shown} s; {m.get('nproc')} CPUs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--preset", default="sweep", help="which runs to draw (or 'all')")
    args = parser.parse_args(argv)
    records = json.loads(args.input.read_text()) if args.input.exists() else []
    series = points(records, args.preset)
    if not series:
        print(f"no runs with an efficiency in {args.input}: run `python bench/run.py "
              "--preset sweep` first")
        return 1
    draw(series, [r for r in records if r.get("preset") == args.preset] or records, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
