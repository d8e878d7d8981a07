"""Small server-side SVG charts: grouped bars and lines over time, no JavaScript.

The admin pages draw their charts here so that no page loads anything from the
internet (no charting library, no CDN) and every chart works with scripts off.

Safety: every piece of text that reaches the markup (title, axis label, group
and series names, tooltips) goes through ``django.utils.html.escape``, which
escapes ``& < > " '`` and so is safe in XML text and in quoted attributes. The
result is marked safe for templates only because of that.

Accessibility: the ``<svg>`` has ``role="img"`` and an ``aria-label`` (the
title); a ``<title>`` and a ``<desc>`` summarise it for assistive technology,
and each bar and point carries its own ``<title>`` (a tooltip with its value).
Text and axes use ``currentColor``, so the charts follow the admin's light and
dark themes; series colours come from the Okabe-Ito palette, which stays
distinguishable with the common forms of colour blindness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import TypeGuard

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

__all__ = ["NO_DATA", "bar_chart", "line_chart", "nice_ticks"]

NO_DATA = "No data"
MIXED_X = "line_chart: series {name!r} mixes x values of different kinds ({first} and {other})"
BAD_X = "line_chart: series {name!r} has an x value of type {kind}, not a datetime, date or number"
SERIES_LENGTH = "bar_chart: series {name!r} has {values} values for {groups} groups"
TOO_SMALL = "chart size {width}x{height} is too small (at least {min_width}x{min_height})"

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
FONT_SIZE = 12
# Average glyph advance of a sans-serif font at FONT_SIZE, for layout estimates.
CHAR_WIDTH = 0.6 * FONT_SIZE
MIN_WIDTH, MIN_HEIGHT = 200, 120
TARGET_TICKS = 5
# Above this many points, a series is drawn as a line only (no marker per point).
MAX_MARKERS = 200

_NAIVE_EPOCH = datetime(1970, 1, 1)
_DAY = 86_400.0
# Candidate steps for time axes, in seconds.
_TIME_STEPS = (
    1, 2, 5, 10, 15, 30,
    60, 120, 300, 600, 900, 1800,
    3600, 7200, 10_800, 21_600, 43_200,
    _DAY, 2 * _DAY, 7 * _DAY, 14 * _DAY, 28 * _DAY, 91 * _DAY, 182 * _DAY, 364 * _DAY,
)  # fmt: skip


# Numbers and ticks ----------------------------------------------------------


def _usable(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _nice_step(raw: float) -> float:
    """The 1, 2 or 5 times a power of ten nearest above ``raw``."""
    exponent = math.floor(math.log10(raw))
    fraction = raw / 10**exponent
    nice = 1 if fraction <= 1 else 2 if fraction <= 2 else 5 if fraction <= 5 else 10
    return nice * 10**exponent


def _decimals(step: float) -> int:
    return max(0, -math.floor(math.log10(step) + 1e-9))


def nice_ticks(low: float, high: float, target: int = TARGET_TICKS) -> list[float]:
    """Round tick values covering ``[low, high]``: about ``target`` steps of 1, 2 or 5 x 10^n.

    The first tick is at or below ``low`` and the last at or above ``high``, so
    the ticks also give the axis its range.
    """
    if low > high:
        low, high = high, low
    if low == high:
        pad = abs(low) / 2 or 1.0
        low, high = low - pad, high + pad
    step = _nice_step((high - low) / target)
    decimals = _decimals(step)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, decimals) + 0.0 for i in range(first, last + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten covering ``[low, high]`` (both > 0); 1-2-5 within one or two decades."""
    first = math.floor(math.log10(low) + 1e-9)
    last = math.ceil(math.log10(high) - 1e-9)
    if last == first:
        last += 1
    decades = last - first
    if decades <= 2:
        ticks = [m * 10.0**e for e in range(first, last) for m in (1, 2, 5)]
        return [*ticks, 10.0**last]
    stride = math.ceil(decades / 8)
    return [10.0 ** (first + i) for i in range(0, decades + stride, stride)][
        : decades // stride + 1
    ]


def format_number(value: float, decimals: int | None = None) -> str:
    """A short label: ``12,500`` as ``12.5k``, ``3000000`` as ``3M``; commas below ten thousand."""
    magnitude = abs(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if magnitude >= size:
            divisor = 1e3 if suffix == "k" else size
            return f"{value / divisor:.3g}{suffix}"
    if decimals is None:
        if magnitude >= 100 or value == int(value):
            decimals = 0
        elif magnitude >= 1:
            decimals = 2
        else:
            return f"{value:.3g}"
    return f"{value:,.{decimals}f}"


# Markup helpers --------------------------------------------------------------


def _text_width(text: str) -> float:
    return len(text) * CHAR_WIDTH


def _truncate(text: str, width: float) -> str:
    """``text`` cut with an ellipsis to fit about ``width`` pixels."""
    fits = max(1, int(width // CHAR_WIDTH))
    return text if len(text) <= fits else text[: max(1, fits - 1)] + "\u2026"


def _num(value: float) -> str:
    """A coordinate: two decimals at most, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, text: str, *, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


@dataclass
class _Frame:
    """The plot area inside the margins, and the SVG around it."""

    width: int
    height: int
    left: float
    top: float
    right: float
    bottom: float

    @property
    def plot_width(self) -> float:
        return self.right - self.left

    @property
    def plot_height(self) -> float:
        return self.bottom - self.top


def _check_size(width: int, height: int) -> None:
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(
            TOO_SMALL.format(width=width, height=height, min_width=MIN_WIDTH, min_height=MIN_HEIGHT)
        )


def _svg(width: int, height: int, title: str, desc: str, body: Iterable[str]) -> SafeString:
    label = escape(title)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'aria-label="{label}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" '
        f'font-size="{FONT_SIZE}" fill="currentColor">',
        f"<title>{label}</title>",
        f"<desc>{escape(desc)}</desc>",
        _text(width / 2, 18, title, anchor="middle", extra=' font-weight="bold" font-size="14"'),
        *body,
        "</svg>",
    ]
    return mark_safe("\n".join(parts))  # every text above is escaped


def _no_data(width: int, height: int, title: str) -> SafeString:
    body = [
        f'<rect x="1" y="28" width="{width - 2}" height="{height - 30}" fill="none" '
        f'stroke="currentColor" stroke-opacity="0.25" stroke-dasharray="4 4"/>',
        _text(width / 2, height / 2 + 14, NO_DATA, anchor="middle", extra=' class="no-data"'),
    ]
    return _svg(width, height, title, f"{title}: {NO_DATA.lower()}.", body)


def _legend(names: Sequence[str], width: int, top: float) -> tuple[list[str], float]:
    """Legend swatches in rows under the title; returns the markup and the height used."""
    parts = ['<g class="legend">']
    x, y, row_height = 8.0, top, 18
    for index, name in enumerate(names):
        label = _truncate(name, width / 2)
        item_width = 18 + _text_width(label) + 16
        if x + item_width > width - 8 and x > 8:
            x, y = 8.0, y + row_height
        color = PALETTE[index % len(PALETTE)]
        parts.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="12" height="12" fill="{color}"/>')
        parts.append(_text(x + 18, y + 10, label))
        x += item_width
    parts.append("</g>")
    return parts, y + row_height - top


def _y_axis(
    frame: _Frame,
    ticks: list[float],
    scale: Callable[[float], float],
    labels: list[str],
    y_label: str,
) -> list[str]:
    parts = ['<g class="y-axis">']
    for tick, label in zip(ticks, labels, strict=True):
        y = scale(tick)
        parts.append(
            f'<line x1="{_num(frame.left)}" x2="{_num(frame.right)}" y1="{_num(y)}" '
            f'y2="{_num(y)}" stroke="currentColor" stroke-opacity="0.15"/>'
        )
        parts.append(_text(frame.left - 6, y + 4, label, anchor="end"))
    mid = frame.top + frame.plot_height / 2
    parts.append(
        _text(
            14,
            mid,
            _truncate(y_label, frame.plot_height),
            anchor="middle",
            extra=f' transform="rotate(-90 14 {_num(mid)})"',
        )
    )
    parts.append(
        f'<line x1="{_num(frame.left)}" x2="{_num(frame.left)}" y1="{_num(frame.top)}" '
        f'y2="{_num(frame.bottom)}" stroke="currentColor" stroke-opacity="0.6"/>'
    )
    parts.append("</g>")
    return parts


def _axis_label(label: str, log_scale: bool) -> str:
    return f"{label} (log scale)" if log_scale else label


def _frame(
    width: int, height: int, names: Sequence[str], tick_labels: list[str]
) -> tuple[_Frame, list[str]]:
    legend, legend_height = _legend(names, width, 30)
    left = 28 + max(_text_width(label) for label in tick_labels) + 8
    frame = _Frame(
        width=width,
        height=height,
        left=left,
        top=30 + legend_height + 10,
        right=width - 16,
        bottom=height - 28,
    )
    return frame, legend


def _value_ticks(values: list[float], log_scale: bool) -> tuple[list[float], list[str]]:
    """Ticks of the value axis (zero always included on a linear one) and their labels."""
    if log_scale:
        ticks = _log_ticks(min(values), max(values))
        return ticks, [format_number(t) for t in ticks]
    ticks = nice_ticks(min(0.0, *values), max(0.0, *values))
    decimals = _decimals(ticks[1] - ticks[0])
    return ticks, [format_number(t, decimals) for t in ticks]


def _value_scale(ticks: list[float], frame: _Frame, log_scale: bool) -> Callable[[float], float]:
    """The function from a value to its y coordinate in ``frame``."""
    transform = math.log10 if log_scale else float
    low, high = transform(ticks[0]), transform(ticks[-1])

    def scale(value: float) -> float:
        return frame.bottom - (transform(value) - low) / (high - low) * frame.plot_height

    return scale


# Bar chart ---------------------------------------------------------------------


def bar_chart(
    groups: list[str],
    series: dict[str, list[float | None]],
    *,
    title: str,
    y_label: str,
    log_scale: bool = False,
    width: int = 720,
    height: int = 320,
) -> SafeString:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each.

    ``series`` maps a series name to one value per group; ``None`` (or NaN) is
    a missing bar and leaves a gap. With ``log_scale`` the value axis is
    logarithmic (for figures that differ by orders of magnitude, such as naive
    against optimized query counts); values at or below zero cannot be drawn
    on it and are left out like missing ones.

    Returns:
        SVG markup, marked safe (every label in it is escaped).
    """
    _check_size(width, height)
    names = list(series)
    for name in names:
        if len(series[name]) != len(groups):
            raise ValueError(
                SERIES_LENGTH.format(name=name, values=len(series[name]), groups=len(groups))
            )

    def drawable(value: float | None) -> TypeGuard[float]:
        return _usable(value) and (not log_scale or value > 0)

    values = [v for name in names for v in series[name] if drawable(v)]
    if not groups or not values:
        return _no_data(width, height, title)

    ticks, tick_labels = _value_ticks(values, log_scale)
    frame, legend = _frame(width, height, names, tick_labels)
    scale = _value_scale(ticks, frame, log_scale)
    baseline = frame.bottom if log_scale else scale(0.0)

    body = [*legend, *_y_axis(frame, ticks, scale, tick_labels, _axis_label(y_label, log_scale))]
    group_width = frame.plot_width / len(groups)
    bar_width = group_width * 0.8 / max(1, len(names))
    body.append('<g class="bars">')
    for g, group in enumerate(groups):
        group_left = frame.left + g * group_width + group_width * 0.1
        for s, name in enumerate(names):
            value = series[name][g]
            if not drawable(value):
                continue
            y = scale(value)
            top, bar_height = min(y, baseline), abs(baseline - y)
            body.append(
                f'<rect x="{_num(group_left + s * bar_width)}" y="{_num(top)}" '
                f'width="{_num(max(bar_width - 1, 1))}" height="{_num(max(bar_height, 0.5))}" '
                f'fill="{PALETTE[s % len(PALETTE)]}">'
                f"<title>{escape(f'{group} - {name}: {format_number(value)}')}</title></rect>"
            )
    body.append("</g>")
    body.append('<g class="x-axis">')
    body.append(
        f'<line x1="{_num(frame.left)}" x2="{_num(frame.right)}" y1="{_num(baseline)}" '
        f'y2="{_num(baseline)}" stroke="currentColor" stroke-opacity="0.6"/>'
    )
    for g, group in enumerate(groups):
        centre = frame.left + (g + 0.5) * group_width
        label = _truncate(group, group_width - 4)
        body.append(
            f'<text x="{_num(centre)}" y="{_num(frame.bottom + 18)}" text-anchor="middle">'
            f"<title>{escape(group)}</title>{escape(label)}</text>"
        )
    body.append("</g>")
    scale_name = "logarithmic" if log_scale else "linear"
    desc = (
        f"Bar chart, {len(groups)} groups ({', '.join(groups)}), "
        f"series {', '.join(names)}; {y_label} on a {scale_name} axis."
    )
    return _svg(width, height, title, desc, body)


# Line chart --------------------------------------------------------------------


def _x_kind(value: object) -> str:
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, date):
        return "date"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


def _time_ticks(low: float, high: float, dates_only: bool) -> list[float]:
    """Wall-clock seconds of round instants (minutes, hours, days...) covering the range."""
    span = high - low
    steps = [s for s in _TIME_STEPS if not dates_only or s >= _DAY]
    step = next((s for s in steps if span / s <= TARGET_TICKS + 1), None)
    if step is None:  # Longer than the steps go: whole multiples of years.
        step = _nice_step(span / TARGET_TICKS / (364 * _DAY)) * 364 * _DAY
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def _time_label(seconds: float, step: float, dates_only: bool) -> str:
    moment = _NAIVE_EPOCH + timedelta(seconds=seconds)
    if dates_only or step >= _DAY:
        return moment.strftime("%Y-%m-%d")
    if step >= 60:
        return moment.strftime("%m-%d %H:%M")
    return moment.strftime("%H:%M:%S")


def line_chart(
    series: Mapping[str, Sequence[tuple[datetime | date | float, float | None]]],
    *,
    title: str,
    y_label: str,
    log_scale: bool = False,
    width: int = 720,
    height: int = 320,
) -> SafeString:
    """One line per series over a time or number axis, with a point per value.

    The x values of a chart are all datetimes, all dates or all numbers.
    Aware datetimes are drawn in the time zone of the first one (convert them
    with ``django.utils.timezone.localtime`` first to show local time); ticks
    fall on round minutes, hours or days. Points are sorted by x; a ``None``
    (or NaN) y breaks the line. With ``log_scale`` the value axis is
    logarithmic (naive and optimized throughput on one chart), and values at
    or below zero are left out. A series of more than ``MAX_MARKERS`` points
    is drawn as a line without a marker (and tooltip) per point, to keep the
    markup small.

    Returns:
        SVG markup, marked safe (every label in it is escaped).

    Raises:
        TypeError: x values of different kinds, or of an unsupported type.
    """
    _check_size(width, height)
    names = list(series)
    kind: str | None = None
    zone = None
    points: dict[str, list[tuple[float, float | None, datetime | date | float]]] = {}
    for name in names:
        converted = []
        for x, y in series[name]:
            x_kind = _x_kind(x)
            if x_kind not in {"datetime", "date", "number"}:
                raise TypeError(BAD_X.format(name=name, kind=x_kind))
            if kind is None:
                kind = x_kind
                zone = x.tzinfo if isinstance(x, datetime) else None
            elif x_kind != kind:
                raise TypeError(MIXED_X.format(name=name, first=kind, other=x_kind))
            # x is of the chart's one kind (checked above).
            if isinstance(x, datetime):
                wall = (x.astimezone(zone) if zone and x.tzinfo else x).replace(tzinfo=None)
                position = (wall - _NAIVE_EPOCH).total_seconds()
            elif isinstance(x, date):
                position = (datetime.combine(x, time()) - _NAIVE_EPOCH).total_seconds()
            else:
                position = float(x)
            drawable = _usable(y) and (not log_scale or y > 0)
            converted.append((position, y if drawable else None, x))
        points[name] = sorted(converted, key=lambda point: point[0])

    values = [y for name in names for _, y, _ in points[name] if y is not None]
    xs = [x for name in names for x, y, _ in points[name] if y is not None]
    if not values:
        return _no_data(width, height, title)

    x_low, x_high = min(xs), max(xs)
    if kind == "number":
        x_ticks = nice_ticks(x_low, x_high)
        x_decimals = _decimals(x_ticks[1] - x_ticks[0])
        x_labels = [format_number(t, x_decimals) for t in x_ticks]
    else:
        dates_only = kind == "date"
        if x_low == x_high:
            pad = _DAY if dates_only else 3600.0
            x_low, x_high = x_low - pad, x_high + pad
        x_ticks = _time_ticks(x_low, x_high, dates_only)
        step = x_ticks[1] - x_ticks[0]
        x_labels = [_time_label(t, step, dates_only) for t in x_ticks]

    ticks, tick_labels = _value_ticks(values, log_scale)
    frame, legend = _frame(width, height, names, tick_labels)
    frame.right -= _text_width(x_labels[-1]) / 2
    scale = _value_scale(ticks, frame, log_scale)
    x_first, x_last = x_ticks[0], x_ticks[-1]

    def x_scale(position: float) -> float:
        return frame.left + (position - x_first) / (x_last - x_first) * frame.plot_width

    body = [*legend, *_y_axis(frame, ticks, scale, tick_labels, _axis_label(y_label, log_scale))]
    body.append('<g class="x-axis">')
    body.append(
        f'<line x1="{_num(frame.left)}" x2="{_num(frame.right)}" y1="{_num(frame.bottom)}" '
        f'y2="{_num(frame.bottom)}" stroke="currentColor" stroke-opacity="0.6"/>'
    )
    # Thin the labels out when they would overlap; every tick keeps its mark.
    label_width = max(_text_width(label) for label in x_labels) + 12
    every = max(1, math.ceil(label_width / (frame.plot_width / max(1, len(x_ticks) - 1))))
    for index, (tick, label) in enumerate(zip(x_ticks, x_labels, strict=True)):
        x = x_scale(tick)
        body.append(
            f'<line x1="{_num(x)}" x2="{_num(x)}" y1="{_num(frame.bottom)}" '
            f'y2="{_num(frame.bottom + 4)}" stroke="currentColor" stroke-opacity="0.6"/>'
        )
        if index % every == 0:
            body.append(_text(x, frame.bottom + 18, label, anchor="middle"))
    body.append("</g>")

    for s, name in enumerate(names):
        color = PALETTE[s % len(PALETTE)]
        body.append(f'<g class="series" stroke="{color}" fill="{color}">')
        segments: list[list[tuple[float, float, datetime | date | float]]] = [[]]
        for x, y, original in points[name]:
            if y is None:
                segments.append([])
            else:
                segments[-1].append((x, y, original))
        markers = len(points[name]) <= MAX_MARKERS
        for segment in segments:
            if len(segment) > 1:
                line = " ".join(f"{_num(x_scale(x))},{_num(scale(y))}" for x, y, _ in segment)
                body.append(f'<polyline points="{line}" fill="none" stroke-width="2"/>')
            # A point alone between gaps has no line: it keeps its marker.
            if not (markers or len(segment) == 1):
                continue
            for x, y, original in segment:
                shown = (
                    original.isoformat(sep=" ", timespec="seconds")
                    if isinstance(original, datetime)
                    else (original.isoformat() if isinstance(original, date) else format_number(x))
                )
                body.append(
                    f'<circle cx="{_num(x_scale(x))}" cy="{_num(scale(y))}" r="3" stroke="none">'
                    f"<title>{escape(f'{name}, {shown}: {format_number(y)}')}</title></circle>"
                )
        body.append("</g>")
    scale_name = "logarithmic" if log_scale else "linear"
    plural = "" if len(values) == 1 else "s"
    desc = (
        f"Line chart of {y_label} ({scale_name} axis) over {kind}s, series {', '.join(names)}; "
        f"{len(values)} point{plural} from {x_labels[0]} to {x_labels[-1]}."
    )
    return _svg(width, height, title, desc, body)
