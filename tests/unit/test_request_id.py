"""The upstream's request id, read from a delivered answer (no server: httpx.MockTransport)."""

from __future__ import annotations

import httpx

from pipeline.upstream import Delivered, Refused
from tests.unit.test_client_outcomes import KEY, RESULT, event, generate, sse


def test_the_x_request_id_header_names_a_delivered_result() -> None:
    outcome = generate(sse(event(RESULT), headers={"x-request-id": "req_abc123"}))
    assert outcome == Delivered(data=RESULT["data"], created=1715000000,
                                request_id="req_abc123")


def test_a_request_id_header_or_the_body_id_are_read_when_x_request_id_is_missing() -> None:
    named = generate(lambda request: httpx.Response(200, json=RESULT,
                                                    headers={"request-id": "r-42"}))
    assert isinstance(named, Delivered) and named.request_id == "r-42"
    in_body = generate(sse(event({**RESULT, "id": "gen-7"})))
    assert isinstance(in_body, Delivered) and in_body.request_id == "gen-7"
    both = generate(sse(event({**RESULT, "id": "gen-7"}), headers={"x-request-id": "req_1"}))
    assert isinstance(both, Delivered) and both.request_id == "req_1"


def test_no_id_or_one_that_is_not_an_id_keeps_none() -> None:
    assert generate(sse(event(RESULT))) == Delivered(data=RESULT["data"], created=1715000000)
    for odd in ("two words", "x" * 201, "", 42):
        outcome = generate(sse(event({**RESULT, "id": odd})))
        assert isinstance(outcome, Delivered) and outcome.request_id is None, odd


def test_a_request_id_echoing_the_key_is_kept_redacted() -> None:
    outcome = generate(sse(event(RESULT), headers={"x-request-id": f"req_{KEY}"}))
    assert isinstance(outcome, Delivered) and outcome.request_id is not None
    assert KEY not in outcome.request_id


def test_a_refusal_carries_no_request_id() -> None:
    outcome = generate(lambda request: httpx.Response(400, json={"error": {"message": "bad"}},
                                                      headers={"x-request-id": "req_9"}))
    assert isinstance(outcome, Refused)


def test_an_id_that_redaction_would_make_too_long_for_its_column_is_not_kept() -> None:
    """A short key repeated in a 200-character id grows past 200 once each copy reads
    "[redacted]": storing it would fail the render's settlement, so it is dropped."""
    short_key = "k3ys"  # redaction takes secrets of 4 characters and more
    outcome = generate(sse(event(RESULT), headers={"x-request-id": short_key * 50}),
                       api_key=short_key)
    assert isinstance(outcome, Delivered) and outcome.request_id is None
    fits = generate(sse(event(RESULT), headers={"x-request-id": f"req_{short_key}"}),
                    api_key=short_key)
    assert isinstance(fits, Delivered) and fits.request_id == "req_[redacted]"
