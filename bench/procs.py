"""The processes a benchmark run starts, and what they cost (CPU seconds, peak RSS).

Every process is started in its own session (process group) and registered, so `stop_all`
can end it and its children by group id, on success, error or Ctrl-C alike. Nothing is
ever killed by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass
class Started:
    """One process we started: its Popen, its log, and its rusage once reaped by `reap`."""

    name: str
    proc: subprocess.Popen
    log: Path
    cpu_at_exit: float | None = None
    peak_rss_at_exit: int | None = None  # bytes (ru_maxrss of the process and its children)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None and self.cpu_at_exit is None

    def reap(self) -> bool:
        """True once the process has exited; its CPU (with reaped children) is then exact."""
        if not self.alive():
            return True
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.cpu_at_exit = usage.ru_utime + usage.ru_stime
        self.peak_rss_at_exit = usage.ru_maxrss * 1024
        return True

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Processes:
    """Registry of started processes; `stop_all` ends them in reverse order."""

    started: list[Started] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, env: dict[str, str], log: Path,
              stdout: Path | None = None, cwd: Path | None = None) -> Started:
        with log.open("ab") as err, (stdout or log).open("ab") as out:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
                start_new_session=True,
            )
        item = Started(name, proc, log)
        self.started.append(item)
        return item

    def stop(self, item: Started, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Signal the process group, wait, then SIGKILL the group if it is still there."""
        if item.alive():
            _signal_group(item.pid, sig)
            deadline = time.monotonic() + timeout
            while not item.reap() and time.monotonic() < deadline:
                time.sleep(0.05)
        if item.alive() or _group_exists(item.pid):
            _signal_group(item.pid, signal.SIGKILL)
            while item.alive() and not item.reap():
                time.sleep(0.02)
        if item in self.started:
            self.started.remove(item)

    def stop_all(self) -> None:
        for item in reversed(list(self.started)):
            with contextlib.suppress(OSError, ChildProcessError):
                self.stop(item, timeout=10.0)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# --- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process, its reaped children and its live descendants."""
    try:
        proc = psutil.Process(pid)
        times = proc.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        descendants = proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    for child in descendants:
        try:
            child_times = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        total += child_times.user + child_times.system
    return total


def peak_rss_bytes(pid: int) -> int | None:
    """The kernel's high-water mark of resident memory (VmHWM) of a live process."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def find_child(name_prefix: str) -> int | None:
    """The pid of a direct child of this process whose name starts with `name_prefix`
    (the PostgreSQL and Redis servers started by tests/servers.py)."""
    for child in psutil.Process().children():
        try:
            if child.name().startswith(name_prefix):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None


class CpuWindow:
    """CPU spent by a set of processes between `begin` and `end` (None for unknown pids)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.before: dict[str, float | None] = {}

    def begin(self) -> None:
        self.before = {name: _cpu_or_none(pid) for name, pid in self.pids.items()}

    def end(self) -> dict[str, float | None]:
        spent: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, then = _cpu_or_none(pid), self.before.get(name)
            spent[name] = None if now is None or then is None else round(now - then, 3)
        return spent


def _cpu_or_none(pid: int | None) -> float | None:
    return None if pid is None else cpu_seconds(pid)
