"""Bar charts as geometry for inline SVG, drawn by the templates: no script, no remote loads.

Colours come from CSS classes (console.css), so the charts follow the page's theme and
the Content-Security-Policy (no inline style) holds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass

ACTIONS = ("accept", "tag", "fix", "quarantine", "reject", "tempfail", "discard")


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "middle"


@dataclass(frozen=True)
class Gridline:
    y: float
    label: str


@dataclass(frozen=True)
class DayBar:
    """One day as a horizontal stacked bar: the chart's form on a phone."""

    label: str
    total: int
    segments: tuple[Rect, ...]  # x and w in percent of the busiest day


@dataclass(frozen=True)
class ColumnChart:
    """Stacked columns, one per day."""

    width: int
    height: int
    plot_left: float
    plot_right: float
    rects: tuple[Rect, ...]
    labels: tuple[Label, ...]
    grid: tuple[Gridline, ...]
    legend: tuple[tuple[str, str], ...]  # (css class, name)
    table_head: tuple[str, ...]
    table_rows: tuple[tuple[str, ...], ...]
    total: int
    day_bars: tuple[DayBar, ...] = ()


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    percent: float
    cls: str


def nice_ceiling(value: int) -> int:
    """The next 1, 2 or 5 times a power of ten: readable axis labels."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return int(step * power)
    return int(10 * power)


def days_between(since: dt.date, until: dt.date) -> list[dt.date]:
    return [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]


def per_day_by_action(
    counts: list[tuple[dt.date, str, str, int]], since: dt.date, until: dt.date
) -> ColumnChart:
    """Messages per day, stacked by the action taken (category "" rows are the message counts)."""
    days = days_between(since, until)
    table: dict[dt.date, dict[str, int]] = {d: defaultdict(int) for d in days}
    seen: set[str] = set()
    for day, action, category, n in counts:
        if category == "" and day in table:
            table[day][action] += n
            seen.add(action)
    actions = [a for a in ACTIONS if a in seen] + sorted(seen - set(ACTIONS))
    # Wide and flat; the axis text size is set by CSS per screen width (console.css).
    width, height = 960, 310
    left, right, top, bottom = 8.0, 952.0, 40.0, 262.0
    peak = max((sum(table[d].values()) for d in days), default=0)
    ceiling = nice_ceiling(peak)
    slot = (right - left) / max(len(days), 1)
    bar_w = max(slot * 0.7, 2.0)
    rects: list[Rect] = []
    labels: list[Label] = []
    every = max(1, math.ceil(len(days) / 7))
    for i, day in enumerate(days):
        x = left + i * slot + (slot - bar_w) / 2
        y = bottom
        for action in actions:
            n = table[day].get(action, 0)
            if not n:
                continue
            h = (bottom - top) * n / ceiling
            y -= h
            rects.append(
                Rect(
                    round(x, 1),
                    round(y, 1),
                    round(bar_w, 1),
                    round(h, 1),
                    f"a-{action}",
                    f"{day:%a %d %b}: {n} {action}",
                )
            )
        # Counted back from today, so the latest day always has its label.
        if (len(days) - 1 - i) % every == 0:
            labels.append(Label(round(left + i * slot + slot / 2, 1), bottom + 34, f"{day:%d %b}"))
    grid = tuple(
        Gridline(round(bottom - (bottom - top) * f, 1), str(int(ceiling * f))) for f in (0.0, 0.5, 1.0)
    )
    rows = tuple(
        (f"{d:%Y-%m-%d}", *(str(table[d].get(a, 0)) for a in actions), str(sum(table[d].values())))
        for d in days
    )
    day_bars = []
    for day in reversed(days):
        x = 0.0
        segments = []
        for action in actions:
            n = table[day].get(action, 0)
            if n:
                w = 100.0 * n / max(peak, 1)
                segments.append(Rect(round(x, 2), 0, round(w, 2), 10, f"a-{action}", f"{n} {action}"))
                x += w
        day_bars.append(DayBar(f"{day:%a %d %b}", sum(table[day].values()), tuple(segments)))
    return ColumnChart(
        width,
        height,
        left,
        right,
        tuple(rects),
        tuple(labels),
        grid,
        tuple((f"a-{a}", a) for a in actions),
        ("Day", *actions, "Total"),
        rows,
        sum(sum(v.values()) for v in table.values()),
        tuple(day_bars),
    )


def bars(items: list[tuple[str, int]], cls: str = "bar") -> list[Bar]:
    peak = max((n for _, n in items), default=0)
    return [Bar(label, n, round(100.0 * n / peak, 1) if peak else 0.0, cls) for label, n in items]


def by_category(counts: list[tuple[dt.date, str, str, int]], limit: int = 12) -> list[Bar]:
    """Findings per detector/category over the period, most frequent first."""
    totals: dict[str, int] = defaultdict(int)
    for _, _, category, n in counts:
        if category:
            totals[category] += n
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return [Bar(b.label, b.value, b.percent, f"c-{b.label.split('/', 1)[0]}") for b in bars(ranked)]
