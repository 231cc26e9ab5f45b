"""The pure rules of `imagebatch serve`: ETA, the spend chart's layout, who may bind where,
the token's form, how media are sent."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest

from pipeline.gallery import DaySpend, eta_seconds
from web.app import (
    TOKEN_ENV,
    ServeRefused,
    check_bind,
    duration,
    loopback_hosts,
    media_headers,
    read_token,
    session_value,
)
from web.chart import OTHER, PALETTE, stacked_by_day

NOW = datetime(2026, 12, 3, 12, 0, 0)


def test_eta_from_the_pace_so_far():
    started = NOW - timedelta(seconds=100)
    assert eta_seconds(25, 100, started, NOW) == 300  # 25 in 100 s: 75 more in 300 s
    assert eta_seconds(0, 100, started, NOW) is None  # no pace yet
    assert eta_seconds(100, 100, started, NOW) is None  # done
    assert eta_seconds(5, 10, None, NOW) is None  # not started
    assert eta_seconds(5, 10, NOW + timedelta(seconds=1), NOW) is None  # clock skew


def test_duration_reads_like_a_person_says_it():
    assert [duration(s) for s in (None, 5, 125, 3 * 3600 + 7 * 60)] == [
        "", "5 s", "2 min", "3 h 07 min"]


def test_spend_chart_stacks_each_day_biggest_series_first():
    rows = [DaySpend("2026-12-01", "a", 300), DaySpend("2026-12-01", "b", 100),
            DaySpend("2026-12-03", "b", 500)]
    chart = stacked_by_day(rows, first=date(2026, 12, 1), last=date(2026, 12, 3))
    assert chart.legend == [("b", PALETTE[0]), ("a", PALETTE[1])]  # b spent 600, a 300
    assert [(bar.title, bar.colour) for bar in chart.bars] == [
        ("2026-12-01 b: $1.00", PALETTE[0]), ("2026-12-01 a: $3.00", PALETTE[1]),
        ("2026-12-03 b: $5.00", PALETTE[0])]
    day1_b, day1_a, day3_b = chart.bars
    assert day1_a.y + day1_a.height == pytest.approx(day1_b.y)  # stacked on top
    assert day1_b.height + day1_a.height == pytest.approx(day3_b.height * 4 / 5)  # to scale
    assert day3_b.x > day1_b.x and not chart.empty
    assert [t.label for t in chart.y_ticks] == ["$0.00", "$2.50", "$5.00"]


def test_spend_chart_empty_and_many_series():
    assert stacked_by_day([], first=date(2026, 11, 4), last=date(2026, 12, 3)).empty
    rows = [DaySpend("2026-12-03", f"team{i:02d}", 100 + i) for i in range(10)]
    chart = stacked_by_day(rows, first=date(2026, 12, 3), last=date(2026, 12, 3))
    assert [colour for _, colour in chart.legend][len(PALETTE):] == [OTHER] * 3


def test_only_loopback_binds_without_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "localhost", "example.com", ""):
        with pytest.raises(ServeRefused, match=TOKEN_ENV):
            check_bind(host, None)
        check_bind(host, "a-token-long-enough-1234")


def test_the_token_must_be_long_and_is_never_echoed():
    assert read_token({}) is None and read_token({TOKEN_ENV: ""}) is None
    good = "0123456789abcdef-xyz"
    assert read_token({TOKEN_ENV: good}) == good
    for bad in ("short", "0123456789abcdef\n"):
        with pytest.raises(ServeRefused, match=TOKEN_ENV) as refused:
            read_token({TOKEN_ENV: bad})
        assert bad.strip() not in str(refused.value)
    assert good not in session_value(good) and session_value(good) != session_value(good + "x")


def test_loopback_host_names_with_and_without_the_port():
    assert loopback_hosts(8080) >= {"127.0.0.1:8080", "localhost:8080", "[::1]:8080",
                                    "127.0.0.1"}
    assert "example.com:8080" not in loopback_hosts(8080)


def test_media_that_could_carry_script_are_downloads():
    for shown in ("image/png", "image/jpeg", "image/webp", "video/mp4", "audio/mpeg"):
        headers = media_headers(shown)
        assert headers["Content-Type"] == shown and "Content-Disposition" not in headers
    for risky in ("image/svg+xml", "text/html", "application/xhtml+xml", ""):
        headers = media_headers(risky)
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Content-Disposition"] == "attachment"
    assert "sandbox" in media_headers("image/png")["Content-Security-Policy"]
