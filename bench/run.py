"""Benchmark harness: N renders through the pipeline against the fake upstream.

    python bench/run.py --preset efficiency            # the issue's target runs
    python bench/run.py --mode embedded -n 500 --concurrency 100 --latency 1
    python bench/run.py --preset overhead -n 500 --profile

Each run starts the fake upstream as its own process, runs a job of N renders
({"model": "flux-2-klein-4b", "prompt": "bench i"}, 1 cent each) in the chosen mode, and
appends one record to bench/results/latest.json (and rewrites latest.md). See bench/README.md
for what every number means. Every process it starts is stopped at the end, also on errors
and Ctrl-C, and its temporary folders are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import profiling
import results
from procs import CpuWindow, Processes, Started, cpu_seconds, find_child, peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
# The tree whose pipeline is measured (`--pipeline`; bench/ab.py points it at another
# revision). The harness and the fake upstream always come from ROOT.
PIPELINE = ROOT
sys.path.insert(0, str(ROOT))  # tests.servers

PYTHON = sys.executable
MODEL, PRICE_CENTS = "flux-2-klein-4b", 1
MODES = ("embedded", "distributed-1", "distributed-2")
POLL = 0.05  # seconds between two looks at the job row
OWN_VARS = ("DATA_DIR", "DATABASE_URL", "BROKER_URL", "STORAGE_URL", "API_BASE", "API_KEY",
            "CONCURRENCY")


class BenchError(RuntimeError):
    """A run could not be measured (a process died, the job did not finish in time)."""


@dataclass(frozen=True)
class Spec:
    """One run: a job of n renders in one mode."""

    preset: str
    mode: str
    n: int
    concurrency: int
    latency: float
    media_bytes: int = 2048
    fail_rate: float = 0.0
    keepalive: float = 0.2
    profile: bool = False
    timeout: float | None = None

    @property
    def workers(self) -> int:
        return 2 if self.mode == "distributed-2" else 1

    @property
    def per_worker(self) -> int:
        return max(1, self.concurrency // self.workers)

    @property
    def total_concurrency(self) -> int:
        return self.per_worker * self.workers

    @property
    def ideal_s(self) -> float:
        return self.n * self.latency / self.total_concurrency

    @property
    def deadline_s(self) -> float:
        return self.timeout or 120 + 10 * self.ideal_s + 0.05 * self.n


# --- presets ---------------------------------------------------------------------------------

BOTH = ("embedded", "distributed-1")
PRESETS: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]] = {
    "efficiency": (MODES, [{"n": 4000, "concurrency": 200, "latency": 1.0}]),
    "overhead": (BOTH, [{"n": 2000, "concurrency": 100, "latency": 0.0}]),
    # 500 in flight needs throughput x latency = 500: at 10 s that is 50 renders/s, which a
    # 2-core machine moving 2 MiB per render can sustain (at 1 s it would take 500/s).
    "memory": (BOTH, [{"n": 1500, "concurrency": 500, "latency": 10.0,
                       "media_bytes": 2 * 1024 * 1024}]),
    "linear": (BOTH, [{"n": n, "concurrency": 200, "latency": 0.2} for n in (1000, 4000, 16000)]),
    "sweep": (BOTH, [{"n": 10 * c, "concurrency": c, "latency": 1.0}
                     for c in (25, 50, 100, 200, 400)]),
}
DEFAULT_RUN = {"n": 500, "concurrency": 100, "latency": 1.0}


def build_specs(args: argparse.Namespace) -> list[Spec]:
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    specs = []
    for name in names:
        modes, runs = PRESETS[name] if name else (MODES, [DEFAULT_RUN])
        if args.mode:
            modes = MODES if args.mode == "all" else (args.mode,)
        for run in runs:
            for mode in modes:
                specs.append(_spec(name or "custom", mode, run, args))
    return specs


def _spec(preset: str, mode: str, run: dict[str, Any], args: argparse.Namespace) -> Spec:
    values = dict(run)
    if args.n is not None:
        # linear keeps its 1:4:16 ratio with -n as the largest size; the others take -n as is
        values["n"] = max(1, args.n * run["n"] // 16000) if preset == "linear" else args.n
    for key in ("concurrency", "latency", "media_bytes", "fail_rate"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return Spec(preset=preset, mode=mode, keepalive=args.keepalive, profile=args.profile,
                timeout=args.timeout, **values)


# --- the environment -------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without the IMAGEBATCH_* variables the harness sets itself; any
    other IMAGEBATCH_* (tuning knobs) passes through to the pipeline and is recorded."""
    own = {f"IMAGEBATCH_{name}" for name in OWN_VARS}
    env = {k: v for k, v in os.environ.items() if k not in own}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PIPELINE), env.get("PYTHONPATH")]))
    return env


def knobs(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("IMAGEBATCH_")}


def write_job(path: Path, n: int) -> None:
    with path.open("w") as file:
        for i in range(n):
            file.write(json.dumps({"model": MODEL, "prompt": f"bench {i}"}) + "\n")


def budget_cents(spec: Spec) -> int:
    return spec.n * PRICE_CENTS * 10 + 100


# --- the fake upstream -----------------------------------------------------------------------


def start_fake(procs: Processes, spec: Spec, workdir: Path,
               env: dict[str, str]) -> tuple[Started, str]:
    from tests.servers import free_port

    port = free_port()
    args = [PYTHON, "-m", "cli", "fake-upstream", "--port", str(port), "--latency",
            str(spec.latency), "--keepalive", str(spec.keepalive), "--media-bytes",
            str(spec.media_bytes), "--fail-rate", str(spec.fail_rate)]
    fake = procs.start("fake-upstream", args, env=env | {"PYTHONPATH": str(ROOT)},
                       log=workdir / "fake.log", cwd=ROOT)
    origin = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_ok(f"{origin}/v1/models"), fake, 30, "fake upstream")
    return fake, origin


def fake_stats(origin: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"{origin}/_fake/stats", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return {}


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], proc: Started | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.reap():
            raise BenchError(f"{what} exited ({proc.proc.returncode}):\n{proc.tail()}")
        if ready():
            return
        time.sleep(0.05)
    raise BenchError(f"{what} not ready after {timeout:g} s" +
                     (f":\n{proc.tail()}" if proc else ""))


# --- watching a job --------------------------------------------------------------------------


class SqliteWatch:
    """Looks at the newest job row of the embedded SQLite database (read only, WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def poll(self) -> tuple[int | None, bool]:
        if self.conn is None:
            if not self.path.exists():
                return None, False
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.2,
                                        isolation_level=None)
        try:
            row = self.conn.execute(
                "SELECT id, finished_at FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        except sqlite3.OperationalError:  # not migrated yet, or busy
            return None, False
        return (None, False) if row is None else (row[0], row[1] is not None)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class PostgresWatch:
    def __init__(self, conninfo: str) -> None:
        import psycopg

        self.conn = psycopg.connect(conninfo, autocommit=True)

    def poll(self) -> tuple[int | None, bool]:
        row = self.conn.execute(
            "SELECT id, finished_at FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        return (None, False) if row is None else (row[0], row[1] is not None)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Timeline:
    launched: float
    job_seen: float | None = None
    done: float | None = None
    job_id: int | None = None


def follow(watch: Any, driver: Started, spec: Spec, *, must_finish_driver: bool,
           on_job: Callable[[], None], on_tick: Callable[[], None],
           watched: list[Started]) -> Timeline:
    """Poll the job row until it is finished; time it with time.monotonic."""
    line = Timeline(launched=time.monotonic())
    deadline = line.launched + spec.deadline_s
    while True:
        exited = driver.reap()
        job_id, finished = watch.poll()
        now = time.monotonic()
        if job_id is not None and line.job_seen is None:
            line.job_seen, line.job_id = now, job_id
            on_job()
        if finished:
            line.done = now
            return line
        on_tick()
        _check_alive(driver, exited, must_finish_driver, watched)
        if now > deadline:
            last = watched[-1] if watched and driver.proc.returncode == 0 else driver
            raise BenchError(f"the job did not finish in {spec.deadline_s:.0f} s; the end of "
                             f"{last.name}'s log:\n{last.tail(1500)}")
        time.sleep(POLL)


def _check_alive(driver: Started, exited: bool, must_finish: bool, watched: list[Started]) -> None:
    if exited and (must_finish or driver.proc.returncode != 0):
        raise BenchError(f"{driver.name} exited ({driver.proc.returncode}) before the job "
                         f"finished:\n{driver.tail()}")
    for proc in watched:
        if proc.reap():
            raise BenchError(f"{proc.name} died ({proc.proc.returncode}):\n{proc.tail()}")


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Measured:
    line: Timeline
    pipeline_cpu_s: float | None
    peak_rss: list[int]
    other_cpu_s: dict[str, float | None]
    summary: dict[str, Any]
    upstream: dict[str, Any]
    extra: dict[str, Any]


def clear_run_data(rundir: Path) -> None:
    """Delete a finished run's media and database and flush the disk, so the next run starts
    on a quiet disk (the memory preset writes 3 GiB of media)."""
    shutil.rmtree(rundir / "data", ignore_errors=True)
    os.sync()


def run_embedded(spec: Spec, procs: Processes, workdir: Path, env: dict[str, str],
                 stamp: str) -> Measured:
    fake, origin = start_fake(procs, spec, workdir, env)
    data = workdir / "data"
    env = env | {"IMAGEBATCH_DATA_DIR": str(data), "IMAGEBATCH_API_BASE": f"{origin}/v1",
                 "IMAGEBATCH_CONCURRENCY": str(spec.concurrency)}
    write_job(workdir / "jobs.jsonl", spec.n)
    args = [PYTHON, "-m", "cli", "run", str(workdir / "jobs.jsonl"), "--budget-cents",
            str(budget_cents(spec)), "--json"]
    run = procs.start("run", args, env=env, log=workdir / "run.log", stdout=workdir / "run.out",
                      cwd=PIPELINE)
    others = CpuWindow({"upstream": fake.pid})
    state: dict[str, Any] = {"cpu0": None, "hwm": 0}
    spies: list[tuple[Started, Path]] = []

    def on_job() -> None:
        state["cpu0"] = cpu_seconds(run.pid)
        others.begin()
        if spec.profile:  # from the job on: the imports and migrations are not the question
            spies.extend(attach_profilers(procs, [run], workdir, env, stamp, spec))

    def on_tick() -> None:
        state["hwm"] = max(state["hwm"], peak_rss_bytes(run.pid) or 0)

    watch = SqliteWatch(data / "imagebatch.db")
    try:
        line = follow(watch, run, spec, must_finish_driver=True, on_job=on_job,
                      on_tick=on_tick, watched=[fake])
        other_cpu = others.end()
        wait_exit(run, on_tick, 60)
    finally:
        watch.close()
    upstream = fake_stats(origin)
    procs.stop(fake)
    profile = finish_profilers(procs, spies, workdir, stamp, spec)
    cpu = None if state["cpu0"] is None else run.cpu_at_exit - state["cpu0"]
    return Measured(line, cpu, [state["hwm"]], other_cpu, job_status(env, line.job_id, workdir),
                    upstream, {"run_cpu_total_s": run.cpu_at_exit, **profile})


def wait_exit(proc: Started, on_tick: Callable[[], None], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not proc.reap():
        on_tick()
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not exit {timeout:g} s after its job finished")
        time.sleep(POLL)


def job_status(env: dict[str, str], job_id: int | None, workdir: Path) -> dict[str, Any]:
    """`imagebatch status JOB --json` (run after the measurement, so not counted)."""
    if job_id is None:
        return {}
    out = subprocess.run([PYTHON, "-m", "cli", "status", str(job_id), "--json"], env=env,
                         cwd=PIPELINE, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        (workdir / "status.log").write_text(out.stdout + out.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- distributed -----------------------------------------------------------------------------


class Cluster:
    """Redis and PostgreSQL (tests/servers.py) for the whole session; a migrated template
    database that every run clones; S3 (moto) as its own process, fresh for every run."""

    def __init__(self, workdir: Path, procs: Processes, env: dict[str, str]) -> None:
        from tests.servers import start_postgres, start_redis

        self.procs, self.workdir, self.runs = procs, workdir, 0
        self.stops: list[Callable[[], None]] = []
        self.redis_url, stop = start_redis()
        self.stops.append(stop)
        self.redis_pid = find_child("redis")
        # As a deployment would size it: with the default 128 MB of buffer cache a
        # 1,000,000-line job's rows and indexes do not fit, and the big preset's distributed
        # shape ran at 0.60-0.79 of a small job's rate (1.05-1.15 with 1 GB).
        pg_url, stop = start_postgres({"shared_buffers": "1GB"})
        self.stops.append(stop)
        self.postgres_pid = find_child("postgres")
        self.pg_url = pg_url.rsplit("/", 1)[0]
        self.admin("CREATE DATABASE bench_template")
        migrate = env | {"IMAGEBATCH_DATABASE_URL": f"{self.pg_url}/bench_template"}
        subprocess.run([PYTHON, "-m", "cli", "db", "upgrade"], env=migrate, cwd=PIPELINE,
                       check=True, capture_output=True)

    def admin(self, statement: str) -> None:
        import psycopg

        conninfo = self.pg_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    @contextmanager
    def database(self) -> Iterator[str]:
        self.runs += 1
        name = f"bench_run_{self.runs}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE bench_template')
        try:
            yield f"{self.pg_url}/{name}"
        finally:
            with suppress(Exception):
                self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_counters(self, database_url: str) -> dict[str, int]:
        """Transactions and rows of one database so far (pg_stat_database; a backend reports
        its counts when it exits or idles, so read the end after the workers stopped)."""
        import psycopg

        name = database_url.rsplit("/", 1)[1]
        conninfo = self.pg_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
                "tup_returned + tup_fetched, sessions FROM pg_stat_database WHERE datname = %s",
                (name,)).fetchone()
        keys = ("commits", "rollbacks", "inserted", "updated", "deleted", "read", "sessions")
        return dict(zip(keys, row or (0,) * len(keys), strict=True))

    def pg_per_render(self, database_url: str, before: dict[str, int], n: int
                      ) -> dict[str, float]:
        time.sleep(1.0)  # let the last backends' statistics land
        after = self.pg_counters(database_url)
        return {key: round((after[key] - before[key]) / n, 2) for key in after}

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            client.flushall()
        finally:
            client.close()

    def redis_consumers(self) -> int:
        """Clients blocked in BRPOP: Celery consumers waiting for tasks."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return sum(1 for c in client.client_list() if c.get("cmd") in ("brpop", "bzpopmin"))
        finally:
            client.close()

    def start_s3(self, workdir: Path, env: dict[str, str]) -> tuple[Started, str]:
        from tests.servers import free_port

        port = free_port()
        moto = self.procs.start("moto", [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(port)], env=env, log=workdir / "moto.log")
        endpoint = f"http://127.0.0.1:{port}"
        wait_until(lambda: _create_bucket(endpoint), moto, 60, "moto S3 server")
        return moto, endpoint

    def stop(self) -> None:
        for stop in reversed(self.stops):
            with suppress(Exception):
                stop()
        self.stops.clear()


def _create_bucket(endpoint: str) -> bool:
    import boto3
    import botocore.exceptions

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    try:
        s3.create_bucket(Bucket="bench")
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionError):
        return False
    return True


def run_distributed(spec: Spec, procs: Processes, workdir: Path, env: dict[str, str],
                    stamp: str, cluster: Cluster) -> Measured:
    fake, origin = start_fake(procs, spec, workdir, env)
    moto, endpoint = cluster.start_s3(workdir, env)
    cluster.flush_redis()
    with cluster.database() as database_url:
        env = env | {
            "IMAGEBATCH_DATA_DIR": str(workdir / "data"), "IMAGEBATCH_API_BASE": f"{origin}/v1",
            "IMAGEBATCH_DATABASE_URL": database_url, "IMAGEBATCH_BROKER_URL": cluster.redis_url,
            "IMAGEBATCH_STORAGE_URL": "s3://bench/media", "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "IMAGEBATCH_CONCURRENCY": str(spec.per_worker)}
        workers = start_workers(procs, spec, workdir, env, cluster)
        spies = attach_profilers(procs, workers, workdir, env, stamp, spec) if spec.profile else []
        before = cluster.pg_counters(database_url)
        measured = _measure_distributed(spec, procs, workdir, env, cluster, workers,
                                        {"upstream": fake.pid, "s3": moto.pid})
        for worker in workers:
            procs.stop(worker, timeout=30)
        measured.extra["postgres_per_render"] = cluster.pg_per_render(database_url, before,
                                                                      spec.n)
        measured.upstream = fake_stats(origin)
        measured.extra |= finish_profilers(procs, spies, workdir, stamp, spec)
    procs.stop(fake)
    procs.stop(moto)
    return measured


def start_workers(procs: Processes, spec: Spec, workdir: Path, env: dict[str, str],
                  cluster: Cluster) -> list[Started]:
    workers = [procs.start(f"worker-{i + 1}", [PYTHON, "-m", "cli", "worker"], env=env,
                           log=workdir / f"worker-{i + 1}.log", cwd=PIPELINE)
               for i in range(spec.workers)]

    def ready() -> bool:
        for worker in workers:
            if worker.reap():
                raise BenchError(f"{worker.name} exited ({worker.proc.returncode}):\n"
                                 f"{worker.tail()}")
        return cluster.redis_consumers() >= spec.workers

    wait_until(ready, None, 90, "workers")
    time.sleep(0.5)  # let their first dispatch/sweep tick pass
    return workers


def _measure_distributed(spec: Spec, procs: Processes, workdir: Path, env: dict[str, str],
                         cluster: Cluster, workers: list[Started],
                         servers: dict[str, int]) -> Measured:
    pipeline = CpuWindow({w.name: w.pid for w in workers})
    others = CpuWindow(servers | {"postgres": cluster.postgres_pid, "redis": cluster.redis_pid})
    write_job(workdir / "jobs.jsonl", spec.n)
    args = [PYTHON, "-m", "cli", "submit", str(workdir / "jobs.jsonl"), "--budget-cents",
            str(budget_cents(spec)), "--json"]
    submit = procs.start("submit", args, env=env, log=workdir / "submit.log",
                         stdout=workdir / "submit.out", cwd=PIPELINE)

    def on_job() -> None:
        pipeline.begin()
        others.begin()

    conninfo = env["IMAGEBATCH_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    watch = PostgresWatch(conninfo)
    try:
        line = follow(watch, submit, spec, must_finish_driver=False, on_job=on_job,
                      on_tick=lambda: None, watched=workers)
    finally:
        watch.close()
    per_worker = pipeline.end()
    other_cpu = others.end()
    rss = [peak_rss_bytes(w.pid) or 0 for w in workers]
    wait_exit(submit, lambda: None, 60)
    cpu = None if None in per_worker.values() else sum(per_worker.values())  # type: ignore[arg-type]
    extra = {"worker_cpu_s": per_worker, "submit_cpu_total_s": submit.cpu_at_exit}
    return Measured(line, cpu, rss, other_cpu, job_status(env, line.job_id, workdir), {}, extra)


# --- profiles --------------------------------------------------------------------------------


def attach_profilers(procs: Processes, targets: list[Started], workdir: Path,
                     env: dict[str, str], stamp: str, spec: Spec) -> list[tuple[Started, Path]]:
    results.RESULTS.mkdir(parents=True, exist_ok=True)
    spies = []
    for target in targets:
        output = results.RESULTS / f"profile-{stamp}-{spec.mode}-{target.name}.speedscope.json"
        spy = profiling.attach(procs, target, output, workdir / f"py-spy-{target.name}.log", env)
        spies.append((spy, output))
    return spies


def finish_profilers(procs: Processes, spies: list[tuple[Started, Path]], workdir: Path,
                     stamp: str, spec: Spec) -> dict[str, Any]:
    if not spies:
        return {}
    for spy, _ in spies:
        profiling.finish(procs, spy)
    files = [output for _, output in spies if output.exists()]
    if not files:
        logs = "\n".join(spy.tail() for spy, _ in spies)
        print(f"py-spy wrote no profile:\n{logs}", file=sys.stderr)
        return {}
    summary = results.RESULTS / f"profile-{stamp}-{spec.mode}.txt"
    summary.write_text(profiling.summarize(files))
    print(f"profile: {', '.join(str(f.relative_to(ROOT)) for f in files)}\n"
          f"summary: {summary.relative_to(ROOT)}\n")
    print(summary.read_text())
    return {"profiles": [str(f.relative_to(ROOT)) for f in files],
            "profile_summary": str(summary.relative_to(ROOT))}


# --- records ---------------------------------------------------------------------------------


def record(spec: Spec, m: Measured, env: dict[str, str]) -> dict[str, Any]:
    line = m.line
    wall = line.done - line.job_seen if line.done and line.job_seen else None
    cpu = m.pipeline_cpu_s
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        **{k: v for k, v in asdict(spec).items() if k not in ("timeout", "latency")},
        "latency_s": spec.latency,
        "workers": spec.workers,
        "concurrency_per_worker": spec.per_worker,
        "concurrency": spec.total_concurrency,
        "wall_s": _round(wall),
        "elapsed_s": _round(line.done - line.launched if line.done else None),
        "ideal_s": _round(spec.ideal_s),
        "efficiency": _round(spec.ideal_s / wall) if wall and spec.latency > 0 else None,
        "renders_per_s": _round(spec.n / wall) if wall else None,
        "cpu_s": _round(cpu),
        "cpu_ms_per_render": _round(1000 * cpu / spec.n) if cpu is not None else None,
        "peak_rss_mb": _round(max(m.peak_rss) / 2**20) if m.peak_rss else None,
        "peak_rss_mb_each": [_round(r / 2**20) for r in m.peak_rss],
        "errors": m.summary.get("items_failed"),
        "status": m.summary.get("status"),
        "items_succeeded": m.summary.get("items_succeeded"),
        "images": m.summary.get("images"),
        "spent_cents": m.summary.get("spent_cents"),
        "upstream_calls": m.upstream.get("calls"),
        "upstream_max_in_flight": m.upstream.get("max_in_flight"),
        "upstream_outcomes": m.upstream.get("by_outcome"),
        "other_cpu_s": m.other_cpu_s,
        **m.extra,
        "knobs": knobs(env),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "machine": results.machine(),
        "git": results.git_revision(PIPELINE),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4 if value < 1 else 2)


def describe(r: dict[str, Any]) -> str:
    eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.3f}"
    return (f"{r['preset']:<10} {r['mode']:<13} {r['workers']}x{r['concurrency_per_worker']:<4} "
            f"N={r['n']:<6} latency={r['latency_s']:<4g} wall={r['wall_s']}s "
            f"ideal={r['ideal_s']}s eff={eff} {r['renders_per_s']} renders/s "
            f"cpu={r['cpu_ms_per_render']} ms/render rss={r['peak_rss_mb']} MB "
            f"errors={r['errors']} status={r['status']} "
            f"upstream_max_in_flight={r['upstream_max_in_flight']} "
            f"upstream_cpu={r['other_cpu_s'].get('upstream')}s")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=[*MODES, "all"],
                        help="default: the preset's modes, or all without a preset")
    parser.add_argument("--preset", choices=[*PRESETS, "big", "all"],
                        help="big: a 1,000,000-line job against a 2,000-line one (bench/big.py;"
                             " not part of all)")
    parser.add_argument("-n", type=int, help="renders per run (linear: the largest size)")
    parser.add_argument("--concurrency", type=int,
                        help="total upstream calls in flight (IMAGEBATCH_CONCURRENCY, "
                             "split between the workers)")
    parser.add_argument("--latency", type=float, help="fake upstream seconds per render")
    parser.add_argument("--media-bytes", type=int, help="size of each media file")
    parser.add_argument("--fail-rate", type=float, help="share of calls answered 500")
    parser.add_argument("--keepalive", type=float, default=0.2,
                        help="seconds between SSE keepalive comments (default 0.2)")
    parser.add_argument("--timeout", type=float, help="seconds a run may take at most")
    parser.add_argument("--profile", action="store_true",
                        help="record the pipeline processes with py-spy into bench/results/")
    parser.add_argument("--fresh", action="store_true",
                        help="start bench/results/latest.json and latest.md anew")
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and data folders")
    parser.add_argument("--no-run", action="store_true",
                        help="big: skip `imagebatch run` of the big job (embedded)")
    parser.add_argument("--pipeline", type=Path, metavar="DIR",
                        help="measure the pipeline of this checkout (default: this one; "
                             "bench/ab.py uses it)")
    parser.add_argument("--results", type=Path, metavar="FILE",
                        help="append the records to this JSON file only, not to "
                             "bench/results (bench/ab.py uses it)")
    return parser.parse_args(argv)


def keep_logs(rundir: Path) -> Path:
    """Copy a failed run's logs out of the temporary folder (which is removed at the end)."""
    kept = Path(tempfile.mkdtemp(prefix=f"imagebatch-bench-failed-{rundir.name}-"))
    for file in rundir.iterdir():
        if file.suffix in (".log", ".out"):
            shutil.copy2(file, kept / file.name)
    return kept


def tear_down(procs: Processes, cluster: Cluster | None, workdir: Path, *, keep: bool) -> None:
    """Every process started stopped, the servers too, and the temporary folder removed
    (or kept, and said where)."""
    procs.stop_all()
    if cluster is not None:
        cluster.stop()
    if keep:
        print(f"logs and data kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    global PIPELINE
    args = parse_args(argv)
    if args.preset == "big":
        import big

        return big.main(args)
    specs = build_specs(args)
    if args.pipeline is not None:
        PIPELINE = args.pipeline.resolve()
        if not (PIPELINE / "cli.py").is_file():
            print(f"--pipeline {args.pipeline}: no cli.py there", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    records = args.results or results.LATEST_JSON
    if args.fresh:
        results.clear(records)
    workdir = Path(tempfile.mkdtemp(prefix="imagebatch-bench-"))
    procs, env = Processes(), base_env()
    cluster: Cluster | None = None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    failures = 0
    try:
        for k, spec in enumerate(specs, 1):
            rundir = workdir / f"run-{k}-{spec.mode}"
            rundir.mkdir()
            print(f"[{k}/{len(specs)}] {spec.preset} {spec.mode} N={spec.n} "
                  f"C={spec.total_concurrency} latency={spec.latency:g}", flush=True)
            if spec.mode != "embedded" and cluster is None:
                cluster = Cluster(workdir, procs, env)
            try:
                m = (run_embedded(spec, procs, rundir, env, stamp) if spec.mode == "embedded"
                     else run_distributed(spec, procs, rundir, env, stamp, cluster))  # type: ignore[arg-type]
            except BenchError as exc:
                failures += 1
                procs.stop_all()
                print(f"run failed: {exc}\nits logs: {keep_logs(rundir)}", file=sys.stderr)
                continue
            r = record(spec, m, env)
            results.append(r, records)
            print(describe(r), flush=True)
            if not args.keep_temp:
                clear_run_data(rundir)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        tear_down(procs, cluster, workdir, keep=args.keep_temp)
    written = [records, results.LATEST_MD] if records == results.LATEST_JSON else [records]
    print(f"\nresults: {', '.join(str(f) for f in written)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
