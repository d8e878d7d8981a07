"""Small server-side SVG charts (grouped bars, lines over time): no JavaScript, no CDN.

Every text in the markup goes through ``escape``: that alone is why the result is
marked safe. Text and axes use ``currentColor`` (the admin's light and dark themes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from itertools import groupby
from typing import TypeGuard, cast

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

NO_DATA = "No data"
MIXED_X = "line_chart: series {name!r} mixes x values of different kinds ({first} and {other})"
BAD_X = "line_chart: series {name!r} has an x value of type {kind}, not a datetime, date or number"
SERIES_LENGTH = "bar_chart: series {!r} has {} values for {} groups"
TOO_SMALL = "chart size {}x{} is too small (at least {}x{})"

# Okabe-Ito: distinguishable with the common forms of colour blindness.
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
    """Round ticks from ``low`` or below to ``high`` or above: ~``target`` steps of 1, 2, 5x10^n."""
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
    return [10.0 ** (first + i) for i in range(0, decades + 1, math.ceil(decades / 8))]


def format_number(value: float, decimals: int | None = None) -> str:
    """A short label: ``12,500`` as ``12.5k``, ``3000000`` as ``3M``; commas below ten thousand."""
    magnitude = abs(value)
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if magnitude >= size:
            divisor = 1e3 if suffix == "k" else size
            return f"{value / divisor:.3g}{suffix}"
    if decimals is None and magnitude < 1 and value != int(value):
        return f"{value:.3g}"
    if decimals is None:
        decimals = 0 if magnitude >= 100 or value == int(value) else 2
    return f"{value:,.{decimals}f}"


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


def _line(x1: float, x2: float, y1: float, y2: float, opacity: str = "0.6") -> str:
    return (
        f'<line x1="{_num(x1)}" x2="{_num(x2)}" y1="{_num(y1)}" y2="{_num(y2)}" '
        f'stroke="currentColor" stroke-opacity="{opacity}"/>'
    )


def _check_size(width: int, height: int) -> None:
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(TOO_SMALL.format(width, height, MIN_WIDTH, MIN_HEIGHT))


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


def _plot(
    size: tuple[int, int],
    names: Sequence[str],
    values: list[float],
    y_label: str,
    log_scale: bool,
    right_pad: float = 0,
) -> tuple[tuple[float, float, float], Callable[[float], float], list[str]]:
    """The plot area's left, right and bottom, the value to y function, and the legend and
    value axis markup.

    A linear value axis always includes zero.
    """
    if log_scale:
        ticks = _log_ticks(min(values), max(values))
        labels = [format_number(t) for t in ticks]
    else:
        ticks = nice_ticks(min(0.0, *values), max(0.0, *values))
        labels = [format_number(t, _decimals(ticks[1] - ticks[0])) for t in ticks]
    width, height = size
    parts, legend_height = _legend(names, width, 30)
    left = 28 + max(_text_width(label) for label in labels) + 8
    top, right, bottom = 30 + legend_height + 10, width - 16 - right_pad, height - 28
    transform = math.log10 if log_scale else float
    low, high = transform(ticks[0]), transform(ticks[-1])

    def scale(value: float) -> float:
        return bottom - (transform(value) - low) / (high - low) * (bottom - top)

    parts.append('<g class="y-axis">')
    for tick, label in zip(ticks, labels, strict=True):
        y = scale(tick)
        parts.append(_line(left, right, y, y, "0.15"))
        parts.append(_text(left - 6, y + 4, label, anchor="end"))
    mid = top + (bottom - top) / 2
    label = _truncate(f"{y_label} (log scale)" if log_scale else y_label, bottom - top)
    rotate = f' transform="rotate(-90 14 {_num(mid)})"'
    parts.append(_text(14, mid, label, anchor="middle", extra=rotate))
    parts += [_line(left, left, top, bottom), "</g>"]
    return (left, right, bottom), scale, parts


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

    ``series`` maps a name to one value per group; ``None`` (or NaN) leaves a
    gap, as does a value at or below zero on a ``log_scale`` axis.
    """
    _check_size(width, height)
    names = list(series)
    for name in names:
        if len(series[name]) != len(groups):
            raise ValueError(SERIES_LENGTH.format(name, len(series[name]), len(groups)))

    def drawable(value: float | None) -> TypeGuard[float]:
        return _usable(value) and (not log_scale or value > 0)

    values = [v for name in names for v in series[name] if drawable(v)]
    if not groups or not values:
        return _no_data(width, height, title)

    (left, right, bottom), scale, body = _plot((width, height), names, values, y_label, log_scale)
    baseline = bottom if log_scale else scale(0.0)
    group_width = (right - left) / len(groups)
    bar_width = group_width * 0.8 / max(1, len(names))
    body.append('<g class="bars">')
    for g, group in enumerate(groups):
        group_left = left + g * group_width + group_width * 0.1
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
    body += ['<g class="x-axis">', _line(left, right, baseline, baseline)]
    for g, group in enumerate(groups):
        centre = left + (g + 0.5) * group_width
        label = _truncate(group, group_width - 4)
        body.append(
            f'<text x="{_num(centre)}" y="{_num(bottom + 18)}" text-anchor="middle">'
            f"<title>{escape(group)}</title>{escape(label)}</text>"
        )
    body.append("</g>")
    scale_name = "logarithmic" if log_scale else "linear"
    desc = (
        f"Bar chart, {len(groups)} groups ({', '.join(groups)}), "
        f"series {', '.join(names)}; {y_label} on a {scale_name} axis."
    )
    return _svg(width, height, title, desc, body)


def _x_kind(value: object) -> str:
    for kind, types in (("datetime", datetime), ("date", date), ("number", int | float)):
        if isinstance(value, types) and not isinstance(value, bool):
            return kind
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
    days = dates_only or step >= _DAY
    pattern = "%Y-%m-%d" if days else "%m-%d %H:%M" if step >= 60 else "%H:%M:%S"
    return (_NAIVE_EPOCH + timedelta(seconds=seconds)).strftime(pattern)


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

    The x values are all datetimes (drawn in the first one's time zone), all
    dates or all numbers, else TypeError. A ``None`` (or NaN) y breaks the
    line; on a ``log_scale`` axis values at or below zero are left out. A
    series of more than ``MAX_MARKERS`` points has no marker per point.
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

    right_pad = _text_width(x_labels[-1]) / 2
    size = (width, height)
    (left, right, bottom), scale, body = _plot(size, names, values, y_label, log_scale, right_pad)
    x_first, x_last = x_ticks[0], x_ticks[-1]

    def x_scale(position: float) -> float:
        return left + (position - x_first) / (x_last - x_first) * (right - left)

    body += ['<g class="x-axis">', _line(left, right, bottom, bottom)]
    # Thin the labels out when they would overlap; every tick keeps its mark.
    label_width = max(_text_width(label) for label in x_labels) + 12
    every = max(1, math.ceil(label_width / ((right - left) / max(1, len(x_ticks) - 1))))
    for index, (tick, label) in enumerate(zip(x_ticks, x_labels, strict=True)):
        x = x_scale(tick)
        body.append(_line(x, x, bottom, bottom + 4))
        if index % every == 0:
            body.append(_text(x, bottom + 18, label, anchor="middle"))
    body.append("</g>")

    for s, name in enumerate(names):
        color = PALETTE[s % len(PALETTE)]
        body.append(f'<g class="series" stroke="{color}" fill="{color}">')
        markers = len(points[name]) <= MAX_MARKERS
        for gap, run in groupby(points[name], key=lambda point: point[1] is None):
            if gap:
                continue
            segment = cast(list[tuple[float, float, datetime | date | float]], list(run))
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
