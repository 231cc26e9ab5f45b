"""Webhooks' pure rules: the signature, the default retry schedule, spend crossings, and the
form of a notify URL."""

from __future__ import annotations

import hashlib
import hmac
import itertools

import pytest

from pipeline.webhooks import RETRY_DELAYS, crossings, retry_delay, signature, url_problem


def test_the_signature_is_hmac_sha256_of_the_exact_body_under_the_secret():
    # RFC 4231, test case 2.
    assert signature("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    body = '{"event":"job.succeeded","name":"otters ü"}'.encode()
    assert signature("s3cret", body) == "sha256=" + hmac.new(
        b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body + b" ") != signature("s3cret", body)
    assert signature("other", body) != signature("s3cret", body)


def test_the_default_schedule_retries_within_30_s_then_backs_off_over_hours_then_gives_up():
    delays = [retry_delay(attempts) for attempts in range(1, 10)]
    assert delays == [10, 60, 300, 1_800, 7_200, 21_600, 43_200, None, None]
    assert delays[0] <= 30  # the first retry
    assert all(a < b for a, b in itertools.pairwise(RETRY_DELAYS))
    assert RETRY_DELAYS[-1] >= 6 * 3600  # backing off over hours
    assert 20 * 3600 < sum(RETRY_DELAYS) < 24 * 3600  # given up within a day
    assert retry_delay(0) == 0.0  # a delivery never tried is due at once


@pytest.mark.parametrize(("before", "after", "limit", "told"), [
    (0, 4, 10, []),
    (4, 5, 10, [50]),  # exactly 50 % is reached
    (0, 10, 10, [50, 80, 100]),  # one settlement can cross all three
    (5, 7, 10, []),  # 50 told already, 80 not reached
    (7, 8, 10, [80]),
    (8, 10, 10, [100]),
    (10, 10, 10, []),  # no move: nothing
    (0, 1, 3, []),  # 33 %
    (1, 2, 3, [50]),  # 66 %: 50 crossed, 80 not
    (2, 3, 3, [80, 100]),
    (49, 50, 100, [50]),
    (50, 51, 100, []),
    (0, 1, 0, []),  # a cap of 0: no percent of nothing
    (0, 5, None, []),  # a team without a budget
    (999_999_999_999_999, 10**15, 10**15, [100]),  # whole cents, no float rounding
])
def test_crossings_are_told_when_spend_reaches_a_threshold(before, after, limit, told):
    assert crossings(before, after, limit) == told


def test_each_threshold_is_crossed_once_by_any_sequence_of_moves():
    limit, spent, told = 97, 0, []
    for step in (3, 7, 1, 30, 2, 5, 19, 11, 19):
        told += crossings(spent, spent + step, limit)
        spent += step
    assert spent == limit and told == [50, 80, 100]


@pytest.mark.parametrize(("url", "problem"), [
    ("https://hooks.example.com/imagebatch?token=x", None),
    ("http://127.0.0.1:8080/hook", None),  # the form is fine; its address is checked apart
    ("ftp://hooks.example.com/x", "not an http(s) URL"),
    ("file:///etc/passwd", "not an http(s) URL"),
    ("https:///nohost", "no host"),
    ("https://user:pass@hooks.example.com/", "holds credentials"),
    ("https://hooks.example.com/\nx", "not a valid URL"),
    ("hooks.example.com/x", "not an http(s) URL"),
    ("https://hooks.example.com/" + "a" * 2000, "longer than 2000 characters"),
])
def test_a_notify_url_must_be_http_with_a_host_and_no_credentials(url, problem):
    found = url_problem(url)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_the_secret_is_never_shown_by_the_settings():
    from pipeline.settings import Settings

    settings = Settings.from_env({"IMAGEBATCH_WEBHOOK_SECRET": "whsec-do-not-show",
                                  "IMAGEBATCH_ALLOW_PRIVATE_WEBHOOKS": "yes"})
    assert settings.webhook_secret == "whsec-do-not-show" and settings.allow_private_webhooks
    assert "whsec-do-not-show" not in repr(settings) + str(settings)
