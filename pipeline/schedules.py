"""Scheduled renders: cron schedules kept in SQL with their job file's text, fired by beat.

Each firing (a time the cron names) is claimed with one conditional UPDATE of `last_slot`
and creates the job in the same transaction, so two beats never fire it twice. After downtime
only the latest missed firing fires, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.caps import Caps
from pipeline.db import transaction
from pipeline.jobs import create_job
from pipeline.models import Job, Schedule, utcnow
from pipeline.plan import parse_lines
from pipeline.submission import (
    InvalidLines,
    JobFileError,
    Submission,
    accept,
    check_text,
    storable_text,
)


class ScheduleError(ValueError):
    pass


class InvalidScheduleLines(InvalidLines, ScheduleError):
    """A schedule's job file refused, as `submit` refuses it; str() names its first line."""

    def __str__(self) -> str:
        return f"{self.summary}; first: {self.lines[0]}"


def check_schedule(cron: str, timezone: str, job_text: str, caps: Mapping[str, Caps], *,
                   allow_invalid: bool = False, where: str | None = None) -> Submission:
    """The cron expression, the zone, and the job file under the submission rule (every
    line checked against the caps; refused unless `allow_invalid`), as `submit` checks it.
    Each firing is checked again when the dispatcher plans its job (the catalogue may have
    changed): a line invalid by then fails with its reason, as with `--allow-invalid`."""
    if not croniter.is_valid(cron):
        raise ScheduleError(f"--cron {cron!r} is not a cron expression (e.g. '0 3 * * *')")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"--timezone {timezone!r} is not a known time zone") from None
    try:
        checked = check_text(job_text, caps, where)
    except JobFileError as exc:  # no job lines
        raise ScheduleError(str(exc)) from None
    return accept(checked, where, allow_invalid=allow_invalid, what="stored",
                  refusal=InvalidScheduleLines)


def add_schedule(session: Session, *, name: str, cron: str, job_text: str, team: str,
                 budget_cents: int, caps: Mapping[str, Caps], allow_invalid: bool = False,
                 timezone: str = "UTC", source_name: str | None = None,
                 where: str | None = None, notify_url: str | None = None) -> Submission:
    """Store a schedule whose job file passed `check_schedule` (`where`: the file's path,
    for the messages); returns the check (the invalid lines `allow_invalid` let through)."""
    checked = check_schedule(cron, timezone, job_text, caps, allow_invalid=allow_invalid,
                             where=where)
    if session.get(Schedule, name) is not None:
        raise ScheduleError(f"a schedule named {name!r} exists (remove it first)")
    schedule = Schedule(name=name, cron=cron, timezone=timezone, team=team,
                        budget_cents=budget_cents, job_text=storable_text(job_text),
                        source_name=source_name, notify_url=notify_url,
                        created_at=utcnow())
    session.add(schedule)
    return checked


def latest_firing(cron: str, timezone: str, now: datetime) -> datetime:
    """The latest firing time <= now, as naive UTC (cron is read in the schedule's zone)."""
    zone = ZoneInfo(timezone)
    local_now = now.replace(tzinfo=UTC).astimezone(zone)
    # croniter steps back from just after now, so a firing exactly at `now` counts.
    firing = croniter(cron, local_now).get_prev(datetime)
    if croniter.match(cron, local_now.replace(second=0, microsecond=0)):
        firing = max(firing, local_now.replace(second=0, microsecond=0))
    return firing.astimezone(UTC).replace(tzinfo=None)


def next_firing(cron: str, timezone: str, now: datetime) -> datetime:
    zone = ZoneInfo(timezone)
    local_now = now.replace(tzinfo=UTC).astimezone(zone)
    return croniter(cron, local_now).get_next(datetime).astimezone(UTC).replace(tzinfo=None)


def fire_due(sessions: sessionmaker[Session], now: datetime | None = None) -> list[int]:
    """Create a job for every schedule with a firing due; returns the new job ids."""
    now = now or utcnow()
    with sessions() as session:
        schedules = session.scalars(select(Schedule)).all()
    fired = []
    for schedule in schedules:
        firing = latest_firing(schedule.cron, schedule.timezone, now)
        if firing < schedule.created_at.replace(second=0, microsecond=0):
            continue  # nothing is due from before the schedule existed
        if schedule.last_fired is not None and firing <= schedule.last_fired:
            continue
        job_id = _fire(sessions, schedule.name, firing)
        if job_id is not None:
            fired.append(job_id)
    return fired


def _fire(sessions: sessionmaker[Session], name: str, firing: datetime) -> int | None:
    with transaction(sessions) as session:
        claimed = session.execute(
            update(Schedule)
            .where(Schedule.name == name,
                   or_(Schedule.last_fired.is_(None), Schedule.last_fired < firing))
            .values(last_fired=firing)
        )
        if claimed.rowcount != 1:
            return None  # another beat took this firing
        schedule = session.get_one(Schedule, name)
        job_id = _create_from(session, schedule, f"{name} @ {firing:%Y-%m-%d %H:%M}Z")
        schedule.last_job_id = job_id
        return job_id


def run_now(session: Session, name: str) -> int:
    schedule = session.get(Schedule, name)
    if schedule is None:
        raise ScheduleError(f"no schedule named {name!r}")
    job_id = _create_from(session, schedule, f"{name} (run now)")
    schedule.last_job_id = job_id
    return job_id


def _create_from(session: Session, schedule: Schedule, job_name: str) -> int:
    return create_job(session, team=schedule.team, budget_cents=schedule.budget_cents,
                      entries=parse_lines(schedule.job_text), name=job_name, source="schedule",
                      notify_url=schedule.notify_url)


def remove_schedule(session: Session, name: str) -> None:
    schedule = session.get(Schedule, name)
    if schedule is None:
        raise ScheduleError(f"no schedule named {name!r}")
    session.delete(schedule)


@dataclass(frozen=True)
class ScheduleView:
    name: str
    cron: str
    timezone: str
    team: str
    budget_cents: int
    next_firing: datetime
    last_fired: datetime | None
    last_job_id: int | None
    last_job_status: str | None


def list_schedules(session: Session, now: datetime | None = None) -> list[ScheduleView]:
    now = now or utcnow()
    views = []
    for s in session.scalars(select(Schedule).order_by(Schedule.name)):
        job = session.get(Job, s.last_job_id) if s.last_job_id else None
        views.append(ScheduleView(
            s.name, s.cron, s.timezone, s.team, s.budget_cents,
            next_firing(s.cron, s.timezone, now), s.last_fired, s.last_job_id,
            job.status if job else None,
        ))
    return views
