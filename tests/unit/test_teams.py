"""Team period budgets: periods are UTC calendar periods (the holds on job and team:
tests/integration/test_teams.py)."""

from __future__ import annotations

from datetime import datetime

import pytest

from pipeline.teams import period_bounds


@pytest.mark.parametrize(("period", "now", "start", "end"), [
    ("day", datetime(2026, 11, 24, 13, 5), datetime(2026, 11, 24), datetime(2026, 11, 25)),
    ("week", datetime(2026, 11, 26, 1), datetime(2026, 11, 23), datetime(2026, 11, 30)),
    ("month", datetime(2026, 12, 31, 23, 59), datetime(2026, 12, 1), datetime(2027, 1, 1)),
    ("none", datetime(2026, 1, 1), datetime(1970, 1, 1), None),
])
def test_periods_are_utc_calendar_periods(period, now, start, end):
    assert period_bounds(period, now) == (start, end)
