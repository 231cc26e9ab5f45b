"""A stacked bar chart of spend per day, laid out server side as SVG shapes: no chart library,
no script, nothing fetched (the machines reach no CDN). The template draws the shapes; every
text in them is escaped there like any other."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from pipeline.gallery import DaySpend

# Colour-blind-safe (Okabe-Ito), then grey for whatever is beyond them.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442")
OTHER = "#999999"
WIDTH, HEIGHT = 720, 240
LEFT, BOTTOM, TOP = 64, 28, 12  # room for the axis labels


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str  # the tooltip: day, series, amount


@dataclass(frozen=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[str, str]]  # (series, colour)
    empty: bool


def dollars(cents: int) -> str:
    return f"${cents / 100:,.2f}"


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def stacked_by_day(rows: Iterable[DaySpend], *, first: date, last: date) -> Chart:
    """One bar per day from `first` to `last` (days with no spend stay empty), each stacked
    by series (team or model), the biggest series at the bottom and in the palette's first
    colours."""
    rows = list(rows)
    days = _days(first, last)
    totals: dict[str, int] = {}
    for row in rows:
        totals[row.key] = totals.get(row.key, 0) + row.spent_cents
    order = sorted(totals, key=lambda key: (-totals[key], key))
    colours = {key: PALETTE[i] if i < len(PALETTE) else OTHER for i, key in enumerate(order)}
    per_day: dict[str, dict[str, int]] = {}
    for row in rows:
        per_day.setdefault(row.day, {})[row.key] = row.spent_cents
    top = max((sum(v.values()) for v in per_day.values()), default=0)
    scale_top = _nice_ceiling(top)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(1, len(days))
    bars = []
    for i, day in enumerate(days):
        base = HEIGHT - BOTTOM
        for key in order:
            cents = per_day.get(day.isoformat(), {}).get(key, 0)
            if cents <= 0:
                continue
            height = plot_h * cents / scale_top
            base -= height
            bars.append(Bar(x=round(LEFT + i * slot + slot * 0.1, 2), y=round(base, 2),
                            width=round(slot * 0.8, 2), height=round(height, 2),
                            colour=colours[key],
                            title=f"{day.isoformat()} {key}: {dollars(cents)}"))
    every = max(1, len(days) // 6)
    x_ticks = [Tick(x=round(LEFT + i * slot + slot / 2, 2), y=HEIGHT - 8,
                    label=day.strftime("%m-%d")) for i, day in enumerate(days) if i % every == 0]
    y_ticks = [Tick(x=LEFT - 6, y=round(HEIGHT - BOTTOM - plot_h * f, 2),
                    label=dollars(round(scale_top * f))) for f in (0, 0.5, 1)]
    return Chart(WIDTH, HEIGHT, bars, x_ticks, y_ticks,
                 [(key, colours[key]) for key in order], empty=top == 0)


def _nice_ceiling(cents: int) -> int:
    """The axis top: 1, 2 or 5 times a power of ten, at least `cents` (and at least 1)."""
    if cents <= 1:
        return 1
    power = 1
    while True:
        for step in (1, 2, 5):
            if step * power >= cents:
                return step * power
        power *= 10
