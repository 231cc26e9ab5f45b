"""py-spy profiles of pipeline processes, and a text summary of where their CPU went.

`attach` starts `py-spy record --pid PID --nonblocking -f speedscope` beside a pipeline
process (py-spy is its own process, so its CPU is not counted as the pipeline's); the file
is written when the target exits or when py-spy gets SIGINT. `summarize` aggregates the
speedscope samples of all threads by function, leaving out idle frames.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from procs import Processes, Started

# Leaf frames that mean "this thread is waiting", not working. py-spy already drops most idle
# samples (no --idle); these catch the ones its heuristic lets through with --nonblocking.
IDLE_LEAVES = frozenset({
    "wait", "_wait_for_tstate_lock", "select", "poll", "epoll", "sleep", "accept", "_poll",
})
IDLE_FILES = ("selectors.py", "threading.py", "queue.py")
OWN = ("pipeline/", "workers/", "cli.py")
ROOT = Path(__file__).resolve().parent.parent


def attach(procs: Processes, target: Started, output: Path, log: Path,
           env: dict[str, str], rate: int = 200) -> Started:
    binary = shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not on PATH: pip install py-spy")
    args = [binary, "record", "--pid", str(target.pid), "--nonblocking", "-f", "speedscope",
            "--rate", str(rate), "-o", str(output)]
    return procs.start(f"py-spy {target.name}", args, env=env, log=log)


def finish(procs: Processes, spy: Started, timeout: float = 60.0) -> None:
    """Let py-spy write its file: it stops by itself when the target exited, else SIGINT."""
    deadline = time.monotonic() + 5.0
    while not spy.reap() and time.monotonic() < deadline:
        time.sleep(0.1)
    if spy.alive():
        procs.stop(spy, sig=signal.SIGINT, timeout=timeout)
    else:
        procs.stop(spy)


def summarize(files: Iterable[Path], top: int = 25) -> str:
    """Where the sampled time went: by package, by function (self and total), and the
    project's own functions (pipeline/, workers/, cli.py) by total time."""
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    own_time: Counter[str] = Counter()
    package_time: Counter[str] = Counter()
    busy = idle = 0.0
    for stack, weight in _stacks(files):
        if _is_idle(stack[-1]):
            idle += weight
            continue
        busy += weight
        self_time[_label(stack[-1], line=True)] += weight
        package_time[_package(stack[-1].get("file") or "?")] += weight
        labels = {_label(frame) for frame in stack}
        for label in labels:
            total_time[label] += weight
        for label in {label for label in labels if label.split("(", 1)[1].startswith(OWN)}:
            own_time[label] += weight
    lines = [f"sampled thread time: {busy:.2f} s busy, {idle:.2f} s idle (left out)", ""]
    lines += _table("by package (self time)", package_time, busy, top)
    lines += _table("lines by self time (a `with lock` line: waiting for that lock)",
                    self_time, busy, top)
    lines += _table("functions by total time (self + callees)", total_time, busy, top)
    lines += _table("project functions by total time", own_time, busy, top)
    return "\n".join(lines) + "\n"


def _stacks(files: Iterable[Path]) -> Iterable[tuple[list[dict], float]]:
    """(frames root first, seconds) for every sample of every thread; py-spy's speedscope
    weights are seconds (1 / rate each)."""
    for file in files:
        data = json.loads(file.read_text())
        frames = data["shared"]["frames"]
        for profile in data["profiles"]:
            weights = profile.get("weights") or [0.01] * len(profile["samples"])
            for sample, weight in zip(profile["samples"], weights, strict=False):
                if sample:
                    yield [frames[i] for i in sample], weight


def _is_idle(frame: dict) -> bool:
    file = frame.get("file") or ""
    return frame["name"] in IDLE_LEAVES or file.endswith(IDLE_FILES)


def _label(frame: dict, *, line: bool = False) -> str:
    """`function (file)`, or `function (file:line)` for the line the sample was on."""
    where = _short(frame.get("file") or "?")
    return f"{frame['name']} ({where}:{frame.get('line') or '?'})" if line else \
        f"{frame['name']} ({where})"


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", f"{ROOT}/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _package(file: str) -> str:
    """The top-level package (or module) a file belongs to, marked (stdlib) or (project)."""
    head = _short(file).split("/", 1)[0].removesuffix(".py")
    if file.startswith(f"{ROOT}/"):
        return f"{head} (project)"
    if "site-packages/" in file:
        return head
    return f"{head} (stdlib)"


def _table(title: str, seconds: Counter[str], busy: float, top: int) -> list[str]:
    lines = [f"{title}:"]
    for label, value in seconds.most_common(top):
        lines.append(f"  {100 * value / max(busy, 1e-9):5.1f}%  {value:7.2f} s  {label}")
    return [*lines, ""]
