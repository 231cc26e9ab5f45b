"""Settings as a user meets them: every IMAGEBATCH_* value checked when read (one line naming
the variable, the value and what is allowed), settings that depend on each other checked
together, and no password or key in what is logged (the CLI's answers to bad settings:
tests/acceptance/test_settings.py)."""

from __future__ import annotations

import logging
import sys

import pytest

from pipeline.settings import NUMBERS, Settings, SettingsError


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert (s.concurrency, s.render_slots, s.committers, s.max_attempts) == (64, 96, 1, 4)
    assert (s.max_media_bytes, s.models_ttl, s.broker_window, s.max_in_flight) == (
        64 * 1024 * 1024, 3600, 0, 0)
    assert (s.render_deadline, s.read_timeout, s.lease_seconds) == (900.0, 120.0, 60.0)
    assert (s.requeue_after, s.sweep_interval, s.visibility_timeout) == (60.0, 30.0, 0.0)
    assert s.allow_private_media is False
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("imagebatch.db")
    # Derived values follow the lease they derive from.
    derived = Settings.from_env({"IMAGEBATCH_LEASE_SECONDS": "10"})
    assert (derived.requeue_after, derived.sweep_interval) == (10.0, 5.0)


@pytest.mark.parametrize("spec", NUMBERS, ids=[n.env for n in NUMBERS])
def test_every_numeric_setting_is_refused_outside_its_range_with_its_name(spec):
    for value in _bad_values(spec):
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({f"IMAGEBATCH_{spec.env}": value})
        message = str(refused.value)
        assert message.startswith(f"IMAGEBATCH_{spec.env}={value!r}: "), message
        assert "must be" in message and "\n" not in message
    # Its bounds themselves are allowed, and 0 where 0 means something (the backoffs with
    # a partner that keeps the cap at or above the base).
    partner = {"BACKOFF_BASE": {"IMAGEBATCH_BACKOFF_CAP": "86400"},
               "BACKOFF_CAP": {"IMAGEBATCH_BACKOFF_BASE": "0.01"}}.get(spec.env, {})
    for value in (spec.low, spec.high) + ((0,) if spec.zero else ()):
        text = str(int(value)) if spec.kind is int else repr(float(value))
        read = Settings.from_env({f"IMAGEBATCH_{spec.env}": text, **partner})
        assert getattr(read, spec.attr) == value


@pytest.mark.parametrize("name, value, expected", [
    ("LEASE_SECONDS", "0", "must be from 2 to 86,400 seconds"),
    ("LEASE_SECONDS", "1", "must be from 2 to 86,400 seconds"),
    ("RENDER_DEADLINE", "0", "must be from 1 to 604,800 seconds"),
    ("RENDER_DEADLINE", "nan", "not a finite number"),
    ("RENDER_DEADLINE", "inf", "not a finite number"),
    ("CONCURRENCY", "0", "must be from 1 to 10,000"),
    ("CONCURRENCY", "-3", "must be from 1 to 10,000"),
    ("MAX_ATTEMPTS", "0", "must be from 1 to 100"),
    ("SWEEP_INTERVAL", "0", "must be from 0.1 to 86,400 seconds"),
    ("REQUEUE_AFTER", "0", "must be from 1 to 604,800 seconds"),
    ("BROKER_WINDOW", "-1", "must be 0 (twice the live workers' render slots) or from 1"),
    ("ALLOW_PRIVATE_MEDIA", "maybe", "must be one of 1, true, yes, on (on) or 0, false"),
    ("API_BASE", "ftp://host/v1", "not an http(s) URL"),
    ("API_BASE", "http://[::1/v1", "not an http(s) URL"),
    ("API_BASE", "http://host:99999/v1", "not an http(s) URL"),
    ("API_BASE", "api.airforce/v1", "not an http(s) URL"),
    ("BROKER_URL", "amqp://host//", "must start with filesystem:// or redis://"),
    ("REDIS_URL", "memcached://host", "must start with redis:// or rediss://"),
    ("MODEL_RATES", "flux=fast", "is not MODEL=COUNT/UNIT"),
])
def test_bad_settings_name_the_variable_the_value_and_what_is_allowed(name, value, expected):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({f"IMAGEBATCH_{name}": value})
    message = str(refused.value)
    assert f"IMAGEBATCH_{name}" in message and expected in message, message


def test_an_api_key_with_a_line_break_is_refused_without_showing_it():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"IMAGEBATCH_API_KEY": "sk-air-SECRET123\n"})
    assert str(refused.value).startswith("IMAGEBATCH_API_KEY: holds a line break")
    assert "SECRET123" not in str(refused.value)


def test_settings_that_depend_on_each_other_are_checked_together():
    with pytest.raises(SettingsError, match=r"IMAGEBATCH_BACKOFF_CAP=0\.5 is below "
                                            r"IMAGEBATCH_BACKOFF_BASE=2"):
        Settings.from_env({"IMAGEBATCH_BACKOFF_BASE": "2", "IMAGEBATCH_BACKOFF_CAP": "0.5"})
    # A lease short enough for its derived sweep and requeue delays is refused as the lease.
    with pytest.raises(SettingsError, match=r"IMAGEBATCH_LEASE_SECONDS='0\.5'"):
        Settings.from_env({"IMAGEBATCH_LEASE_SECONDS": "0.5"})


def test_celery_records_reach_stderr_as_one_line():
    """Whatever Celery logs with a traceback (at start-up, at shutdown) is printed as one
    line; -vv keeps the whole record."""
    from pipeline.logs import one_line_transport_logs

    try:
        raise AttributeError("'NoneType' object has no attribute 'qos_semantics_matches_spec'")
    except AttributeError:
        exc_info = sys.exc_info()
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    for name, lines in (("celery.worker", 1), ("imagebatch.render", 3)):
        record = logging.LogRecord(name, logging.CRITICAL, __file__, 1,
                                   "Unrecoverable error: %r", (exc_info[1],), exc_info)
        assert one_line_transport_logs(record)
        text = formatter.format(record)
        assert len(text.splitlines()) >= lines and ("Traceback" in text) == (lines > 1), text
        if lines == 1:
            assert text.startswith("CRITICAL celery.worker: Unrecoverable error: AttributeError")


def test_settings_printed_into_a_log_show_no_password_and_no_key() -> None:
    settings = Settings(api_base="http://user:BASEPASS@h/v1", api_key="sk-NEVER-SHOWN",
                        database_url="postgresql://app:DBPASS@db/imagebatch",
                        broker_url="redis://:REDISPASS@r:6379/0",
                        redis_url="rediss://u:LIMITPASS@r:6380/1")
    shown = repr(settings)
    for secret in ("BASEPASS", "sk-NEVER-SHOWN", "DBPASS", "REDISPASS", "LIMITPASS"):
        assert secret not in shown
    assert "postgresql://app:***@db/imagebatch" in shown and "concurrency=64" in shown


def _bad_values(spec) -> list[str]:
    if spec.low <= 0 or spec.zero:
        below = "-1"
    else:
        below = str(spec.low / 2 if spec.kind is float else spec.low - 1)
    values = ["lots", "nan", "inf", "-inf", "1e400", below, str(spec.high * 2), "-5"]
    if spec.kind is int:
        values.append("2.5")
    if not spec.zero and spec.low > 0:
        values.append("0")
    return values
