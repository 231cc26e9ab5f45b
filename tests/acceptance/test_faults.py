"""Faults over real processes and real servers: `imagebatch worker` subprocesses sharing
Redis, PostgreSQL and S3 (moto), against the fake upstream over HTTP.

After every fault the books must balance (tests/cluster.py `check_books`), and the money the
ledger spent must equal what the fake upstream billed, except where a killed worker's
attempt makes them legitimately differ (test 1 says exactly what holds then).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from fake_upstream.app import FakeConfig, FakeServer
from tests.cluster import (
    Books,
    Cluster,
    FlakyProxy,
    check_books,
    open_attempts,
    render_counts,
    s3_client,
    wait_for_job,
    wait_until,
)
from tests.conftest import fresh_postgres_database
from tests.servers import start_redis

_redis_dbs = itertools.count(1)
TEST_APP = "imagebatch-fault-tests"


class Stack:
    """One test's share of the servers: a fresh database, a Redis database of its own, a
    bucket, and a Cluster of worker processes on them."""

    def __init__(self, tmp_path: Path, database_url: str, redis_url: str, s3_endpoint: str,
                 api_base: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.s3_endpoint = s3_endpoint
        # NullPool: test 4 terminates connections; every check opens a new one, named so
        # that test spares it.
        self.engine = sa.create_engine(database_url, poolclass=NullPool,
                                       connect_args={"application_name": TEST_APP})
        self.s3 = s3_client(s3_endpoint)
        self.bucket = f"faults-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=self.bucket)
        self.cluster = Cluster(tmp_path, database_url, redis_url, api_base, s3_endpoint,
                               self.bucket)

    def books(self, job_id: int, *, finished: bool = True) -> Books:
        return check_books(self.engine, self.s3, self.bucket, self.cluster.prefix, job_id,
                           finished=finished)


def _redis_db_url(server_url: str) -> str:
    """The session Redis, but a database of this test's own (flushed), so a killed worker's
    unacked messages or a limiter's pause never reach another test."""
    db = next(_redis_dbs) % 16 or 1
    url = server_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def stack(tmp_path: Path, postgres_url: str, redis_url: str, s3_endpoint: str,
          fake: FakeServer) -> Iterator[Stack]:
    database_url, admin = fresh_postgres_database(postgres_url)
    built = Stack(tmp_path, database_url, _redis_db_url(redis_url), s3_endpoint, fake.base_url)
    try:
        yield built
    finally:
        built.cluster.stop()
        # Shown by pytest only when the test failed (captured output of a passing test is
        # dropped).
        print(built.cluster.logs())
        built.engine.dispose()
        name = sa.engine.make_url(database_url).database
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def job_lines(count: int, *, model: str = "flux-2-dev", latency: float | None = None,
              tag: str = "p") -> list[dict[str, Any]]:
    """`count` one-image lines; `latency` is the fake's per-request knob (seconds)."""
    knobs = {"fake": {"latency": latency}} if latency is not None else {}
    return [{"custom_id": f"{tag}{i}", "model": model, "prompt": f"{tag} number {i}", **knobs}
            for i in range(count)]


def task_results(cluster: Cluster) -> Counter[str]:
    """What the workers' render tasks returned ('finished', 'busy', 'terminal', ...), from
    Celery's `Task ... succeeded in ...s: 'busy'` log lines (workers started with -vv)."""
    found: Counter[str] = Counter()
    for worker in cluster.workers:
        found.update(re.findall(r"Task imagebatch\.render\[[^]]+\] succeeded in \S+ '(\w+)'",
                                worker.output()))
    return found


def ledger_kinds_per_attempt(engine: sa.Engine, job_id: int, kind: str) -> dict[int, int]:
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT attempt_id, count(*) FROM ledger WHERE job_id = :j AND kind = :k "
            "GROUP BY attempt_id"), {"j": job_id, "k": kind}).all()
    return dict(rows)


# --- 1. a worker SIGKILLed mid-render --------------------------------------------------------


def test_a_worker_killed_mid_render_is_charged_unknown_once_and_the_job_completes(
        stack: Stack, fake: FakeServer) -> None:
    """Two workers of 8 calls in flight each (and 4 renders ahead: 12 renders), 40 renders of
    2 s. SIGKILL one while both have calls in flight: its renders' leases run out, the
    sweeper (on the survivor) settles each open attempt once, `unknown` if its send was
    recorded, `released` if not (a render ahead that held its reservation waiting for a call
    slot), and queues the render again; the messages it had prefetched come back through the
    lost-message requeue. The survivor finishes the job.

    Billed and spent differ legitimately here: the fake bills a call only when it produces a
    result, and a killed client usually leaves before that ('client_gone', not billed), while
    the pipeline must charge the killed attempt as unknown (the provider may have billed it).
    What holds: charged (spent - unknown) <= billed <= spent, i.e. billed <= spent and
    spent - billed <= the price of the killed attempts (= unknown_cents).
    """
    cluster = stack.cluster
    victim, survivor = cluster.start_workers(2, IMAGEBATCH_CONCURRENCY="8",
                                             IMAGEBATCH_LEASE_SECONDS="4")
    job_id = cluster.submit(job_lines(40, latency=2.0), budget_cents=1000)
    # At most 8 in flight per worker: 12 in flight means both workers hold calls.
    wait_until(lambda: fake.stats()["in_flight"] >= 12, 30, "both workers to be mid-render")
    victim.kill()
    in_flight_at_kill = open_attempts(stack.engine, job_id)

    summary = wait_for_job(stack.engine, job_id, 90)
    books = stack.books(job_id)
    billed = fake.stats()["billed_cents"]

    assert survivor.alive()
    assert (summary["status"], summary["items_succeeded"], summary["images"]) == (
        "succeeded", 40, 40)
    unknown = books.with_outcome("unknown")
    unsent = books.with_outcome("released")
    # Only calls the victim sent are charged unknown (at most its 8 call slots); a render
    # ahead killed while it held its reservation, waiting for a slot, sent nothing (no send
    # recorded) and is released.
    assert 1 <= len(unknown) <= 8, books.outcomes()
    assert len(unsent) <= 4, books.outcomes()
    assert {a.id for a in unknown + unsent} <= in_flight_at_kill
    assert all("worker was lost during the call" in (a.error or "") for a in unknown)
    assert all("worker was lost before the call was sent" in (a.error or "") for a in unsent)
    # Exactly one 'unknown' ledger row per killed attempt, and no other settlement of it.
    assert ledger_kinds_per_attempt(stack.engine, job_id, "unknown") == {
        a.id: 1 for a in unknown}
    assert set(ledger_kinds_per_attempt(stack.engine, job_id, "charge")).isdisjoint(
        a.id for a in unknown)
    assert books.unknown == sum(a.amount_cents for a in unknown) == 3 * len(unknown)
    assert books.outcomes() == {"charged": 40, "unknown": len(unknown), "released": len(unsent)}
    assert books.charged <= billed <= books.spent
    assert books.spent - billed <= books.unknown
    # Every attempt charged unknown is a call the fake received: the victim's calls it saw
    # the client leave (not billed), and any it billed just before the kill.
    left = fake.stats()["by_outcome"].get("client_gone", 0)
    assert len(unknown) == left + (billed - books.charged) // 3, (left, billed, books.charged)


# --- 2. a render task delivered twice while its first copy runs -------------------------------


def restore_unacked(broker_url: str, visibility_timeout: float) -> int:
    """Redis redelivery, now: push every message unacked for longer than the visibility
    timeout back on its queue, with kombu's own `restore_visible`, which a worker runs when it
    connects and then every unacked_restore_interval x throttle (10 x 10 s) seconds. Returns
    how many messages it put back."""
    from kombu import Connection

    with Connection(broker_url,
                    transport_options={"visibility_timeout": visibility_timeout}) as connection:
        channel = connection.default_channel
        client = channel.client
        due = client.zcount(channel.unacked_index_key, 0, time.time() - visibility_timeout)
        channel.qos.restore_visible(num=10_000)
        return int(due) - int(client.zcount(channel.unacked_index_key, 0,
                                            time.time() - visibility_timeout))


def test_a_task_redelivered_while_it_runs_makes_no_second_call(stack: Stack,
                                                               fake: FakeServer) -> None:
    """Two workers on a Redis broker with visibility_timeout 2 s, 12 renders of 6 s. Once
    every render has been running (its message unacked) for longer than that, Redis puts the
    messages back (kombu's restore, run from the test so the timing does not hang on a
    worker's 100 s restore cycle): each running render's task is delivered again while its
    first copy still calls the upstream. The copies find a live lease and return 'busy': one
    POST per attempt, nothing paid twice."""
    cluster = stack.cluster
    # -vv: Celery logs what each task returned ('finished', 'busy', 'terminal').
    cluster.start_workers(2, verbose=2, IMAGEBATCH_VISIBILITY_TIMEOUT="2")
    job_id = cluster.submit(job_lines(12, latency=6.0), budget_cents=1000)
    wait_until(lambda: fake.stats()["in_flight"] == 12, 30, "all 12 renders in flight")
    time.sleep(2.5)  # every unacked message is now older than the visibility timeout
    restored = restore_unacked(stack.redis_url, 2)
    summary = wait_for_job(stack.engine, job_id, 60)
    # Every copy and every first copy has returned (a copy that came late says 'terminal').
    wait_until(lambda: sum(task_results(cluster).values()) >= 12 + restored, 30,
               "every task to return")
    books = stack.books(job_id)
    stats = fake.stats()

    assert restored == 12
    assert (summary["status"], summary["images"]) == ("succeeded", 12)
    results = task_results(cluster)
    assert results["finished"] == 12, results
    assert results["busy"] >= 1, results  # copies arrived while their first copy ran
    assert results["busy"] + results["terminal"] == restored, results  # and did nothing
    assert stats["calls"] == len(fake.requests()) == len(books.attempts) == 12
    assert books.outcomes() == {"charged": 12}
    assert books.spent == stats["billed_cents"] == 36


# --- 3. Redis restarted mid-job ------------------------------------------------------------


def _redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def test_redis_restarted_mid_job(stack: Stack, fake: FakeServer) -> None:
    """A Redis of its own, SIGKILLed mid-job (queued messages, unacked ones and the limiter's
    keys are gone) and started again on the same port. Workers reconnect; renders whose
    message was lost come back through the sweeper's requeue of stale queued renders."""
    url, stop = start_redis()
    port = int(sa.engine.make_url(url).port or 0)
    stops = [stop]
    try:
        cluster = stack.cluster
        cluster.broker_url = url
        cluster.start_workers(2, IMAGEBATCH_CONCURRENCY="6")
        # More than the workers prefetch (2 x 9 render slots each), so some wait in Redis.
        job_id = cluster.submit(job_lines(96, latency=1.0), budget_cents=1000)
        wait_until(lambda: render_counts(stack.engine, job_id)["succeeded"] >= 6, 30,
                   "a few renders to finish")
        broker = redis.Redis.from_url(url)
        queued_in_redis = broker.llen("imagebatch")
        broker.close()
        os.kill(_redis_pid(url), signal.SIGKILL)
        stop()  # reaps the process, removes its folder
        time.sleep(2.0)
        restarted, stop_again = start_redis(port)
        stops.append(stop_again)
        assert restarted == url

        summary = wait_for_job(stack.engine, job_id, 90)
        books = stack.books(job_id)
        assert queued_in_redis > 0  # messages the killed Redis took with it
        assert (summary["status"], summary["images"]) == ("succeeded", 96)
        assert books.spent == fake.stats()["billed_cents"]
        assert books.spent >= 3 * 96
    finally:
        stack.cluster.stop()
        for stop_one in stops:
            stop_one()


# --- 4. PostgreSQL connections dropped mid-job --------------------------------------------------


class BackendKiller(threading.Thread):
    """Terminates the job database's connections while a job runs: every 0.6 s all of them
    (idle pooled ones included), and in between, every 20 ms, any caught mid-statement or
    mid-transaction, until it has killed `busy_target` of those and run `rounds` full rounds.
    The test's own connections (application_name TEST_APP) are spared."""

    def __init__(self, database_url: str, *, busy_target: int = 4, rounds: int = 5) -> None:
        super().__init__(daemon=True)
        url = sa.engine.make_url(database_url)
        self.database = url.database
        self.admin = sa.create_engine(url.set(database="postgres"),
                                      isolation_level="AUTOCOMMIT", poolclass=NullPool)
        self.busy_target, self.rounds = busy_target, rounds
        self.killed: list[str] = []  # each terminated backend's state at that moment
        self.full_rounds = 0
        self.stopping = threading.Event()

    @property
    def busy_kills(self) -> int:
        return sum(state != "idle" for state in self.killed)

    def run(self) -> None:
        last_round = 0.0
        with self.admin.connect() as connection:
            while not self.stopping.is_set() and (
                    self.busy_kills < self.busy_target or self.full_rounds < self.rounds):
                everyone = time.monotonic() - last_round >= 0.6
                if everyone:
                    last_round = time.monotonic()
                    self.full_rounds += 1
                # pg_terminate_backend in the select list runs only for the rows WHERE kept.
                self.killed.extend(state for state, _ in connection.execute(sa.text(
                    "SELECT state, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid() AND application_name "
                    "<> :app AND (:everyone OR state NOT IN ('idle'))"),
                    {"db": self.database, "app": TEST_APP, "everyone": everyone}).all())
                self.stopping.wait(0.02)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.admin.dispose()


def test_postgres_connections_dropped_mid_job(stack: Stack, fake: FakeServer) -> None:
    """The job database's connections terminated (pg_terminate_backend) over and over while
    the job runs, idle pooled ones and ones caught mid-transaction: each render transaction
    retries on a new connection, lease renewals and sweeps try again on their next beat, and
    the books balance with the ledger equal to the bill."""
    cluster = stack.cluster
    cluster.start_workers(2, IMAGEBATCH_CONCURRENCY="8")
    job_id = cluster.submit(job_lines(60, latency=0.8), budget_cents=1000)
    killer = BackendKiller(stack.database_url)
    wait_until(lambda: fake.stats()["in_flight"] >= 4, 30, "renders in flight")
    killer.start()
    try:
        summary = wait_for_job(stack.engine, job_id, 90)
    finally:
        killer.stop()
    books = stack.books(job_id)

    assert killer.busy_kills >= 1 and killer.full_rounds >= 2, (killer.killed,
                                                                killer.full_rounds)
    logs = cluster.logs(tail=10**7)
    assert any(text in logs for text in (
        "database unavailable", "renewing render leases failed", "dispatch/sweep failed")), logs
    assert (summary["status"], summary["images"]) == ("succeeded", 60)
    assert books.spent == fake.stats()["billed_cents"] == 180
    assert books.outcomes() == {"charged": 60}
    assert all(worker.alive() for worker in cluster.workers)


# --- 5. the upstream cuts streams, answers 429 and 5xx ----------------------------------------


def test_cut_streams_429_storms_and_5xx(stack: Stack) -> None:
    """A fake that cuts 12% of streams (billed), answers 429 to 12% (Retry-After: 1) and 500
    to 12% (neither billed). Cut streams are charged as unknown, refusals released, and the
    ledger's spend equals the fake's bill to the cent."""
    config = FakeConfig(latency=0.3, keepalive_interval=0.05, fail_rate=0.12, cut_rate=0.12,
                        rate_limit_rate=0.12, seed=5)
    with FakeServer(config) as flaky:
        cluster = stack.cluster
        cluster.api_base = flaky.base_url
        cluster.start_workers(2, IMAGEBATCH_MAX_ATTEMPTS="12")
        job_id = cluster.submit(job_lines(40), budget_cents=2000)
        summary = wait_for_job(stack.engine, job_id, 90)
        books = stack.books(job_id)
        stats = flaky.stats()
    outcomes = stats["by_outcome"]
    assert outcomes.get("cut", 0) >= 1 and outcomes.get("rate_limited", 0) >= 1
    assert outcomes.get("server_error", 0) >= 1
    assert (summary["status"], summary["images"]) == ("succeeded", 40)
    assert books.spent == stats["billed_cents"]
    assert books.unknown == 3 * outcomes["cut"]
    assert books.outcomes() == {
        "charged": 40, "unknown": outcomes["cut"],
        "released": outcomes["rate_limited"] + outcomes["server_error"]}
    assert stats["calls"] == len(books.attempts)


# --- 6. S3 refusing connections for a while --------------------------------------------------


def test_s3_refusing_puts_for_a_while(stack: Stack, fake: FakeServer) -> None:
    """The workers reach S3 through a proxy that refuses every connection (and closes the
    open ones) for 3 s while results arrive: paid-for results are not lost, the PUTs are
    retried until S3 accepts again, well within the render deadline."""
    moto = urlsplit(stack.s3_endpoint)
    proxy = FlakyProxy(moto.hostname or "127.0.0.1", moto.port or 80)
    try:
        cluster = stack.cluster
        cluster.s3_endpoint = proxy.url
        cluster.start_workers(2)
        job_id = cluster.submit(job_lines(30, latency=1.0), budget_cents=1000)
        wait_until(lambda: fake.stats()["in_flight"] >= 1, 30, "renders in flight")
        proxy.refuse()
        time.sleep(3.0)
        proxy.accept_again()
        summary = wait_for_job(stack.engine, job_id, 90)
        books = stack.books(job_id)
    finally:
        proxy.close()
    logs = cluster.logs(tail=10**7)
    assert "failed (try" in logs  # _put_with_retries did wait S3 out
    assert (summary["status"], summary["images"]) == ("succeeded", 30)
    assert books.spent == fake.stats()["billed_cents"] == 90
    # Every call paid once. A slow machine may see the job paused while S3 refuses (nothing
    # new is bought meanwhile): the renders then waiting had their reservations released
    # unsent, which is no call.
    assert fake.stats()["calls"] == 30 == books.outcomes()["charged"]
    unsent = [a for a in books.attempts if a.outcome != "charged"]
    assert all(a.outcome == "released" and "before the call was sent" in (a.error or "")
               for a in unsent), unsent


# --- 7. the budget race across processes -------------------------------------------------------


def test_three_workers_race_for_the_last_cents(stack: Stack, fake: FakeServer) -> None:
    """3 worker processes of 32 renders each, 500 one-cent renders, a 120-cent cap: the
    conditional reservation lets exactly 120 through, whatever the interleaving."""
    cluster = stack.cluster
    cluster.start_workers(3, IMAGEBATCH_CONCURRENCY="32")
    job_id = cluster.submit(job_lines(500, model="flux-2-klein-4b", latency=0.2),
                            budget_cents=120)
    summary = wait_for_job(stack.engine, job_id, 120)
    books = stack.books(job_id)
    billed = fake.stats()["billed_cents"]
    assert billed == books.spent == 120
    assert (summary["status"], summary["items_succeeded"], summary["items_failed"]) == (
        "partial", 120, 380)
    assert summary["images"] == 120
    with stack.engine.connect() as connection:
        reasons = connection.execute(sa.text(
            "SELECT status, split_part(error, ':', 1), count(*) FROM renders WHERE job_id = :j "
            "GROUP BY 1, 2"), {"j": job_id}).all()
    assert sorted(reasons, key=str) == sorted(
        [("succeeded", None, 120), ("failed", "budget", 380)], key=str)
    assert books.outcomes() == {"charged": 120}


# --- 8. dispatchers racing for the same pending jobs ------------------------------------------


def test_concurrent_dispatchers_plan_each_job_once(stack: Stack, fake: FakeServer) -> None:
    """30 jobs inserted with plain SQL, then three `imagebatch dispatch` processes at once:
    every item has exactly one set of renders, every render was enqueued exactly once."""
    n_values = [1, 4, 5, 9]  # flux-2-dev: max_n 4 -> 1, 1, 2 and 3 renders
    with stack.engine.begin() as connection:
        for j in range(30):
            job_id = connection.execute(sa.text(
                "INSERT INTO jobs (team, name, budget_cents, status) "
                "VALUES ('t', :name, 10000, 'pending') RETURNING id"),
                {"name": f"sql-{j}"}).scalar_one()
            for line, n in enumerate(n_values, start=1):
                body = json.dumps({"model": "flux-2-dev", "prompt": f"job {j} line {line}",
                                   "n": n, "seed": 1000 * j + line})
                connection.execute(sa.text(
                    "INSERT INTO job_items (job_id, line, custom_id, body) "
                    "VALUES (:j, :l, :c, :b)"), {"j": job_id, "l": line, "c": f"c{line}",
                                                 "b": body})
    cluster = stack.cluster
    # Nothing is old enough to be requeued by the sweep each dispatch also runs.
    procs = [cluster.cli_popen("dispatch", IMAGEBATCH_REQUEUE_AFTER="600") for _ in range(3)]
    outputs = [proc.communicate(timeout=120) for proc in procs]

    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    enqueued = [int(re.search(r"enqueued (\d+) render", out)[1])  # type: ignore[index]
                for out, _ in outputs]
    per_job = sum((n + 3) // 4 for n in n_values)
    assert sum(enqueued) == 30 * per_job, enqueued
    with stack.engine.connect() as connection:
        statuses = connection.execute(sa.text(
            "SELECT status, count(*) FROM jobs GROUP BY status")).all()
        renders = connection.execute(sa.text(
            "SELECT i.id, i.body, count(r.id), array_agg(r.render_index ORDER BY "
            "r.render_index) FROM job_items i LEFT JOIN renders r ON r.item_id = i.id "
            "GROUP BY i.id, i.body")).all()
    assert statuses == [("running", 30)]
    assert len(renders) == 30 * len(n_values)
    for _, body, count, indexes in renders:
        expected = (json.loads(body)["n"] + 3) // 4
        assert (count, indexes) == (expected, list(range(expected)))
    broker = redis.Redis.from_url(stack.redis_url)
    try:
        assert broker.llen("imagebatch") == 30 * per_job  # one message per render, no more
    finally:
        broker.close()
    assert fake.stats()["calls"] == 0


def test_concurrent_models_cache_refreshes_never_fail(stack: Stack, fake: FakeServer) -> None:
    """Dispatchers (and every worker's ticker) refresh the cached /models answer when it is
    stale, often in the same moment: on PostgreSQL the second DELETE + INSERT used to fail
    on the primary key. Three refreshes at once, twenty times over, never fail."""
    from pipeline.caps import load_caps
    from pipeline.db import session_factory

    sessions = session_factory(stack.engine)
    entries = [{"id": f"m{i}", "output_modalities": ["image"],
                "image_caps": {"max_n": 2, "price_per_image_cents": 1}} for i in range(8)]
    failures: list[BaseException] = []
    for _ in range(20):
        barrier = threading.Barrier(3)

        def refresh(barrier: threading.Barrier) -> None:
            barrier.wait()
            try:
                caps = load_caps(sessions, fake.base_url, lambda: entries, ttl_seconds=60,
                                 refresh=True)
                assert set(caps) == {f"m{i}" for i in range(8)}
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=refresh, args=(barrier,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    with stack.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM model_caps")).scalar_one() == 8
