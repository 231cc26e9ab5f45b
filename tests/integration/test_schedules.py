"""Schedules: stored with their job text, each slot fired once, missed slots fired once."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from pipeline.caps import Caps
from pipeline.db import make_engine, session_factory, transaction
from pipeline.models import Job, Schedule
from pipeline.schedules import ScheduleError, add_schedule, fire_due, run_now

TEXT = json.dumps({"model": "flux-2-dev", "prompt": "nightly"}) + "\n"
CAPS = {"flux-2-dev": Caps("flux-2-dev", max_n=4, price_per_image_cents=3)}


@pytest.fixture
def sessions(database_url):
    """SQLite and PostgreSQL (the `database_url` fixture runs each test on both)."""
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


def add(sessions, name="nightly", cron="0 3 * * *", created=datetime(2026, 11, 1)):
    with transaction(sessions) as session:
        add_schedule(session, name=name, cron=cron, job_text=TEXT, team="t", budget_cents=200,
                     caps=CAPS)
    with transaction(sessions) as session:
        session.execute(update(Schedule).values(created_at=created))


def jobs(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Job))


def test_a_beat_down_for_three_slots_fires_once(sessions):
    add(sessions)
    assert fire_due(sessions, datetime(2026, 11, 1, 3, 0, 5)) != []
    # beat was down for the 2nd, 3rd and 4th: it comes back on the 4th at noon
    fired = fire_due(sessions, datetime(2026, 11, 4, 12))
    assert len(fired) == 1
    assert fire_due(sessions, datetime(2026, 11, 4, 12, 1)) == []
    assert jobs(sessions) == 2
    with sessions() as session:
        job = session.get_one(Job, fired[0])
        assert (job.team, job.budget_cents, job.status) == ("t", 200, "pending")


def test_two_beats_never_fire_one_slot_twice(sessions):
    add(sessions)
    now = datetime(2026, 11, 2, 3, 0, 1)
    results: list[list[int]] = []
    beats = [threading.Thread(target=lambda: results.append(fire_due(sessions, now)))
             for _ in range(4)]
    for beat in beats:
        beat.start()
    for beat in beats:
        beat.join()
    assert sum(len(r) for r in results) == 1
    assert jobs(sessions) == 1


def test_nothing_fires_for_slots_before_the_schedule_existed(sessions):
    add(sessions, created=datetime(2026, 11, 10, 12))
    assert fire_due(sessions, datetime(2026, 11, 10, 13)) == []
    assert len(fire_due(sessions, datetime(2026, 11, 11, 3) + timedelta(seconds=1))) == 1


def test_run_now_and_bad_input(sessions):
    add(sessions)
    with transaction(sessions) as session:
        job_id = run_now(session, "nightly")
    with sessions() as session:
        assert session.get_one(Job, job_id).source == "schedule"  # not "cli"
    with transaction(sessions) as session, pytest.raises(ScheduleError, match="cron"):
        add_schedule(session, name="x", cron="every day", job_text=TEXT, team="t",
                     budget_cents=1, caps=CAPS)
    with transaction(sessions) as session, pytest.raises(ScheduleError, match="time zone"):
        add_schedule(session, name="x", cron="0 3 * * *", job_text=TEXT, team="t",
                     budget_cents=1, timezone="Mars/Olympus", caps=CAPS)
    with transaction(sessions) as session, pytest.raises(ScheduleError, match="line 1"):
        add_schedule(session, name="x", cron="0 3 * * *", job_text="{bad", team="t",
                     budget_cents=1, caps=CAPS)
