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
# Mail that did not reach its recipients as sent: a few a day beside a thousand accepted,
# so they get a chart (and, on a phone, numbers) of their own.
HELD_OR_REFUSED = ("quarantine", "reject", "tempfail", "discard")


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
    notes: tuple[tuple[str, str, int], ...] = ()  # (css class, action, count): held or refused


@dataclass(frozen=True)
class ColumnChart:
    """Stacked columns, one per day, over a y axis whose labels sit in a left gutter."""

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
    values: tuple[Label, ...] = ()  # each column's total above it, where there is room
    held: ColumnChart | None = None  # the held and refused mail on a scale of its own


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    percent: float
    cls: str


def nice_scale(peak: int, most: int = 6) -> tuple[int, int]:
    """(step, top) of a y axis for counts up to `peak`: the step a whole 1, 2, 2.5 or 5 times
    a power of ten, at most `most` steps, and the top tick the lowest such one at or above
    the peak (1060 gives 200 and 1200, not 2000). Ties go to about five steps."""
    if peak <= 0:
        return 1, 1
    best: tuple[int, int, int] | None = None  # (top, distance from 5 steps, step)
    power = 1
    while power <= peak * 10:
        for factor in (1.0, 2.0, 2.5, 5.0):
            step = factor * power
            if step != int(step):
                continue  # counts are whole: no 2.5 step
            n = math.ceil(peak / step)
            if n <= most:
                candidate = (int(n * step), abs(n - 5), int(step))
                best = candidate if best is None else min(best, candidate)
        power *= 10
    assert best is not None
    return best[2], best[0]


def axis_label(value: int) -> str:
    return f"{value / 1000:g}k" if value >= 10_000 else str(value)


def days_between(since: dt.date, until: dt.date) -> list[dt.date]:
    return [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]


# The SVG is 960 units wide, drawn at the card's width; axis text is 14 to 22 units (console.css).
WIDTH = 960
PLOT_RIGHT = 952.0
_DIGIT = 13.0  # the width of a digit at the largest axis text size, with a little to spare
_HALF_DATE = 40.0  # half a "25 Nov" at the largest axis text size


def _gutter(*tops: int) -> float:
    """The left margin that holds the longest y label right-aligned: bars never reach it."""
    longest = max(len(axis_label(t)) for t in tops)
    return 14.0 + _DIGIT * longest


def _columns(
    days: list[dt.date],
    table: dict[dt.date, dict[str, int]],
    actions: list[str],
    scale: tuple[int, int],
    left: float,
    top: float,
    bottom: float,
    *,
    values: bool = False,
) -> tuple[tuple[Rect, ...], tuple[Label, ...], tuple[Gridline, ...], tuple[Label, ...]]:
    step, ceiling = scale
    slot = (PLOT_RIGHT - left) / max(len(days), 1)
    bar_w = max(slot * 0.7, 2.0)
    rects: list[Rect] = []
    labels: list[Label] = []
    shown: list[Label] = []
    every = max(1, math.ceil(len(days) / 7))
    digits = len(str(max((sum(table[d].get(a, 0) for a in actions) for d in days), default=0)))
    room = slot >= 14 * digits + 6  # a column's number fits over it without touching the next
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
        if values and room:
            total = sum(table[day].get(a, 0) for a in actions)
            shown.append(Label(round(left + i * slot + slot / 2, 1), round(y - 7, 1), str(total)))
        # Counted back from today, so the latest day always has its label.
        if (len(days) - 1 - i) % every == 0:
            centre = left + i * slot + slot / 2
            if centre + _HALF_DATE > WIDTH:  # narrow columns: the last date ends at the edge
                labels.append(Label(WIDTH - 2, bottom + 28, f"{day:%d %b}", "end"))
            else:
                labels.append(Label(round(centre, 1), bottom + 28, f"{day:%d %b}"))
    grid = tuple(
        Gridline(round(bottom - (bottom - top) * v / ceiling, 1), axis_label(v))
        for v in range(0, ceiling + 1, step)
    )
    return tuple(rects), tuple(labels), grid, tuple(shown)


def per_day_by_action(
    counts: list[tuple[dt.date, str, str, int]], since: dt.date, until: dt.date
) -> ColumnChart:
    """Messages per day, stacked by the action taken (category "" rows are the message counts),
    with the held and refused mail again on a scale of its own (ColumnChart.held)."""
    days = days_between(since, until)
    table: dict[dt.date, dict[str, int]] = {d: defaultdict(int) for d in days}
    seen: set[str] = set()
    for day, action, category, n in counts:
        if category == "" and day in table:
            table[day][action] += n
            seen.add(action)
    actions = [a for a in ACTIONS if a in seen] + sorted(seen - set(ACTIONS))
    held_actions = [a for a in HELD_OR_REFUSED if a in seen]
    peak = max((sum(table[d].values()) for d in days), default=0)
    held_peak = max((sum(table[d].get(a, 0) for a in held_actions) for d in days), default=0)
    scale = nice_scale(peak)
    held_scale = nice_scale(held_peak, most=4)
    # One gutter for both charts, so their columns stand one above the other.
    left = _gutter(scale[1], held_scale[1])

    # Plot from y=16 to y=250; the dates under it; the SVG ends just below them.
    height = 288
    rects, labels, grid, _ = _columns(days, table, actions, scale, left, 16.0, 250.0)
    held = None
    if held_peak:
        held_height = 188  # room over the plot (y=30 to 150) for the numbers on the columns
        h_rects, h_labels, h_grid, h_values = _columns(
            days, table, held_actions, held_scale, left, 30.0, 150.0, values=True
        )
        held = ColumnChart(
            WIDTH,
            held_height,
            left,
            PLOT_RIGHT,
            h_rects,
            h_labels,
            h_grid,
            tuple((f"a-{a}", a) for a in held_actions),
            (),
            (),
            sum(table[d].get(a, 0) for d in days for a in held_actions),
            values=h_values,
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
        notes = tuple((f"a-{a}", a, table[day].get(a, 0)) for a in held_actions)
        day_bars.append(DayBar(f"{day:%a %d %b}", sum(table[day].values()), tuple(segments), notes))
    return ColumnChart(
        WIDTH,
        height,
        left,
        PLOT_RIGHT,
        rects,
        labels,
        grid,
        tuple((f"a-{a}", a) for a in actions),
        ("Day", *actions, "Total"),
        rows,
        sum(sum(v.values()) for v in table.values()),
        tuple(day_bars),
        held=held,
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
