"""A dead worker's renders run again on the live workers within two leases, at the defaults
derived from IMAGEBATCH_LEASE_SECONDS (real worker processes on Redis, PostgreSQL and S3)."""

from __future__ import annotations

import os
import re
import signal
import time

from fake_upstream.app import FakeServer
from tests.acceptance.test_faults import Stack, job_lines, stack  # noqa: F401 (the fixture)
from tests.cluster import render_counts, wait_for_job, wait_until

LEASE = 6.0
LATENCY = 4.0


def test_a_killed_workers_running_and_received_renders_run_again_within_two_leases(
        stack: Stack, fake: FakeServer) -> None:  # noqa: F811 (the fixture)
    """The victim holds renders calling, renders reserved waiting for a call slot, and
    messages it received but had not started (prefetched). Only the lease is set: the sweep
    interval and the lost-message delay take their defaults from it. A survivor with room
    for everything finishes the job within two leases (plus one render's latency) of the
    kill; at the old 600 s requeue default the received messages would have waited ten
    minutes."""
    cluster = stack.cluster
    derived = {"IMAGEBATCH_LEASE_SECONDS": str(LEASE), "IMAGEBATCH_SWEEP_INTERVAL": "",
               "IMAGEBATCH_REQUEUE_AFTER": ""}
    victim = cluster.start_worker(IMAGEBATCH_CONCURRENCY="4", **derived)
    cluster.wait_ready(victim)
    job_id = cluster.submit(job_lines(24, latency=LATENCY), budget_cents=1000)
    wait_until(lambda: fake.stats()["in_flight"] >= 4, 30, "the victim to be mid-render")
    survivor = cluster.start_worker(IMAGEBATCH_CONCURRENCY="32", **derived)
    cluster.wait_ready(survivor)
    # The victim received more than it runs: 4 calls, 2 renders ahead, prefetched messages.
    wait_until(lambda: render_counts(stack.engine, job_id).get("running", 0) >= 6, 30,
               "the victim to hold its renders")
    victim.kill()
    killed_at = time.monotonic()
    summary = wait_for_job(stack.engine, job_id, 2 * LEASE + LATENCY + 30)
    took = time.monotonic() - killed_at
    books = stack.books(job_id)
    assert (summary["status"], summary["items_succeeded"]) == ("succeeded", 24)
    assert took <= 2 * LEASE + LATENCY + 3, f"the job ended {took:.1f}s after the kill"
    assert books.outcomes()["charged"] == 24


def test_a_frozen_worker_never_overwrites_the_files_of_the_render_done_again(
        stack: Stack, fake: FakeServer) -> None:  # noqa: F811 (the fixture)
    """A worker stopped (SIGSTOP) past its lease while its call runs; the render is done again
    by another worker; then the first one goes on and gets its result. The files and rows
    stay those of the attempt that settled: every object's sha256 is the one in SQL, and the
    stale attempt's objects (stored under keys of its own) are deleted."""
    cluster = stack.cluster
    lease = {"IMAGEBATCH_LEASE_SECONDS": "3", "IMAGEBATCH_SWEEP_INTERVAL": "",
             "IMAGEBATCH_REQUEUE_AFTER": ""}
    frozen = cluster.start_worker(IMAGEBATCH_CONCURRENCY="2", verbose=2, **lease)
    cluster.wait_ready(frozen)
    # No seed: every call makes different bytes, so an overwrite would show.
    job_id = cluster.submit([{"custom_id": "fox", "model": "flux-2-dev", "prompt": "a fox",
                              "n": 2, "fake": {"latency": 2.0}}], budget_cents=100)
    wait_until(lambda: fake.stats()["in_flight"] == 1, 30, "the first call")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        redoer = cluster.start_worker(IMAGEBATCH_CONCURRENCY="2", **lease)
        cluster.wait_ready(redoer)
        summary = wait_for_job(stack.engine, job_id, 60)
        assert fake.stats()["calls"] == 2
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # The frozen worker's call has its answer by now: it stores its files and finds its
    # attempt settled by the sweeper.
    wait_until(lambda: re.search(r"imagebatch\.render\[[^]]*\] succeeded in", frozen.output()),
               30, "the frozen worker to finish its render task")
    books = stack.books(job_id)  # every object has its row and the row's sha256
    assert (summary["status"], summary["images"]) == ("succeeded", 2)
    assert books.outcomes() == {"unknown": 1, "charged": 1}
    assert books.spent == fake.stats()["billed_cents"] == 12
    assert books.objects == 2

