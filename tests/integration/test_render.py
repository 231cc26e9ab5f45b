"""The render flow over real HTTP (fake upstream), real SQLite and real files: every outcome
of the money table (ARCHITECTURE.md, Money: charged, released, unknown), checked against what
the fake upstream billed, to the cent."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace

from sqlalchemy import select

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import cancel_in_chunks, retry_job
from pipeline.models import Attempt, Image, JobItem, LedgerEntry, Render, RenderStatus
from pipeline.render import end_render, run_render
from pipeline.runtime import start_services
from tests.helpers import (
    assert_books_balance,
    render_all,
    run_job,
    submit,
    summary,
    wait_until_blocked,
)

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image, max_n 4


def attempts_of(svc, job_id):
    with svc.sessions() as session:
        return list(session.scalars(
            select(Attempt).join(Render).where(Render.job_id == job_id).order_by(Attempt.id)))


def test_delivered_results_are_stored_and_charged(svc, fake):
    s = run_job(svc, [{**FLUX, "n": 6, "custom_id": "a/../../b"},
                      {**FLUX, "response_format": "b64_json", "custom_id": "c"}])
    assert s["status"] == "succeeded"
    assert (s["items_succeeded"], s["images"]) == (2, 7)
    assert s["spent_cents"] == 21 == fake.stats()["billed_cents"]
    assert (s["reserved_cents"], s["unknown_cents"]) == (0, 0)
    assert_books_balance(svc, s["id"])
    with svc.sessions() as session:
        keys = [i.key for i in session.scalars(select(Image).order_by(Image.key))]
    assert all(k.startswith(f"job-{s['id']:06d}/") for k in keys)
    assert all(part not in ("", ".", "..") for k in keys for part in k.split("/"))
    assert all(k.endswith(".png") for k in keys)


def test_large_media_is_stored_whole_with_its_digest(svc, fake):
    """Media past the size hashed on the event loop is hashed on a thread: same record."""
    s = run_job(svc, [{**FLUX, "n": 2, "fake": {"media_bytes": 600_000}},
                      {**FLUX, "response_format": "b64_json", "fake": {"media_bytes": 600_000}}])
    assert (s["status"], s["images"]) == ("succeeded", 3)
    assert s["spent_cents"] == 9 == fake.stats()["billed_cents"]
    with svc.sessions() as session:
        images = list(session.scalars(select(Image)))
    for image in images:
        data = svc.store.get(image.key)
        assert len(data) == image.bytes >= 600_000
        assert hashlib.sha256(data).hexdigest() == image.sha256


def test_bytes_that_are_not_media_are_charged_and_fail_the_render(svc, fake):
    s = run_job(svc, [{**FLUX, "fake": {"garbage": True}}, FLUX])
    assert s["status"] == "partial"
    assert s["spent_cents"] == 6 == fake.stats()["billed_cents"]
    assert s["images"] == 1
    assert_books_balance(svc, s["id"])


def test_a_4xx_refusal_is_released_not_retried_and_keeps_the_upstream_message(svc, fake):
    s = run_job(svc, [{**FLUX, "fake": {"status": 400}}])
    assert s["status"] == "failed"
    assert s["spent_cents"] == 0 == fake.stats()["billed_cents"]
    (attempt,) = attempts_of(svc, s["id"])
    assert (attempt.outcome, attempt.http_status) == ("released", 400)
    assert fake.stats()["calls"] == 1
    assert_books_balance(svc, s["id"])


def test_an_error_event_is_released(svc, fake):
    s = run_job(svc, [{**FLUX, "fake": {"error_event": True}}])
    assert s["spent_cents"] == 0 == fake.stats()["billed_cents"]
    assert [a.outcome for a in attempts_of(svc, s["id"])] == ["released"]
    assert_books_balance(svc, s["id"])


def test_5xx_is_retried_with_new_reservations_until_it_succeeds(svc, fake):
    s = run_job(svc, [{**FLUX, "n": 2, "fake": {"status": 503, "fail_first": 2, "key": "k1"}}])
    assert s["status"] == "succeeded"
    assert [a.outcome for a in attempts_of(svc, s["id"])] == ["released", "released", "charged"]
    assert s["spent_cents"] == 6 == fake.stats()["billed_cents"]
    with svc.sessions() as session:
        kinds = [e.kind for e in session.scalars(
            select(LedgerEntry).where(LedgerEntry.job_id == s["id"]).order_by(LedgerEntry.id))]
    assert kinds == ["reserve", "release", "reserve", "release", "reserve", "charge"]
    assert_books_balance(svc, s["id"])


def test_429_waits_for_retry_after(svc, fake):
    started = time.monotonic()
    s = run_job(svc, [{**FLUX, "fake": {"status": 429, "retry_after": 1, "fail_first": 1,
                                         "key": "k429"}}])
    assert s["status"] == "succeeded"
    assert time.monotonic() - started >= 1.0
    assert s["spent_cents"] == 3 == fake.stats()["billed_cents"]


def test_attempts_stop_at_max_attempts(svc, fake):
    s = run_job(svc, [{**FLUX, "fake": {"status": 500}}])
    assert s["status"] == "failed"
    assert len(attempts_of(svc, s["id"])) == svc.settings.max_attempts == fake.stats()["calls"]
    assert s["spent_cents"] == 0


def test_a_cut_stream_is_charged_as_unknown_and_retried(svc, fake):
    s = run_job(svc, [{**FLUX, "fake": {"cut": True}}])
    assert s["status"] == "failed"
    assert [a.outcome for a in attempts_of(svc, s["id"])] == ["unknown"] * 4
    assert s["spent_cents"] == s["unknown_cents"] == 12 == fake.stats()["billed_cents"]
    assert_books_balance(svc, s["id"])


def test_a_stalled_render_is_unknown_past_its_deadline(tmp_path, fake, settings):
    from pipeline.db import make_engine, upgrade_schema

    settings = replace(settings, render_deadline=1.0, read_timeout=5.0, max_attempts=1)
    upgrade_schema(make_engine(settings.database_url))
    svc = start_services(settings)
    try:
        started = time.monotonic()
        s = run_job(svc, [{**FLUX, "fake": {"stall": True}}])
        assert time.monotonic() - started < 4
        assert s["unknown_cents"] == 3 == fake.stats()["billed_cents"]
        assert_books_balance(svc, s["id"])
    finally:
        svc.close()


def test_connection_refused_is_released(tmp_path, settings):
    import socket

    from pipeline.db import make_engine, upgrade_schema

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = replace(settings, api_base=f"http://127.0.0.1:{port}/v1")
    upgrade_schema(make_engine(settings.database_url))
    svc = start_services(settings)
    try:
        from pipeline.caps import caps_by_model
        from pipeline.jobs import plan_job

        job_id = submit(svc, [FLUX])
        caps = caps_by_model([{"id": "flux-2-dev", "image_caps": {"max_n": 4,
                                                                 "price_per_image_cents": 3}}])
        with transaction(svc.sessions) as session:
            assert plan_job(session, job_id, caps) == 1
        with svc.sessions() as session:
            render_ids = list(session.scalars(select(Render.id).where(Render.job_id == job_id)))
        render_all(svc, render_ids)
        s = summary(svc, job_id)
        assert s["status"] == "failed" and s["spent_cents"] == 0
        assert [a.outcome for a in attempts_of(svc, job_id)] == ["released"] * 4
        assert_books_balance(svc, job_id)
    finally:
        svc.close()


def test_sse_framing_variants_all_deliver(svc, fake):
    variants = [{"line_end": "cr"}, {"line_end": "crlf", "chunk": 3}, {"chunk": 1},
                {"event_lines": True, "empty_events": 3},
                {"revised_prompt": "line\u2028separated\u2029prompt"}]
    s = run_job(svc, [{**FLUX, "fake": v} for v in variants])
    assert s["status"] == "succeeded", s
    with svc.sessions() as session:
        revised = [i.revised_prompt for i in session.scalars(select(Image))]
    assert "line\u2028separated\u2029prompt" in revised


def test_renders_that_do_not_fit_the_cap_fail_with_reason_budget(svc, fake):
    s = run_job(svc, [FLUX] * 5, budget_cents=9)
    assert s["status"] == "partial"
    assert (s["items_succeeded"], s["items_failed"]) == (3, 2)
    assert s["spent_cents"] == 9 == fake.stats()["billed_cents"]
    with svc.sessions() as session:
        errors = [r.error for r in session.scalars(select(Render).where(Render.status == "failed"))]
    assert all(e.startswith("budget:") for e in errors)


def test_seeded_split_renders_record_distinct_seeds(svc, fake):
    s = run_job(svc, [{**FLUX, "n": 6, "seed": 7}])
    with svc.sessions() as session:
        images = list(session.scalars(select(Image).order_by(Image.seed)))
    assert [i.seed for i in images] == [7, 8, 9, 10, 11, 12]
    assert len({i.sha256 for i in images}) == 6
    bodies = [r["body"] for r in fake.requests()]
    assert sorted((b["n"], b["seed"]) for b in bodies) == [(2, 11), (4, 7)]
    assert s["status"] == "succeeded"


def test_unknown_keys_pass_through_and_sse_is_always_on(svc, fake):
    run_job(svc, [{**FLUX, "resolution": "2048", "x_new_knob": {"a": [1]}}])
    (request,) = fake.requests()
    assert request["body"]["resolution"] == "2048"
    assert request["body"]["x_new_knob"] == {"a": [1]}
    assert request["body"]["sse"] is True


def test_a_task_delivered_twice_while_the_first_runs_calls_once(svc, fake):
    job_id = submit(svc, [{**FLUX, "fake": {"latency": 1.0}}])
    (render_id,) = dispatch_pending(svc)
    results = render_all(svc, [render_id, render_id], concurrency=2)
    assert sorted(results) == ["busy", "finished"]
    assert fake.stats()["calls"] == 1
    assert summary(svc, job_id)["spent_cents"] == 3


def test_cancel_stops_new_renders_and_lets_in_flight_ones_settle(svc, fake):
    job_id = submit(svc, [{**FLUX, "fake": {"latency": 1.0}}, FLUX, FLUX])
    first, *rest = dispatch_pending(svc)

    worker = threading.Thread(target=run_render, args=(svc, first))
    worker.start()
    time.sleep(0.5)
    cancel_in_chunks(svc.sessions, job_id)
    render_all(svc, rest)
    worker.join()
    s = summary(svc, job_id)
    assert s["status"] == "cancelled" and s["finished_at"] is not None
    assert (s["items_succeeded"], s["items_cancelled"]) == (1, 2)
    assert s["spent_cents"] == 3 == fake.stats()["billed_cents"]
    assert s["reserved_cents"] == 0
    assert_books_balance(svc, job_id)


def test_renders_waiting_for_a_call_slot_when_the_job_is_cancelled_call_nobody(settings, fake):
    """One call slot and three renders ahead: they hold their reservations while the first
    call runs. Cancelling the job then lets the call finish and settle; the others release
    their reservations without calling and end cancelled."""
    svc = start_services(replace(settings, concurrency=1, renders_ahead=3))
    try:
        job_id = submit(svc, [{**FLUX, "fake": {"latency": 1.5}}] * 4)
        renders = dispatch_pending(svc)
        workers = [threading.Thread(target=run_render, args=(svc, r)) for r in renders]
        for worker in workers:
            worker.start()
        # All four reserved and the first one's call sent (its send recorded first).
        deadline = time.monotonic() + 10
        while summary(svc, job_id)["reserved_cents"] < 4 * 3 or fake.stats()["calls"] < 1:
            assert time.monotonic() < deadline, "the renders ahead never reserved"
            time.sleep(0.05)
        cancel_in_chunks(svc.sessions, job_id)
        for worker in workers:
            worker.join(20)
        s = summary(svc, job_id)
        assert s["status"] == "cancelled" and s["finished_at"] is not None
        assert (s["items_succeeded"], s["items_cancelled"]) == (1, 3)
        assert s["spent_cents"] == 3 == fake.stats()["billed_cents"]
        assert fake.stats()["calls"] == 1
        assert s["reserved_cents"] == 0
        assert_books_balance(svc, job_id)
    finally:
        svc.close()


def test_retry_renders_failed_items_again_with_new_reservations(svc, fake):
    s = run_job(svc, [FLUX, {**FLUX, "fake": {"status": 400, "fail_first": 1, "key": "r1"}}])
    assert s["status"] == "partial"
    with transaction(svc.sessions) as session:
        assert retry_job(session, s["id"]) == 1
    render_all(svc, dispatch_pending(svc))
    s = summary(svc, s["id"])
    assert s["status"] == "succeeded"
    assert s["spent_cents"] == 6 == fake.stats()["billed_cents"]
    assert_books_balance(svc, s["id"])


def test_two_renders_of_one_item_ending_at_once_settle_the_item_and_close_the_job(svc, fake):
    """The second of an item's two renders to end must see the first one ended, or the item
    stays running for good: the item's row lock orders them."""
    job_id = submit(svc, [{**FLUX, "n": 8}])  # two renders of 4
    first, second = dispatch_pending(svc)
    other = threading.Thread(target=_end_in_own_transaction, args=(svc, second))
    with transaction(svc.sessions) as session:
        end_render(session, session.get_one(Render, first), RenderStatus.CANCELLED, "test")
        other.start()
        wait_until_blocked(svc)  # the second render waits for the item's row
    other.join(timeout=30)
    assert not other.is_alive()
    with svc.sessions() as session:
        assert session.scalars(select(JobItem.status).where(JobItem.job_id == job_id)).one() \
            == "cancelled"
    s = summary(svc, job_id)
    assert s["finished_at"] is not None and s["items_cancelled"] == 1


def _end_in_own_transaction(svc, render_id: int) -> None:
    with transaction(svc.sessions) as session:
        end_render(session, session.get_one(Render, render_id), RenderStatus.CANCELLED, "test")
