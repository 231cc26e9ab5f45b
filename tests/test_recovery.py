"""A dead worker's renders run again on the live workers within two leases, at the defaults
derived from IMAGEBATCH_LEASE_SECONDS (real worker processes on Redis, PostgreSQL and S3)."""

from __future__ import annotations

import time

from fake_upstream.app import FakeServer
from tests.cluster import render_counts, wait_for_job, wait_until
from tests.test_faults import Stack, job_lines, stack  # noqa: F401 (the fixture)

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
