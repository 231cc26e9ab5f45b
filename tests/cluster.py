"""Real processes for fault tests: `imagebatch worker` subprocesses sharing Redis, PostgreSQL and
S3, a TCP proxy that can make S3 refuse connections, and a checker of the books.

A `Cluster` starts workers with one environment (strip the caller's IMAGEBATCH_* and AWS_*
variables, then point at the test's database, Redis database, bucket and fake upstream),
captures each worker's stdout and stderr in a log file, and stops every worker (SIGTERM, then
SIGKILL) in `stop()`, which the fixtures call even when the test failed.

`check_books` is the one verdict after a fault: the job's counters equal the ledger's sums,
every attempt has one reservation and at most one settlement of the right kind, `spent +
reserved <= cap`, every image row has its object in S3 with the recorded sha256 and size, and
no object under the job's prefix lacks its row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.jobs import job_summary
from pipeline.ledger import SETTLE_KIND, job_ledger_totals
from pipeline.models import Attempt, AttemptOutcome, Image, LedgerEntry, LedgerKind, Render
from tests import ROOT

# Short sweeps and backoffs, so lost renders come back within seconds. Leases are 10 s: on a
# busy machine (hundreds of renders queueing on the job's budget row, other processes on the
# two cores) a live worker's renewal can come seconds late, and a lease lost by a live worker
# throws its paid result away. The test that kills a worker shortens it on a light load.
FAST_ENV = {
    "IMAGEBATCH_LEASE_SECONDS": "10",
    "IMAGEBATCH_SWEEP_INTERVAL": "1",
    "IMAGEBATCH_REQUEUE_AFTER": "5",
    "IMAGEBATCH_RENDER_DEADLINE": "20",
    "IMAGEBATCH_READ_TIMEOUT": "10",
    "IMAGEBATCH_CONNECT_TIMEOUT": "3",
    "IMAGEBATCH_BACKOFF_BASE": "0.05",
    "IMAGEBATCH_BACKOFF_CAP": "0.5",
    "IMAGEBATCH_CONCURRENCY": "16",
}


def clean_environ() -> dict[str, str]:
    """This process's environment without any IMAGEBATCH_* or AWS_* variable."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("IMAGEBATCH_", "AWS_"))}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# --- worker processes ------------------------------------------------------------------------


class Worker:
    """One `python -m cli worker` process; its stdout and stderr go to `log`."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", *args], env=dict(env), cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-render, acking nothing."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it has not ended in `timeout`."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Cluster:
    """Workers and CLI commands sharing one database, broker, bucket and upstream."""

    workdir: Path
    database_url: str
    broker_url: str
    api_base: str
    s3_endpoint: str  # what the workers use (the moto server, or a proxy in front of it)
    bucket: str
    prefix: str = "media"
    env_overrides: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)

    def env(self, **overrides: str) -> dict[str, str]:
        env = clean_environ()
        env.update(FAST_ENV)
        env.update(
            IMAGEBATCH_DATA_DIR=str(self.workdir / "data"),
            IMAGEBATCH_API_BASE=self.api_base,
            IMAGEBATCH_DATABASE_URL=self.database_url,
            IMAGEBATCH_BROKER_URL=self.broker_url,
            IMAGEBATCH_STORAGE_URL=f"s3://{self.bucket}/{self.prefix}",
            AWS_ENDPOINT_URL_S3=self.s3_endpoint,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_DEFAULT_REGION="us-east-1",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.env_overrides)
        env.update(overrides)
        return env

    def start_worker(self, *args: str, verbose: int = 1, **env: str) -> Worker:
        """`imagebatch -v worker ARGS`: -v logs Celery's `ready.` line (wait_ready needs it)
        and imagebatch's INFO lines; -vv also logs every task's result and HTTP request."""
        name = f"worker{len(self.workers) + 1}"
        options = ["-" + "v" * verbose] if verbose else []
        worker = Worker(name, [*options, "worker", *args], self.env(**env),
                        self.workdir / f"{name}.log")
        self.workers.append(worker)
        return worker

    def start_workers(self, count: int, *args: str, verbose: int = 1, **env: str
                      ) -> list[Worker]:
        started = [self.start_worker(*args, verbose=verbose, **env) for _ in range(count)]
        for worker in started:
            self.wait_ready(worker)
        return started

    def wait_ready(self, worker: Worker, timeout: float = 30.0) -> None:
        """Until Celery says it is ready (it consumes from the broker from then on; needs the
        worker started with -v or more)."""
        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"{worker.name} exited:\n{worker.output()[-4000:]}")
            return "ready." in worker.output()

        wait_until(ready, timeout, f"{worker.name} to be ready")

    def cli(self, *args: str, timeout: float = 120.0, **env: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], env=self.env(**env), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def cli_popen(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "cli", *args], env=self.env(**env),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def submit(self, lines: Iterable[Mapping[str, Any]], budget_cents: int,
               team: str = "t") -> int:
        """`imagebatch submit FILE --budget-cents N --json`; returns the job id."""
        path = self.workdir / f"job-{time.monotonic_ns()}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        result = self.cli("submit", str(path), "--budget-cents", str(budget_cents),
                          "--team", team, "--json")
        assert result.returncode == 0, result.stderr
        return int(json.loads(result.stdout)["id"])

    def stop(self) -> None:
        """Every worker down: SIGTERM to all first (they stop in parallel), then SIGKILL."""
        for worker in self.workers:
            if worker.alive():
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if worker.alive():
                worker.kill()

    def logs(self, tail: int = 20000) -> str:
        """Every worker's output, without the one-line-per-request noise (DEBUG lines, HTTP
        requests, tasks received), each cut to its last `tail` characters."""
        noise = re.compile(
            r"^\S+ \S+ (DEBUG \S+|INFO (httpx|celery\.worker\.strategy)): .*\n?", re.M)
        return "\n".join(f"===== {w.name} (pid {w.pid}, exit {w.proc.returncode}) =====\n"
                         f"{noise.sub('', w.output())[-tail:]}" for w in self.workers)


# --- reading the database ----------------------------------------------------------------------


def job_row(engine: sa.Engine, job_id: int) -> dict[str, Any]:
    with Session(engine) as session:
        return job_summary(session, job_id)


def wait_for_job(engine: sa.Engine, job_id: int, timeout: float,
                 during: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll until the job has finished; on every poll check `spent + reserved <= cap` (the
    invariant holds at every instant, not only at the end) and call `during(summary)`."""
    deadline = time.monotonic() + timeout
    while True:
        summary = job_row(engine, job_id)
        assert summary["spent_cents"] + summary["reserved_cents"] <= summary["budget_cents"], (
            summary)
        if summary["finished_at"] is not None:
            return summary
        if during is not None:
            during(summary)
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not finish in {timeout:g}s: {summary}; "
                                 f"renders {dict(render_counts(engine, job_id))}; "
                                 f"busy connections {busy_backends(engine)}")
        time.sleep(0.2)


def busy_backends(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """PostgreSQL: the database's connections that are not idle (a stuck job's lock waits)."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(
            "SELECT pid, pg_blocking_pids(pid), state, wait_event_type, wait_event, "
            "now() - xact_start, left(query, 120) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state <> 'idle'")).all()]


def render_counts(engine: sa.Engine, job_id: int) -> Counter[str]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT status, count(*) FROM renders WHERE job_id = :j GROUP BY status"),
            {"j": job_id}).all()
    return Counter({status: count for status, count in rows})


def open_attempts(engine: sa.Engine, job_id: int) -> set[int]:
    """Ids of the attempts still holding a reservation (their call may be under way)."""
    with engine.connect() as connection:
        return set(connection.execute(sa.text(
            "SELECT a.id FROM attempts a JOIN renders r ON r.id = a.render_id "
            "WHERE r.job_id = :j AND a.outcome = 'reserved'"), {"j": job_id}).scalars())


# --- the books -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptRow:
    id: int
    render_id: int
    number: int
    outcome: str
    amount_cents: int
    error: str | None


@dataclass(frozen=True)
class Books:
    job: dict[str, Any]
    attempts: tuple[AttemptRow, ...]
    images: int
    objects: int

    @property
    def spent(self) -> int:
        return int(self.job["spent_cents"])

    @property
    def unknown(self) -> int:
        return int(self.job["unknown_cents"])

    @property
    def charged(self) -> int:
        """Spent on delivered results (spent minus unknown)."""
        return self.spent - self.unknown

    def outcomes(self) -> Counter[str]:
        return Counter(a.outcome for a in self.attempts)

    def with_outcome(self, outcome: str) -> list[AttemptRow]:
        return [a for a in self.attempts if a.outcome == outcome]


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def check_books(engine: sa.Engine, s3: Any, bucket: str, prefix: str, job_id: int, *,
                finished: bool = True) -> Books:
    """Assert every money and storage invariant of one job; return what was found."""
    with Session(engine) as session:
        summary = job_summary(session, job_id)
        totals = job_ledger_totals(session, job_id)
        assert (summary["spent_cents"], summary["reserved_cents"], summary["unknown_cents"]) == (
            totals.spent_cents, totals.reserved_cents, totals.unknown_cents), (summary, totals)
        assert summary["spent_cents"] + summary["reserved_cents"] <= summary["budget_cents"], (
            summary)
        attempts = tuple(
            AttemptRow(a.id, a.render_id, a.number, a.outcome, a.amount_cents, a.error)
            for a in session.scalars(
                select(Attempt).join(Render, Render.id == Attempt.render_id)
                .where(Render.job_id == job_id).order_by(Attempt.id))
        )
        _check_ledger_rows(session, job_id, attempts)
        if finished:
            assert summary["finished_at"] is not None, summary
            assert summary["reserved_cents"] == 0, summary
            open_ones = [a for a in attempts if a.outcome == AttemptOutcome.RESERVED]
            assert not open_ones, f"attempts never settled: {open_ones}"
        images = list(session.execute(
            select(Image.key, Image.sha256, Image.bytes).where(Image.job_id == job_id)).all())
    assert summary["images"] == len(images)
    full = (lambda key: f"{prefix}/{key}") if prefix else (lambda key: key)
    for key, sha256, size in images:
        data = s3.get_object(Bucket=bucket, Key=full(key))["Body"].read()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha256, size), key
    job_prefix = full(f"job-{job_id:06d}/")
    stored: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=job_prefix):
        stored.update(obj["Key"] for obj in page.get("Contents", ()))
    recorded = {full(key) for key, _, _ in images}
    assert stored == recorded, (
        f"objects without a row: {sorted(stored - recorded)[:10]}; "
        f"rows without an object: {sorted(recorded - stored)[:10]}")
    return Books(summary, attempts, len(images), len(stored))


def _check_ledger_rows(session: Session, job_id: int, attempts: tuple[AttemptRow, ...]) -> None:
    """One reserve per attempt and at most one settlement, of the kind its outcome says."""
    rows = session.execute(
        select(LedgerEntry.attempt_id, LedgerEntry.kind, LedgerEntry.amount_cents)
        .where(LedgerEntry.job_id == job_id)).all()
    by_attempt: dict[int, list[tuple[str, int]]] = {}
    for attempt_id, kind, amount in rows:
        by_attempt.setdefault(attempt_id, []).append((kind, amount))
    known = {a.id for a in attempts}
    assert set(by_attempt) <= known, f"ledger rows of unknown attempts: {set(by_attempt) - known}"
    for attempt in attempts:
        kinds = Counter(kind for kind, _ in by_attempt.get(attempt.id, []))
        assert kinds[LedgerKind.RESERVE] == 1, (attempt, kinds)
        settlements = sum(kinds.values()) - kinds[LedgerKind.RESERVE]
        if attempt.outcome == AttemptOutcome.RESERVED:
            assert settlements == 0, (attempt, kinds)
        else:
            assert settlements == 1, f"settled {settlements} times: {attempt}, {kinds}"
            assert kinds[SETTLE_KIND[AttemptOutcome(attempt.outcome)]] == 1, (attempt, kinds)
        assert all(amount == attempt.amount_cents for _, amount in by_attempt[attempt.id])
    count = session.scalar(select(func.count()).where(LedgerEntry.job_id == job_id))
    assert count == len(rows)


# --- a TCP proxy that can refuse ---------------------------------------------------------------


class FlakyProxy:
    """Forwards 127.0.0.1:port to a target; `refuse()` closes the listening socket (new
    connections are refused) and every open connection, until `accept_again()`."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.refused_windows = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._start_accepting()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(256)
        return listener

    def _start_accepting(self) -> None:
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True,
                         name="flaky-proxy").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: refusing, or closed for good
            if self._listener is not listener:  # accepted just as refuse() began
                self._drop(client)
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
                self.forwarded += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # also wakes the pump thread blocked in recv()
        with contextlib.suppress(OSError):
            sock.close()

    def refuse(self) -> None:
        with self._lock:
            self.refused_windows += 1
            listener, self._listener = self._listener, None
            victims = list(self._open)
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave the
            # socket listening until that accept() returned.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in victims:
            self._drop(sock)

    def accept_again(self) -> None:
        with self._lock:
            if self._listener is not None or self._closed:
                return
            self._listener = self._listen(self.port)
        self._start_accepting()

    def close(self) -> None:
        self._closed = True
        self.refuse()
