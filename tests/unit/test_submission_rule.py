"""The submission rule with no file and no database: a job's text checked against caps,
refused with FILE:LINE lines unless invalid lines are allowed, the same for a schedule."""

from __future__ import annotations

import json

import pytest

from pipeline.caps import Caps
from pipeline.schedules import InvalidScheduleLines, ScheduleError, check_schedule
from pipeline.submission import MAX_ERRORS, InvalidLines, accept, check_text, error_lines

CAPS = {"flux": Caps("flux", max_n=4, aspect_ratios=("1:1",), price_per_image_cents=3)}


def text(*lines: object) -> str:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)


JOB = text({"model": "flux", "prompt": "a", "n": 5},
           {"model": "nope", "prompt": "b", "custom_id": "x"},
           {"model": "flux", "prompt": "c", "n": 20_000},
           {"model": "flux", "prompt": "d", "aspect_ratio": "5:4"})


def test_every_line_is_checked_against_the_caps_and_priced():
    checked = check_text(JOB, CAPS, "jobs.jsonl")
    assert (checked.items, checked.error_count, checked.calls, checked.max_cost_cents) == (
        1, 3, 2, 15)
    assert error_lines(checked, "jobs.jsonl") == [
        "jobs.jsonl:2 (x): unknown model 'nope' (not an image model in /models)",
        "jobs.jsonl:3: n must be an integer from 1 to 10000, got 20000",
        "jobs.jsonl:4: aspect_ratio '5:4' is not allowed for flux (allowed: 1:1)"]


def test_a_file_with_an_invalid_line_is_refused_unless_allowed():
    checked = check_text(JOB, CAPS, "jobs.jsonl")
    with pytest.raises(InvalidLines) as refused:
        accept(checked, "jobs.jsonl", allow_invalid=False)
    assert refused.value.lines == error_lines(checked, "jobs.jsonl")
    assert str(refused.value) == ("3 invalid line(s) in jobs.jsonl; nothing was submitted "
                                  "(fix them, or pass --allow-invalid to run the rest)")
    assert accept(checked, "jobs.jsonl", allow_invalid=True) is checked
    valid = check_text(text({"model": "flux", "prompt": "a"}), CAPS)
    assert accept(valid, None, allow_invalid=False) is valid


def test_only_the_first_errors_are_kept_and_the_rest_counted():
    many = text(*[{"model": "nope", "prompt": str(i)} for i in range(MAX_ERRORS + 7)])
    lines = error_lines(check_text(many, CAPS), None)
    assert len(lines) == MAX_ERRORS + 1 and lines[0].startswith("line 1: unknown model")
    assert lines[-1] == "... and 7 more invalid lines"


def test_a_schedule_is_refused_as_submit_refuses_and_kept_when_allowed():
    with pytest.raises(InvalidScheduleLines) as refused:
        check_schedule("0 3 * * *", "UTC", JOB, CAPS, where="nightly.jsonl")
    assert isinstance(refused.value, ScheduleError) and isinstance(refused.value, InvalidLines)
    assert refused.value.lines == error_lines(check_text(JOB, CAPS), "nightly.jsonl")
    assert "nothing was stored" in refused.value.summary
    allowed = check_schedule("0 3 * * *", "UTC", JOB, CAPS, allow_invalid=True)
    assert (allowed.items, allowed.error_count) == (1, 3)
    with pytest.raises(ScheduleError, match="no job lines"):
        check_schedule("0 3 * * *", "UTC", "\n\n", CAPS)
