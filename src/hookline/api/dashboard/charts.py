"""The overview's charts, drawn on the server as inline SVG: no script, no library, readable at any
width (the drawing scales to its box). Each bar has a ``<title>``, which browsers show on hover."""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Sequence

from markupsafe import Markup, escape

from hookline.store.base_insights import MinuteCounts

WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 600, 200, 52, 22, 10


@dataclasses.dataclass(frozen=True)
class Series:
    name: str
    css: str  # the class that colours it (dashboard.css)
    values: Sequence[float]


def by_minute(minutes: Sequence[MinuteCounts], start: int, count: int = 60) -> list[MinuteCounts]:
    """One entry per minute from ``start`` (epoch ms), empty minutes included."""
    found = {m.minute: m for m in minutes}
    first = start - start % 60_000
    return [
        found.get(first + i * 60_000, MinuteCounts(first + i * 60_000, 0, 0, 0, None, None))
        for i in range(count)
    ]


def _clock(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%H:%M")


def _frame(top: float, unit: str, first: int, last: int) -> str:
    plot_h = HEIGHT - BOTTOM - TOP
    right = WIDTH - 4
    lines = [
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{right}" y2="{TOP + plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{right}" y2="{TOP}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{escape(_number(top))}{unit}</text>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>',
        f'<text class="tick" x="{LEFT}" y="{HEIGHT - 4}">{_clock(first)} UTC</text>',
        f'<text class="tick" x="{right}" y="{HEIGHT - 4}" text-anchor="end">{_clock(last)}</text>',
    ]
    return "".join(lines)


def _ceiling(value: float) -> float:
    """The axis's top: ``value`` rounded up to 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power: float = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if value <= step * power)


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:g}" if value == int(value) else f"{value:.2f}"


def bars(title: str, minutes: Sequence[int], series: Sequence[Series], unit: str = "") -> Markup:
    """Stacked bars, one per minute (``minutes``: their starts, epoch ms)."""
    totals = [sum(s.values[i] for s in series) for i in range(len(minutes))]
    top = _ceiling(max([*totals, 1.0]))
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(minutes), 1)
    parts = [_frame(top, unit, minutes[0], minutes[-1] + 60_000)]
    for i, minute in enumerate(minutes):
        base: float = TOP + plot_h
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            h = plot_h * value / top
            base -= h
            label = f"{_clock(minute)}: {_number(value)}{unit} {s.name}"
            parts.append(
                f'<rect class="{s.css}" x="{LEFT + i * step + 0.5:.1f}" y="{base:.1f}" '
                f'width="{max(step - 1, 1):.1f}" height="{h:.1f}"><title>{escape(label)}</title></rect>'
            )
    return _svg(title, parts, series)


def lines(title: str, minutes: Sequence[int], series: Sequence[Series], unit: str = "") -> Markup:
    """A line per series (a gap where a minute has no value: NaN)."""
    known = [v for s in series for v in s.values if v == v]
    top = _ceiling(max(known, default=1.0))
    plot_w, plot_h = WIDTH - LEFT - 4, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(minutes), 1)
    parts = [_frame(top, unit, minutes[0], minutes[-1] + 60_000)]
    for s in series:
        points = []
        for i, value in enumerate(s.values):
            if value != value:  # NaN: no jobs that minute
                continue
            x, y = LEFT + (i + 0.5) * step, TOP + plot_h - plot_h * value / top
            points.append(f"{x:.1f},{y:.1f}")
            label = f"{_clock(minutes[i])}: {_number(value)}{unit} {s.name}"
            parts.append(
                f'<circle class="{s.css}" cx="{x:.1f}" cy="{y:.1f}" r="2.5"><title>{escape(label)}</title></circle>'
            )
        if len(points) > 1:
            parts.append(f'<polyline class="{s.css}" points="{" ".join(points)}"/>')
    return _svg(title, parts, series)


def _svg(title: str, parts: list[str], series: Sequence[Series]) -> Markup:
    legend = "".join(f'<span class="key {s.css}"></span>{escape(s.name)} ' for s in series)
    svg = (
        f'<figure class="chart"><figcaption>{escape(title)} <span class="legend">{legend}</span>'
        f'</figcaption><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}"'
        f">{''.join(parts)}</svg></figure>"
    )
    return Markup(svg)
