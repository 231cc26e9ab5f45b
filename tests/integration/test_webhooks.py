"""Webhooks end to end, on SQLite and PostgreSQL, with a real HTTP receiver: a job's end and
its spend crossings are rows written with the money, and the notifier POSTs them, signed,
retrying with the same delivery id until the receiver takes them."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipeline.db import transaction
from pipeline.dispatch import dispatch_pending
from pipeline.jobs import create_job, job_summary, status_document
from pipeline.models import Delivery, utcnow
from pipeline.plan import parse_lines
from pipeline.teams import set_team
from pipeline.webhooks import RETRY_DELAYS, TIMEOUT, deliver_due, job_deliveries
from tests.helpers import assert_books_balance, render_all
from tests.receiver import WEBHOOK_SECRET, receiver

FLUX = {"model": "flux-2-dev", "prompt": "an otter"}  # 3 cents an image at the fake


@pytest.fixture
def hook():
    with receiver() as r:
        yield r


@pytest.fixture
def sending(svc):
    """The settings a notifier runs with: the secret set, loopback receivers allowed."""
    return replace(svc.settings, webhook_secret=WEBHOOK_SECRET, allow_private_webhooks=True)


def submit(svc, lines, *, budget_cents=10_000, team="t", notify_url=None) -> int:
    text = "\n".join(json.dumps(line) for line in lines)
    with transaction(svc.sessions) as session:
        return create_job(session, team=team, budget_cents=budget_cents,
                          entries=parse_lines(text), notify_url=notify_url)


def deliveries(svc, job_id):
    with svc.sessions() as session:
        return job_deliveries(session, job_id)


def test_a_job_end_is_posted_once_signed_with_the_status_json(svc, fake, hook, sending):
    job_id = submit(svc, [FLUX, {**FLUX, "n": 2}], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    assert deliver_due(svc.sessions, sending) == 1
    assert deliver_due(svc.sessions, sending) == 0  # told once
    [post] = hook.wait_for(1)
    assert post.path == "/hook?token=t0ken"
    assert post.signed_by(WEBHOOK_SECRET)
    assert not post.signed_by(WEBHOOK_SECRET + "x")
    assert post.headers["content-type"] == "application/json"
    assert post.headers["x-imagebatch-event"] == "job.succeeded"
    uuid.UUID(post.delivery)
    with svc.sessions() as session:
        expected = status_document(session, job_id)
    assert post.document == {"event": "job.succeeded", **expected}
    assert (post.document["status"], post.document["spent_cents"], post.document["images"]) == (
        "succeeded", 9, 3)
    [told] = deliveries(svc, job_id)
    assert (told["status"], told["attempts"], told["delivery"]) == ("sent", 1, post.delivery)
    assert_books_balance(svc, job_id)
    # The secret is in no row: not in the body kept, not anywhere else.
    with svc.sessions() as session:
        stored = session.execute(sa.select(Delivery.body, Delivery.url, Delivery.last_error)).all()
    assert WEBHOOK_SECRET not in repr(stored)


def test_a_failed_job_and_a_cancelled_one_are_told_so(svc, fake, hook, sending):
    failed = submit(svc, [{**FLUX, "fake": {"status": 400}}], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    from pipeline.jobs import cancel_in_chunks

    cancelled = submit(svc, [FLUX, FLUX], notify_url=hook.url)
    cancel_in_chunks(svc.sessions, cancelled)
    deliver_due(svc.sessions, sending)
    by_job = {r.document["id"]: r.document for r in hook.wait_for(2)}
    assert by_job[failed]["event"] == "job.failed" and by_job[failed]["errors"][0]["line"] == 1
    assert by_job[cancelled]["event"] == "job.cancelled"
    assert by_job[cancelled]["status"] == "cancelled"


def test_a_receiver_answering_500_then_200_gets_the_same_delivery_twice(svc, fake, hook,
                                                                         sending):
    hook.answers = [500]
    job_id = submit(svc, [FLUX], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    now = utcnow()
    assert deliver_due(svc.sessions, sending, now=now) == 1
    [told] = deliveries(svc, job_id)
    assert (told["status"], told["attempts"]) == ("pending", 1)
    assert "answered HTTP 500" in told["last_error"]
    # Not again before its first retry (within 30 s), then again.
    assert deliver_due(svc.sessions, sending, now=now + timedelta(seconds=5)) == 0
    assert deliver_due(svc.sessions, sending,
                       now=now + timedelta(seconds=RETRY_DELAYS[0] + 1)) == 1
    first, second = hook.wait_for(2)
    assert (first.answered, second.answered) == (500, 200)
    assert first.delivery == second.delivery and first.body == second.body
    assert second.signed_by(WEBHOOK_SECRET)
    [told] = deliveries(svc, job_id)
    assert (told["status"], told["attempts"]) == ("sent", 2)


def test_a_receiver_that_keeps_failing_is_given_up_with_the_reason_kept(svc, fake, hook,
                                                                        sending):
    hook.answers = [503] * 100
    job_id = submit(svc, [FLUX], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    now = utcnow()
    for delay in (0, *RETRY_DELAYS):
        now += timedelta(seconds=delay + 1)
        assert deliver_due(svc.sessions, sending, now=now) == 1
    assert deliver_due(svc.sessions, sending, now=now + timedelta(days=30)) == 0
    assert len(hook.received) == 1 + len(RETRY_DELAYS)
    assert len({r.delivery for r in hook.received}) == 1
    [told] = deliveries(svc, job_id)
    assert told["status"] == "failed" and told["attempts"] == 1 + len(RETRY_DELAYS)
    assert told["last_error"] == (f"gave up after {1 + len(RETRY_DELAYS)} attempts: "
                                  f"127.0.0.1 answered HTTP 503")


def test_a_loopback_receiver_is_refused_unless_allowed_and_nothing_is_posted(svc, fake, hook,
                                                                           sending):
    job_id = submit(svc, [FLUX], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    deliver_due(svc.sessions, replace(sending, allow_private_webhooks=False))
    assert hook.received == []
    [told] = deliveries(svc, job_id)
    assert told["status"] == "failed"
    assert "a private or loopback address" in told["last_error"]
    assert "IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS" in told["last_error"]


def test_without_the_secret_nothing_is_sent_unsigned_and_it_waits(svc, fake, hook, sending):
    job_id = submit(svc, [FLUX], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    assert deliver_due(svc.sessions, replace(sending, webhook_secret=None)) == 0
    assert hook.received == []
    assert deliveries(svc, job_id)[0]["status"] == "pending"
    assert deliver_due(svc.sessions, sending) == 1  # a process with the secret sends it
    assert hook.wait_for(1)[0].signed_by(WEBHOOK_SECRET)


def test_spend_crossings_of_the_job_and_its_team_are_each_told_once(svc, fake, hook, sending):
    with transaction(svc.sessions) as session:
        set_team(session, "t", 24, "month")
    # 4 renders of 3 cents under a 12-cent cap: 6 is 50 %, 12 is 80 % and 100 %; the team
    # (24 cents a month) reaches 50 %.
    first = submit(svc, [FLUX] * 4, budget_cents=12, notify_url=hook.url)
    render_all(svc, dispatch_pending(svc), concurrency=4)
    deliver_due(svc.sessions, sending)
    posts = hook.wait_for(5)
    spend = sorted((p.document["scope"], p.document["percent"]) for p in posts
                   if p.document["event"].startswith("spend."))
    assert spend == [("job", 50), ("job", 80), ("job", 100), ("team", 50)]
    for post in posts:
        assert post.signed_by(WEBHOOK_SECRET)
        doc = post.document
        if doc["event"].startswith("spend."):
            assert doc["event"] == f"spend.{doc['percent']}" and doc["id"] == first
            assert doc["limit_cents"] == (12 if doc["scope"] == "job" else 24)
            assert doc["spent_cents"] * 100 >= doc["percent"] * doc["limit_cents"]
    assert [p.document["event"] for p in posts][-1] == "job.succeeded"
    assert_books_balance(svc, first)
    # A second job of the team takes it to 100 %: the team's 80 and 100 are told to it, the
    # team's 50 not again.
    second = submit(svc, [FLUX] * 4, budget_cents=100, notify_url=hook.url)
    render_all(svc, dispatch_pending(svc), concurrency=4)
    deliver_due(svc.sessions, sending)
    later = [p.document for p in hook.wait_for(8)[5:]]
    assert sorted((d["event"], d.get("scope")) for d in later) == [
        ("job.succeeded", None), ("spend.100", "team"), ("spend.80", "team")]
    assert all(d["id"] == second for d in later)
    with svc.sessions() as session:
        assert job_summary(session, second)["spent_cents"] == 12
    assert_books_balance(svc, second)


def test_a_job_submitted_with_sql_and_a_notify_url_is_told(svc, fake, hook, sending):
    engine = sa.create_engine(svc.settings.database_url)
    with engine.begin() as connection:
        job_id = connection.execute(sa.text(
            "INSERT INTO jobs (team, name, budget_cents, status, notify_url) "
            "VALUES ('data', 'from-sql', 500, 'pending', :url) RETURNING id"),
            {"url": hook.url}).scalar_one()
        connection.execute(sa.text(
            "INSERT INTO job_items (job_id, line, custom_id, body) VALUES (:j, 1, 'a', :b)"),
            {"j": job_id, "b": json.dumps(FLUX)})
    engine.dispose()
    render_all(svc, dispatch_pending(svc))
    deliver_due(svc.sessions, sending)
    [post] = hook.wait_for(1)
    assert post.document["event"] == "job.succeeded" and post.document["id"] == job_id
    assert post.signed_by(WEBHOOK_SECRET)


def test_a_job_without_a_notify_url_writes_no_delivery(svc, fake, hook, sending):
    job_id = submit(svc, [FLUX] * 4, budget_cents=12)
    render_all(svc, dispatch_pending(svc))
    assert deliver_due(svc.sessions, sending) == 0
    assert deliveries(svc, job_id) == [] and hook.received == []


def test_a_redirect_is_not_followed_and_a_silent_receiver_times_out(svc, fake, hook, sending):
    hook.answers = [302]
    job_id = submit(svc, [FLUX], notify_url=hook.url)
    render_all(svc, dispatch_pending(svc))
    now = utcnow()
    deliver_due(svc.sessions, sending, now=now)
    assert len(hook.received) == 1  # one POST, nothing sent on to where it points
    [told] = deliveries(svc, job_id)
    assert told["last_error"] == "127.0.0.1 answered HTTP 302 (redirects are not followed)"
    hook.hang.set()
    started = time.monotonic()
    deliver_due(svc.sessions, sending, now=now + timedelta(seconds=RETRY_DELAYS[0] + 1))
    assert time.monotonic() - started < TIMEOUT + 5
    [told] = deliveries(svc, job_id)
    assert (told["status"], told["attempts"]) == ("pending", 2)
    assert told["last_error"] == f"127.0.0.1 did not answer within {TIMEOUT:g} s"
