"""Submitting a job file: the line reader (line ends, bad UTF-8, repeated ids) and per-line
planning, with no file and no database (the chunked writes: tests/integration; what
`imagebatch submit` prints: tests/acceptance)."""

from __future__ import annotations

import io

from pipeline.plan import JobLine, LineError, PlannedItem, plan_line
from pipeline.submission import (
    plan_stream,
    read_lines,
)
from tests.integration.test_submission import CAPS, flux, jsonl


def test_lines_end_at_lf_only_crlf_and_blank_lines_are_handled():
    data = (b'{"model": "flux", "prompt": "a\xe2\x80\xa8b"}\r\n'  # raw U+2028 inside a string
            b"\r\n   \n"
            b'{"model": "flux", "prompt": "c\xe2\x80\xa9d"}')  # U+2029, and no final newline
    read = list(read_lines(io.BytesIO(data)))
    assert [number for number, _ in read] == [1, 4]
    parsed = [entry for entry, _ in plan_stream(io.BytesIO(data), CAPS)]
    assert [p.body["prompt"] for p in parsed] == ["a\u2028b", "c\u2029d"]


def test_a_line_that_is_not_utf8_is_an_error_naming_it_and_the_rest_is_read():
    data = jsonl(flux(1)) + b'{"model": "flux", "prompt": "caf\xe9"}\n' + jsonl(flux(3))
    outcomes = [outcome for _, outcome in plan_stream(io.BytesIO(data), CAPS)]
    assert isinstance(outcomes[0], PlannedItem) and isinstance(outcomes[2], PlannedItem)
    error = outcomes[1]
    assert isinstance(error, LineError)
    assert (error.line, error.reason) == (2, "not UTF-8 text (byte 33)")


def test_a_repeated_custom_id_fails_the_later_line_with_the_first_ones_number():
    data = jsonl(flux(1), {**flux(2), "custom_id": "c1"}, "{oops", flux(3))
    outcomes = [outcome for _, outcome in plan_stream(io.BytesIO(data), CAPS)]
    assert outcomes[1].reason == "custom_id 'c1' repeats line 1"
    assert "not valid JSON" in outcomes[2].reason
    assert isinstance(outcomes[3], PlannedItem)


def test_plan_line_splits_prices_and_explains_a_caps_violation():
    item = plan_line(JobLine(7, {"model": "flux", "prompt": "p", "n": 9, "seed": 10}), CAPS)
    assert isinstance(item, PlannedItem)
    assert [(r.n, r.seed) for r in item.renders] == [(4, 10), (4, 14), (1, 18)]
    assert item.max_cost_cents == 27
    bad = plan_line(JobLine(8, {"model": "flux", "prompt": "p", "aspect_ratio": "5:4"}), CAPS)
    assert isinstance(bad, LineError) and bad.line == 8 and "aspect_ratio '5:4'" in bad.reason
