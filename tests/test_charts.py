"""Server-side SVG charts: well-formed, escaped, accessible, honest axes."""

import math
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta

import pytest

from common.charts import MAX_MARKERS, NO_DATA, bar_chart, format_number, line_chart, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert('x')</script> & \"quoted\""
START = datetime(2024, 5, 1, tzinfo=UTC)


def parse(markup: str) -> ET.Element:
    """The chart as XML; fails the test if it is not well-formed."""
    root = ET.fromstring(markup)
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element) -> list[str]:
    """The visible text of each text element (a tooltip <title> inside is not shown)."""
    return [
        (node.text or "") + "".join(child.tail or "" for child in node)
        for node in root.iter(f"{SVG}text")
    ]


def bars(root: ET.Element) -> list[ET.Element]:
    return list(root.find(f"{SVG}g[@class='bars']"))


def bar_titles(root: ET.Element) -> list[str]:
    return [bar.find(f"{SVG}title").text for bar in bars(root)]


def test_bar_chart_draws_one_bar_per_present_value_and_skips_missing_ones():
    root = parse(
        bar_chart(
            ["views", "orders"],
            {"naive": [120.0, None], "optimized": [12.0, 6.0]},
            title="Queries",
            y_label="queries",
        )
    )
    assert bar_titles(root) == [
        "views - naive: 120",
        "views - optimized: 12",
        "orders - optimized: 6",
    ]
    heights = [float(bar.get("height")) for bar in bars(root)]
    # Linear axis from zero: bar heights are proportional to the values.
    assert heights[0] / heights[1] == pytest.approx(10, rel=0.01)
    assert heights[1] / heights[2] == pytest.approx(2, rel=0.01)
    assert "views" in texts(root) and "naive" in texts(root) and "optimized" in texts(root)


def test_chart_is_accessible():
    root = parse(bar_chart(["a"], {"s": [1.0]}, title="Rows per second", y_label="rows/s"))
    assert root.get("role") == "img"
    assert root.get("aria-label") == "Rows per second"
    assert root.find(f"{SVG}title").text == "Rows per second"
    assert "rows/s" in root.find(f"{SVG}desc").text


@pytest.mark.parametrize(
    "make",
    [
        lambda: bar_chart(
            [HOSTILE], {HOSTILE: [1.0]}, title=HOSTILE, y_label=HOSTILE, log_scale=True
        ),
        lambda: line_chart(
            {HOSTILE: [(START, 1.0), (START + timedelta(1), 2.0)]}, title=HOSTILE, y_label=HOSTILE
        ),
        lambda: line_chart({}, title=HOSTILE, y_label=HOSTILE),
    ],
    ids=["bar", "line", "no-data"],
)
def test_every_label_is_escaped(make):
    markup = make()
    assert "<script" not in markup
    assert "&lt;script&gt;" in markup
    root = parse(markup)
    # The text survives intact, as text: no element was injected.
    assert root.get("aria-label") == HOSTILE
    assert root.find(f"{SVG}title").text == HOSTILE
    assert not list(root.iter("script")) and not list(root.iter(f"{SVG}script"))


@pytest.mark.parametrize(
    "markup",
    [
        bar_chart([], {}, title="Empty", y_label="n"),
        bar_chart(["a", "b"], {"s": [None, None]}, title="Empty", y_label="n"),
        bar_chart(["a"], {"s": [0.0]}, title="Empty", y_label="n", log_scale=True),
        line_chart({}, title="Empty", y_label="n"),
        line_chart({"s": []}, title="Empty", y_label="n"),
        line_chart({"s": [(START, None)]}, title="Empty", y_label="n"),
    ],
)
def test_empty_data_gives_a_no_data_chart(markup):
    root = parse(markup)
    assert NO_DATA in texts(root)
    assert root.find(f"{SVG}title").text == "Empty"
    assert "no data" in root.find(f"{SVG}desc").text


def test_log_scale_spaces_decades_evenly_and_labels_them():
    root = parse(
        bar_chart(
            ["a", "b", "c"],
            {"s": [20.0, 2000.0, 200_000.0]},
            title="Log",
            y_label="queries",
            log_scale=True,
        )
    )
    heights = [float(bar.get("height")) for bar in bars(root)]
    # Each value is 100x the previous one: the same step up on a log axis.
    assert heights[2] - heights[1] == pytest.approx(heights[1] - heights[0], abs=0.05)
    labels = texts(root)
    assert "queries (log scale)" in labels
    for decade in ["10", "100", "1,000", "10k", "100k", "1M"]:
        assert decade in labels
    assert "logarithmic" in root.find(f"{SVG}desc").text


def test_log_scale_leaves_out_values_it_cannot_draw():
    root = parse(
        bar_chart(["a", "b"], {"s": [0.0, 50.0]}, title="Log", y_label="n", log_scale=True)
    )
    assert bar_titles(root) == ["b - s: 50"]


def test_bar_chart_rejects_series_of_the_wrong_length():
    with pytest.raises(ValueError, match="'s' has 1 values for 2 groups"):
        bar_chart(["a", "b"], {"s": [1.0]}, title="t", y_label="y")


def test_line_chart_over_time_has_legend_points_and_round_day_ticks():
    series = {
        "naive": [(START + timedelta(days=i), 100.0 + i) for i in range(8)],
        "optimized": [(START + timedelta(days=i, hours=12), 5000.0) for i in range(8)],
    }
    root = parse(line_chart(series, title="Rows per second", y_label="rows/s"))
    groups = root.findall(f"{SVG}g[@class='series']")
    assert len(groups) == 2
    assert len(groups[0].findall(f"{SVG}circle")) == 8
    assert groups[0].find(f"{SVG}circle/{SVG}title").text == (
        "naive, 2024-05-01 00:00:00+00:00: 100"
    )
    labels = texts(root)
    assert "naive" in labels and "optimized" in labels
    assert "2024-05-01" in labels
    assert "0" in labels and "5,000" in labels  # from zero up to the largest value


def test_line_chart_points_are_placed_by_time_not_by_order():
    points = [(START + timedelta(hours=h), 1.0) for h in (10, 0, 1)]
    root = parse(line_chart({"s": points}, title="t", y_label="y"))
    xs = [float(c.get("cx")) for c in root.iter(f"{SVG}circle")]
    assert xs == sorted(xs)
    # 0h -> 1h is a tenth of 0h -> 10h.
    assert (xs[1] - xs[0]) * 10 == pytest.approx(xs[2] - xs[0], rel=0.01)


def test_line_chart_takes_dates_and_numbers_and_breaks_lines_at_none():
    by_day = parse(
        line_chart(
            {"revenue": [(date(2024, 5, d), float(d)) for d in range(1, 11)]},
            title="Revenue per day",
            y_label="revenue",
        )
    )
    assert [text for text in texts(by_day) if text.startswith("2024-")] == [
        "2024-05-01",
        "2024-05-03",
        "2024-05-05",
        "2024-05-07",
        "2024-05-09",
        "2024-05-11",
    ]
    numbers = parse(
        line_chart({"s": [(1, 1.0), (2, None), (3, 3.0), (4, 4.0)]}, title="t", y_label="y")
    )
    lines = list(numbers.iter(f"{SVG}polyline"))
    assert len(lines) == 1  # (1) alone, then (3)-(4): only the second is a line
    assert len(list(numbers.iter(f"{SVG}circle"))) == 3


def test_line_chart_rejects_mixed_x_kinds():
    with pytest.raises(TypeError, match="mixes x values"):
        line_chart({"s": [(START, 1.0), (3.0, 2.0)]}, title="t", y_label="y")
    with pytest.raises(TypeError, match="type str"):
        line_chart({"s": [("monday", 1.0)]}, title="t", y_label="y")


def test_too_small_a_chart_is_refused():
    with pytest.raises(ValueError, match="too small"):
        bar_chart(["a"], {"s": [1.0]}, title="t", y_label="y", width=50)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0, 47, [0, 10, 20, 30, 40, 50]),
        (0, 0.98, [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (-3, 12, [-5, 0, 5, 10, 15]),
        (0, 0, [-1, -0.5, 0, 0.5, 1]),
    ],
)
def test_nice_ticks_are_round_and_cover_the_range(low, high, expected):
    ticks = nice_ticks(low, high)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= low and ticks[-1] >= high


@pytest.mark.parametrize(
    ("value", "expected"),
    [(12_500, "12.5k"), (3_000_000, "3M"), (1234.5, "1,234"), (2.5, "2.50"), (0.0123, "0.0123")],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


def test_nan_and_infinity_are_missing_values():
    root = parse(bar_chart(["a", "b"], {"s": [math.nan, 2.0]}, title="t", y_label="y"))
    assert bar_titles(root) == ["b - s: 2"]


def test_line_chart_log_scale_leaves_out_values_it_cannot_draw():
    root = parse(
        line_chart(
            {"naive": [(1, 10.0), (2, 0.0), (3, 20.0)], "optimized": [(1, 5000.0), (3, 8000.0)]},
            title="Throughput",
            y_label="rows/s",
            log_scale=True,
        )
    )
    assert len(list(root.iter(f"{SVG}circle"))) == 4
    labels = texts(root)
    assert "10" in labels and "10k" in labels and "0" not in labels
    assert "logarithmic" in root.find(f"{SVG}desc").text


def test_long_series_are_drawn_without_a_marker_per_point():
    many = [(n, float(n % 7)) for n in range(MAX_MARKERS + 1)]
    root = parse(
        line_chart(
            {"s": [*many, (MAX_MARKERS + 5, None), (MAX_MARKERS + 9, 1.0)]}, title="t", y_label="y"
        )
    )
    assert len(list(root.iter(f"{SVG}polyline"))) == 1
    # Only the point alone after the gap keeps its marker.
    assert [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")] == [
        f"s, {MAX_MARKERS + 9}: 1"
    ]
