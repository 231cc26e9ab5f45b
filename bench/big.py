"""bench/run.py --preset big: what a user with a 1,000,000-line job sees, against 2,000 lines."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import results
import run as harness
from procs import CpuWindow, Processes, Started, peak_rss_bytes

BIG_N, SMALL_N = 1_000_000, 2_000
CONCURRENCY, LATENCY = 100, 0.2
MODES = ("embedded", "distributed-1")
# The steady window of the big job: from its first call + WARMUP to + WARMUP + WINDOW.
WARMUP, WINDOW = 10.0, 30.0
# Once the big job is planned (every render queued in SQL), a second window of AFTER_PLAN s.
AFTER_PLAN = 20.0
STATUS_RUNS = 5
SUBMIT_TIMEOUT = 300.0  # seconds `submit` may take
FIRST_CALL_TIMEOUT = 180.0  # seconds from the end of `submit` to the first call
PLAN_WAIT = 150.0  # seconds after the window the planning of the big job is waited for
SMALL_TIMEOUT = 180.0  # seconds the small job may take from its first call
TICK = 0.1


class BigError(harness.BenchError):
    """A shape could not be measured."""


# --- the job files -------------------------------------------------------------------------


def write_lines(path: Path, n: int) -> None:
    """The same lines as run.write_job ({"model": ..., "prompt": "bench i"}), 50 MB a second."""
    head = '{"model": "' + harness.MODEL + '", "prompt": "bench '
    with path.open("w") as file:
        for start in range(0, n, 100_000):
            file.write("".join(f'{head}{i}"}}\n' for i in range(start, min(n, start + 100_000))))


# --- looking at the database ---------------------------------------------------------------


class Sqlite:
    """The embedded database, read only (WAL: never blocks the pipeline's writers)."""

    def __init__(self, path: Path) -> None:
        self.path, self.conn = path, None

    def _db(self) -> sqlite3.Connection:
        if self.conn is None:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2,
                                        isolation_level=None)
        return self.conn

    def one(self, sql: str, *args: Any) -> Any:
        for _ in range(20):
            try:
                return self._db().execute(sql, args).fetchone()
            except sqlite3.OperationalError:  # busy, or not migrated yet
                time.sleep(0.05)
        return None

    def sql_bytes(self) -> int:
        """Pages in use (WAL included, free pages not) times the page size."""
        pages, free, size = (self.one(f"PRAGMA {p}")[0] for p in
                             ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class Postgres:
    def __init__(self, database_url: str) -> None:
        import psycopg

        conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
        self.conn = psycopg.connect(conninfo, autocommit=True)

    def one(self, sql: str, *args: Any) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), args).fetchone()  # type: ignore[arg-type]

    def sql_bytes(self) -> int:
        return self.one("SELECT pg_database_size(current_database())")[0]

    def close(self) -> None:
        self.conn.close()


def settled(db: Any) -> int:
    row = db.one("SELECT count(*) FROM attempts WHERE settled_at IS NOT NULL")
    return row[0] if row else 0


def plan_state(db: Any, job_id: int) -> tuple[str | None, int | None, bool]:
    row = db.one("SELECT status, plan_cursor, finished_at FROM jobs WHERE id = ?", job_id)
    return (None, None, False) if row is None else (row[0], row[1], row[2] is not None)


def tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


# --- the first call ------------------------------------------------------------------------


class FirstCall(threading.Thread):
    """Polls the fake upstream's stats every 20 ms until it has seen a generation request."""

    def __init__(self, origin: str) -> None:
        super().__init__(name="first-call", daemon=True)
        self.origin, self.at = origin, None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if harness.fake_stats(self.origin).get("calls", 0) > 0:
                self.at = time.monotonic()
                return
            self.done.wait(0.02)


# --- one shape -----------------------------------------------------------------------------


@dataclass
class Up:
    """The pipeline and its servers, ready for a job."""

    env: dict[str, str]
    origin: str
    db: Any
    workers: list[Started]
    servers: dict[str, int | None]
    data: Path


@dataclass
class Shape:
    spec: harness.Spec
    procs: Processes
    workdir: Path
    env: dict[str, str]
    stamp: str
    cluster: harness.Cluster | None = None
    log: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)


@contextmanager
def pipeline_up(shape: Shape, rundir: Path, *, worker: bool = True) -> Iterator[Up]:
    """The fake upstream, the worker(s) and (distributed) moto and a fresh database."""
    spec, procs = shape.spec, shape.procs
    with ExitStack() as stack:
        fake, origin = harness.start_fake(procs, spec, rundir, shape.env)
        stack.callback(procs.stop, fake)
        data = rundir / "data"
        env = shape.env | {"IMAGEBATCH_DATA_DIR": str(data),
                           "IMAGEBATCH_API_BASE": f"{origin}/v1"}
        servers: dict[str, int | None] = {"upstream": fake.pid}
        if spec.mode == "embedded":
            env["IMAGEBATCH_CONCURRENCY"] = str(spec.concurrency)
            db: Any = Sqlite(data / "imagebatch.db")
        else:
            cluster = shape.cluster
            assert cluster is not None
            moto, endpoint = cluster.start_s3(rundir, shape.env)
            stack.callback(procs.stop, moto)
            cluster.flush_redis()
            database_url = stack.enter_context(cluster.database())
            env |= {
                "IMAGEBATCH_DATABASE_URL": database_url,
                "IMAGEBATCH_BROKER_URL": cluster.redis_url,
                "IMAGEBATCH_STORAGE_URL": "s3://bench/media", "AWS_ENDPOINT_URL_S3": endpoint,
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
                "IMAGEBATCH_CONCURRENCY": str(spec.per_worker)}
            servers |= {"s3": moto.pid, "postgres": cluster.postgres_pid,
                        "redis": cluster.redis_pid}
            db = Postgres(database_url)
        stack.callback(db.close)
        workers: list[Started] = []
        if worker:
            workers = start_workers(shape, rundir, env, db)
            for w in workers:
                stack.callback(procs.stop, w, signal.SIGTERM, 30)
        yield Up(env, origin, db, workers, servers, data)


def start_workers(shape: Shape, rundir: Path, env: dict[str, str], db: Any) -> list[Started]:
    if shape.spec.mode != "embedded":
        assert shape.cluster is not None
        return harness.start_workers(shape.procs, shape.spec, rundir, env, shape.cluster)
    worker = shape.procs.start("worker-1", [harness.PYTHON, "-m", "cli", "worker"], env=env,
                               log=rundir / "worker-1.log", cwd=harness.PIPELINE)

    def announced() -> bool:
        if not db.path.exists():
            return False
        row = db.one("SELECT count(*) FROM workers")
        return bool(row and row[0])

    harness.wait_until(announced, worker, 90, "worker")
    time.sleep(2.0)  # the folder broker's consumer starts after the worker announces itself
    return [worker]


def check_alive(procs: list[Started]) -> None:
    for proc in procs:
        if proc.reap():
            raise BigError(f"{proc.name} died ({proc.proc.returncode}):\n{proc.tail()}")


def wait_for(done: Callable[[], bool], timeout: float, what: str, watched: list[Started],
             tick: Callable[[], None] = lambda: None) -> float:
    deadline = time.monotonic() + timeout
    while not done():
        check_alive(watched)
        tick()
        if time.monotonic() > deadline:
            last = watched[-1] if watched else None
            raise BigError(f"{what} not within {timeout:g} s" +
                           (f"; the end of {last.name}'s log:\n{last.tail(1500)}" if last else ""))
        time.sleep(TICK)
    return time.monotonic()


def status_times(up: Up, job_id: int, runs: int = STATUS_RUNS) -> list[float]:
    """Whole-process wall time of `imagebatch status JOB --json`."""
    times = []
    for _ in range(runs):
        started = time.monotonic()
        out = subprocess.run([harness.PYTHON, "-m", "cli", "status", str(job_id), "--json"],
                             env=up.env, cwd=harness.PIPELINE, capture_output=True, text=True,
                             timeout=300, check=False)
        times.append(time.monotonic() - started)
        if out.returncode != 0:
            raise BigError(f"status {job_id} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return times


def submit(shape: Shape, up: Up, rundir: Path, jobfile: Path, n: int) -> dict[str, Any]:
    """`imagebatch submit FILE` with the worker(s) running: its wall time and peak RSS, and
    the time from its start to the fake upstream's first generation request."""
    sql_before = up.db.sql_bytes() if shape.spec.mode != "embedded" else 0
    disk_before = tree_bytes(up.data)
    first = FirstCall(up.origin)
    first.start()
    launched = time.monotonic()
    proc = shape.procs.start(
        "submit", [harness.PYTHON, "-m", "cli", "submit", str(jobfile), "--budget-cents",
                   str(n * harness.PRICE_CENTS * 10 + 100), "--json"],
        env=up.env, log=rundir / "submit.log", stdout=rundir / "submit.out",
        cwd=harness.PIPELINE)
    ended = wait_for(proc.reap, SUBMIT_TIMEOUT, "submit", up.workers)
    if proc.proc.returncode != 0:
        raise BigError(f"submit exited {proc.proc.returncode}:\n{proc.tail()}")
    job_id = json.loads((rundir / "submit.out").read_text().strip().splitlines()[-1])["id"]
    figures = {"job_id": job_id, "submit_s": ended - launched, "submit_cpu_s": proc.cpu_at_exit,
               "submit_peak_rss_mb": (proc.peak_rss_at_exit or 0) / 2**20,
               "sql_bytes_before_submit": sql_before, "sql_bytes_after_submit": up.db.sql_bytes()}
    if shape.spec.mode == "embedded":  # before: the migrated database and broker folder
        figures["disk_bytes_before_submit"] = disk_before
        figures["disk_bytes_after_submit"] = tree_bytes(up.data)
    try:
        wait_for(lambda: first.at is not None, FIRST_CALL_TIMEOUT, "the first call", up.workers)
    finally:
        first.done.set()
    figures |= {"launched": launched, "submitted": ended, "first_call": first.at,
                "first_call_s": first.at - launched}
    return figures


def big_job(shape: Shape, rundir: Path, jobfile: Path, n: int) -> dict[str, Any]:
    spec = shape.spec
    with pipeline_up(shape, rundir) as up:
        shape.say(f"submit {n:,} lines")
        f = submit(shape, up, rundir, jobfile, n)
        job_id = f["job_id"]
        shape.say(f"submitted in {f['submit_s']:.1f} s ({f['submit_peak_rss_mb']:.0f} MB), "
                  f"first call {f['first_call_s']:.1f} s after the start of submit")
        plan: dict[str, Any] = {}

        def watch_plan() -> None:
            if "done" in plan:
                return
            status, cursor, _ = plan_state(up.db, job_id)
            plan["cursor"] = cursor
            if status not in (None, "submitting", "pending") and cursor is None:
                plan["done"] = time.monotonic()
                plan["sql_bytes"] = up.db.sql_bytes()

        wait_for(lambda: time.monotonic() >= f["first_call"] + WARMUP, WARMUP + 5, "warm-up",
                 up.workers, watch_plan)
        cpu = CpuWindow({w.name: w.pid for w in up.workers})
        others = CpuWindow(up.servers)
        spies = (harness.attach_profilers(shape.procs, up.workers, rundir, up.env, shape.stamp,
                                          spec) if spec.profile else [])
        t1, c1, b1, cursor1 = time.monotonic(), settled(up.db), up.db.sql_bytes(), plan.get(
            "cursor")
        cpu.begin()
        others.begin()
        wait_for(lambda: time.monotonic() >= t1 + WINDOW, WINDOW + 5, "the window", up.workers,
                 watch_plan)
        t2, c2, b2 = time.monotonic(), settled(up.db), up.db.sql_bytes()
        worker_cpu, other_cpu = cpu.end(), others.end()
        cursor2 = plan.get("cursor")
        profile = harness.finish_profilers(shape.procs, spies, rundir, shape.stamp, spec)
        done = c2 - c1
        shape.say(f"window: {done} renders in {t2 - t1:.1f} s = {done / (t2 - t1):.1f}/s")
        status_s = status_times(up, job_id)
        shape.say(f"status: median {statistics.median(status_s):.2f} s")
        if "done" not in plan:
            shape.say("waiting for the planning to end")
            with suppress(BigError):
                wait_for(lambda: "done" in plan, PLAN_WAIT, "planning", up.workers, watch_plan)
        if "done" in plan:  # every render queued in SQL: the steady state of a big job
            f |= after_plan_window(shape, rundir, up, plan["done"])
            shape.say(f"after planning: {f['after_plan_renders_per_s']:.1f}/s")
        upstream = harness.fake_stats(up.origin)
        rss = [peak_rss_bytes(w.pid) or 0 for w in up.workers]
        for w in up.workers:  # status again with the machine quiet, as for the small job
            shape.procs.stop(w, timeout=30)
        status_idle_s = status_times(up, job_id)
        shape.say(f"status with the workers stopped: median "
                  f"{statistics.median(status_idle_s):.2f} s")
        known_cpu = [c for c in worker_cpu.values() if c is not None]
        f |= {
            "renders_per_s": done / (t2 - t1), "window_renders": done,
            "window_s": t2 - t1,
            "cpu_ms_per_render": 1000 * sum(known_cpu) / done if done and known_cpu else None,
            "worker_cpu_s": worker_cpu, "other_cpu_s": other_cpu,
            "sql_bytes_per_render": (b2 - b1) / done if done else None,
            "window_sql_growth_bytes": b2 - b1,
            "lines_planned_in_window": (None if cursor1 is None else
                                        (cursor2 if cursor2 is not None else n) - cursor1),
            "status_s": status_s, "status_idle_s": status_idle_s,
            "plan_s": plan["done"] - f["submitted"] if "done" in plan else None,
            "planned_lines_at_end": n if "done" in plan else plan.get("cursor"),
            "sql_bytes_after_plan": plan.get("sql_bytes"),
            "peak_rss": rss,
            "upstream_max_in_flight": upstream.get("max_in_flight"),
            "upstream_calls": upstream.get("calls"),
            **profile,
        }
        if spec.mode == "embedded":
            f["broker_bytes_at_end"] = tree_bytes(up.data / "broker")
    return f


def after_plan_window(shape: Shape, rundir: Path, up: Up, planned: float) -> dict[str, Any]:
    """renders/s, CPU and SQL growth per render over AFTER_PLAN seconds once planned."""
    wait_for(lambda: time.monotonic() >= planned + 2.0, 5.0, "the plan's end", up.workers)
    cpu = CpuWindow({w.name: w.pid for w in up.workers})
    others = CpuWindow(up.servers)
    spec = shape.spec
    stamp = f"{shape.stamp}-planned"
    spies = (harness.attach_profilers(shape.procs, up.workers, rundir, up.env, stamp, spec)
             if spec.profile else [])
    t1, c1, b1 = time.monotonic(), settled(up.db), up.db.sql_bytes()
    cpu.begin()
    others.begin()
    wait_for(lambda: time.monotonic() >= t1 + AFTER_PLAN, AFTER_PLAN + 5, "the window",
             up.workers)
    t2, c2, b2 = time.monotonic(), settled(up.db), up.db.sql_bytes()
    known_cpu = [c for c in cpu.end().values() if c is not None]
    other_cpu = others.end()
    profile = harness.finish_profilers(shape.procs, spies, rundir, stamp, spec)
    done = c2 - c1
    return {**{f"after_plan_{k}": v for k, v in profile.items()},
            "after_plan_other_cpu_s": other_cpu,
            "after_plan_renders_per_s": done / (t2 - t1), "after_plan_renders": done,
            "after_plan_cpu_ms_per_render": (1000 * sum(known_cpu) / done
                                             if done and known_cpu else None),
            "after_plan_sql_bytes_per_render": (b2 - b1) / done if done else None}


def small_job(shape: Shape, rundir: Path, jobfile: Path, n: int) -> dict[str, Any]:
    with pipeline_up(shape, rundir) as up:
        shape.say(f"submit {n:,} lines")
        f = submit(shape, up, rundir, jobfile, n)
        job_id, b0 = f["job_id"], up.db.sql_bytes()
        cpu = CpuWindow({w.name: w.pid for w in up.workers})
        cpu.begin()
        samples: list[tuple[float, int]] = []

        def sample() -> bool:
            samples.append((time.monotonic(), settled(up.db)))
            return plan_state(up.db, job_id)[2]

        done = wait_for(sample, SMALL_TIMEOUT, "the small job's end", up.workers)
        worker_cpu = cpu.end()
        b1 = up.db.sql_bytes()
        status_s = status_times(up, job_id)
        upstream = harness.fake_stats(up.origin)
        count = samples[-1][1]
        ta, ca = _crossing(samples, 0.1 * count)
        tb, cb = _crossing(samples, 0.9 * count)
        known_cpu = [c for c in worker_cpu.values() if c is not None]
        f |= {
            "renders_per_s": (cb - ca) / (tb - ta) if tb > ta else None,
            "whole_job_renders_per_s": n / (done - f["first_call"]),
            "job_s_from_first_call": done - f["first_call"],
            "cpu_ms_per_render": 1000 * sum(known_cpu) / count if known_cpu else None,
            "sql_bytes_per_render": (b1 - b0) / count if count else None,
            "status_s": status_s,
            "peak_rss": [peak_rss_bytes(w.pid) or 0 for w in up.workers],
            "upstream_max_in_flight": upstream.get("max_in_flight"),
        }
        shape.say(f"done {done - f['first_call']:.1f} s after its first call; 10-90 % "
                  f"{f['renders_per_s']:.1f}/s")
    return f


def _crossing(samples: list[tuple[float, int]], level: float) -> tuple[float, int]:
    """The first sample at or above `level` settled attempts."""
    for at, count in samples:
        if count >= level:
            return at, count
    return samples[-1]


def run_command(shape: Shape, rundir: Path, jobfile: Path, n: int) -> dict[str, Any]:
    """`imagebatch run FILE` (embedded, one process): first call and the steady window."""
    with pipeline_up(shape, rundir, worker=False) as up:
        shape.say(f"imagebatch run {n:,} lines")
        first = FirstCall(up.origin)
        first.start()
        launched = time.monotonic()
        run = shape.procs.start(
            "run", [harness.PYTHON, "-m", "cli", "run", str(jobfile), "--budget-cents",
                    str(n * harness.PRICE_CENTS * 10 + 100), "--json"],
            env=up.env, log=rundir / "run.log", stdout=rundir / "run.out", cwd=harness.PIPELINE)
        try:
            wait_for(lambda: first.at is not None, SUBMIT_TIMEOUT + FIRST_CALL_TIMEOUT,
                     "run's first call", [run])
        finally:
            first.done.set()
        assert first.at is not None
        wait_for(lambda: time.monotonic() >= first.at + WARMUP, WARMUP + 5, "warm-up", [run])
        cpu = CpuWindow({"run": run.pid})
        t1, c1 = time.monotonic(), settled(up.db)
        cpu.begin()
        wait_for(lambda: time.monotonic() >= t1 + WINDOW, WINDOW + 5, "the window", [run])
        t2, c2 = time.monotonic(), settled(up.db)
        run_cpu = cpu.end()["run"]
        rss = peak_rss_bytes(run.pid) or 0
        shape.procs.stop(run)
        done = c2 - c1
        shape.say(f"run: first call {first.at - launched:.1f} s, window {done / (t2 - t1):.1f}/s")
        return {"first_call_s": first.at - launched, "renders_per_s": done / (t2 - t1),
                "window_renders": done,
                "cpu_ms_per_render": 1000 * run_cpu / done if done and run_cpu else None,
                "peak_rss": [rss]}


# --- records and the table -----------------------------------------------------------------


def record(spec: harness.Spec, mode: str, big: dict[str, Any], small: dict[str, Any] | None,
           n: int, small_n: int, env: dict[str, str]) -> dict[str, Any]:
    def mb(values: list[int]) -> float | None:
        return round(max(values) / 2**20, 1) if values else None

    r: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "preset": "big", "mode": mode, "n": n, "small_n": small_n,
        "workers": spec.workers, "concurrency_per_worker": spec.per_worker,
        "concurrency": spec.total_concurrency, "latency_s": spec.latency,
        "media_bytes": spec.media_bytes, "fail_rate": spec.fail_rate,
        "keepalive": spec.keepalive, "profile": spec.profile,
        "renders_per_s": _r(big.get("renders_per_s")),
        "cpu_ms_per_render": _r(big.get("cpu_ms_per_render")),
        "peak_rss_mb": mb(big.get("peak_rss", [])),
        "upstream_max_in_flight": big.get("upstream_max_in_flight"),
        "big": {k: _r(v) if isinstance(v, float) else v for k, v in big.items()
                if k not in ("launched", "submitted", "first_call")},
    }
    if small is not None:
        r["small"] = {k: _r(v) if isinstance(v, float) else v for k, v in small.items()
                      if k not in ("launched", "submitted", "first_call")}
        if big.get("renders_per_s") and small.get("renders_per_s"):
            r["rate_ratio"] = _r(big["renders_per_s"] / small["renders_per_s"])
        if big.get("after_plan_renders_per_s") and small.get("renders_per_s"):
            r["after_plan_rate_ratio"] = _r(big["after_plan_renders_per_s"]
                                            / small["renders_per_s"])
    r |= {"knobs": harness.knobs(env), "loadavg": [round(x, 2) for x in os.getloadavg()],
          "machine": results.machine(), "git": results.git_revision(harness.PIPELINE)}
    return r


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4 if abs(value) < 1 else 2)


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("submit s (whole process)", lambda r: r["big"].get("submit_s")),
    ("submit peak RSS MB", lambda r: r["big"].get("submit_peak_rss_mb")),
    ("submit CPU s", lambda r: r["big"].get("submit_cpu_s")),
    ("first call s (from the start of submit)", lambda r: r["big"].get("first_call_s")),
    ("planning s (submit's end to plan_cursor NULL)", lambda r: r["big"].get("plan_s")),
    ("renders/s, big job, first call +10 to +40 s", lambda r: r["big"].get("renders_per_s")),
    ("renders/s, big job, once planned (20 s)",
     lambda r: r["big"].get("after_plan_renders_per_s")),
    ("renders/s, small job (10-90 %)", lambda r: r.get("small", {}).get("renders_per_s")),
    ("ratio big (+10 to +40 s) / small (target ≥ 0.85)", lambda r: r.get("rate_ratio")),
    ("ratio big (once planned) / small (target ≥ 0.85)",
     lambda r: r.get("after_plan_rate_ratio")),
    ("renders/s, small job (first call to end)",
     lambda r: r.get("small", {}).get("whole_job_renders_per_s")),
    ("worker CPU ms/render, big (+10 to +40 s)", lambda r: r["big"].get("cpu_ms_per_render")),
    ("worker CPU ms/render, big (once planned)",
     lambda r: r["big"].get("after_plan_cpu_ms_per_render")),
    ("worker CPU ms/render, small", lambda r: r.get("small", {}).get("cpu_ms_per_render")),
    ("status --json s, big, running (median)", lambda r: _median(r["big"].get("status_s"))),
    ("status --json s, big, workers stopped (median)",
     lambda r: _median(r["big"].get("status_idle_s"))),
    ("status --json s, small, ended (median)",
     lambda r: _median(r.get("small", {}).get("status_s"))),
    ("bytes/line on disk after submit (data dir, growth)",
     lambda r: _grown(r, "disk_bytes_after_submit", "disk_bytes_before_submit")),
    ("SQL bytes/line after submit (growth)",
     lambda r: _grown(r, "sql_bytes_after_submit", "sql_bytes_before_submit")),
    ("SQL bytes/line once planned (growth)",
     lambda r: _grown(r, "sql_bytes_after_plan", "sql_bytes_before_submit")),
    ("SQL bytes/render, big (+10 to +40 s)", lambda r: r["big"].get("sql_bytes_per_render")),
    ("lines planned in that window", lambda r: r["big"].get("lines_planned_in_window")),
    ("SQL bytes/render, big (once planned)",
     lambda r: r["big"].get("after_plan_sql_bytes_per_render")),
    ("SQL bytes/render, small job", lambda r: r.get("small", {}).get("sql_bytes_per_render")),
    ("worker peak RSS MB, big", lambda r: r.get("peak_rss_mb")),
    ("upstream max in flight, big", lambda r: r.get("upstream_max_in_flight")),
]


def _grown(r: dict[str, Any], after: str, before: str) -> float | None:
    """(after - before) / lines of the big job; embedded SQL counts from 0 (the migrated
    file is part of what a user's data dir holds)."""
    end, start = r["big"].get(after), r["big"].get(before) or 0
    return None if end is None else (end - start) / r["n"]


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| figure | " + " | ".join(r["mode"] for r in records) + " |",
             "|---|" + "---|" * len(records)]
    for title, get in ROWS:
        cells = []
        for r in records:
            with suppress(KeyError, TypeError):
                value = get(r)
                cells.append(_fmt(value))
                continue
            cells.append("-")
        if any(c != "-" for c in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# --- main ----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """`python bench/run.py --preset big` (bench/run.py's parsed options)."""
    if args.pipeline is not None:
        harness.PIPELINE = args.pipeline.resolve()
    modes = MODES if args.mode in (None, "all") else (args.mode,)
    n = args.n or BIG_N
    small_n = min(SMALL_N, n)
    signal.signal(signal.SIGTERM, harness._interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    target = args.results or results.LATEST_JSON
    if args.fresh:
        results.clear(target)
    workdir = Path(tempfile.mkdtemp(prefix="imagebatch-bench-big-"))
    procs, env = Processes(), harness.base_env()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    cluster: harness.Cluster | None = None
    records, failures = [], 0
    started = time.monotonic()
    try:
        t = time.monotonic()
        big_file, small_file = workdir / "big.jsonl", workdir / "small.jsonl"
        write_lines(big_file, n)
        write_lines(small_file, small_n)
        print(f"big: {n:,} lines written in {time.monotonic() - t:.1f} s "
              f"({big_file.stat().st_size / 2**20:.0f} MiB)", flush=True)
        for mode in modes:
            spec = harness.Spec(preset="big", mode=mode, n=n,
                                concurrency=args.concurrency or CONCURRENCY,
                                latency=LATENCY if args.latency is None else args.latency,
                                media_bytes=args.media_bytes or 2048,
                                fail_rate=args.fail_rate or 0.0, keepalive=args.keepalive,
                                profile=args.profile, timeout=args.timeout)
            print(f"[big] {mode} N={n:,} against {small_n:,} C={spec.total_concurrency} "
                  f"latency={spec.latency:g}", flush=True)
            if mode != "embedded" and cluster is None:
                cluster = harness.Cluster(workdir, procs, env)
            shape = Shape(spec, procs, workdir, env, stamp, cluster)
            try:
                rundirs = [_rundir(workdir, mode, part) for part in ("big", "small", "run")]
                big = big_job(shape, rundirs[0], big_file, n)
                small = small_job(shape, rundirs[1], small_file, small_n)
                shape_records = [record(spec, mode, big, small, n, small_n, env)]
                if mode == "embedded" and not args.no_run:
                    ran = run_command(shape, rundirs[2], big_file, n)
                    shape_records.append(record(spec, "embedded (run)", ran, None, n, small_n,
                                                env))
            except harness.BenchError as exc:
                failures += 1
                procs.stop_all()
                kept = [str(harness.keep_logs(d)) for d in rundirs if d.exists()]
                print(f"big {mode} failed: {exc}\nits logs: {', '.join(kept)}", file=sys.stderr)
                continue
            for r in shape_records:
                results.append(r, target)
            records.extend(shape_records)
            if not args.keep_temp:
                for d in rundirs:
                    harness.clear_run_data(d)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        harness.tear_down(procs, cluster, workdir, keep=args.keep_temp)
    if records:
        print(f"\nbig jobs: {n:,} lines against {small_n:,}, latency {records[0]['latency_s']:g} "
              f"s, concurrency {records[0]['concurrency']}, "
              f"{time.monotonic() - started:.0f} s in all\n")
        print(table(records))
    print(f"results: {target}")
    return 1 if failures else 0


def _rundir(workdir: Path, mode: str, part: str) -> Path:
    path = workdir / f"{mode}-{part}"
    path.mkdir(exist_ok=True)
    return path
