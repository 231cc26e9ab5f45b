"""Schedules: a cron expression is read in the schedule's own time zone (firing slots in SQL:
tests/integration/test_schedules.py)."""

from __future__ import annotations

from datetime import datetime

from pipeline.schedules import latest_firing


def test_cron_is_read_in_the_schedules_zone():
    now = datetime(2026, 11, 24, 12)
    assert latest_firing("0 3 * * *", "UTC", now) == datetime(2026, 11, 24, 3)
    assert latest_firing("0 3 * * *", "Europe/Berlin", now) == datetime(2026, 11, 24, 2)
