"""The benchmarks' shared report pieces (``bench.report``), on any database.

The benchmarks that use them measure PostgreSQL; what they write, and how
they fail, does not depend on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pytest
from django.core.management.base import BaseCommand, CommandError

from bench import report


@dataclass
class Report:
    figure: int
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"figure": self.figure}


def markdown(report_: Report, *, command_line: str, charts: list[tuple[str, str]]) -> str:
    links = "".join(f"![{alt}]({path})\n" for alt, path in charts)
    return f"## Figure {report_.figure}\n`{command_line}`\n{links}"


def write(tmp_path: Path, report_: Report, **paths: Path | None) -> str:
    command = BaseCommand(stdout=StringIO())
    options = {"markdown": None, "json": None, "chart": None, "verbosity": 1, **paths}
    charts = {"chart": ("the figure", lambda r: f"<svg>{r.figure}</svg>")}
    report.write_outputs(command, options, report_, markdown, "bench --x", charts)
    return command.stdout.getvalue()


def test_outputs_go_to_their_files_with_the_chart_linked_from_the_markdown(tmp_path):
    paths = {
        "markdown": tmp_path / "docs" / "bench.md",
        "json": tmp_path / "data" / "bench.json",
        "chart": tmp_path / "docs" / "img" / "bench.svg",
    }
    out = write(tmp_path, Report(7), **paths)

    assert out == ""  # the Markdown went to its file
    assert paths["chart"].read_text() == "<svg>7</svg>\n"
    assert json.loads(paths["json"].read_text()) == {"figure": 7}
    assert (
        paths["markdown"].read_text() == "## Figure 7\n`bench --x`\n![the figure](img/bench.svg)\n"
    )


def test_without_a_markdown_file_the_markdown_goes_to_stdout(tmp_path):
    assert write(tmp_path, Report(3)) == "## Figure 3\n`bench --x`\n"


def test_a_report_with_problems_is_written_then_fails_naming_them(tmp_path):
    path = tmp_path / "bench.json"
    with pytest.raises(CommandError) as raised:
        write(tmp_path, Report(1, problems=["views: rows lost", "orders: too slow"]), json=path)

    assert "views: rows lost\norders: too slow" in str(raised.value)
    assert json.loads(path.read_text()) == {"figure": 1}


def test_checks_lists_the_targets_then_the_problems():
    targets = [("Rows/s", ">= 2x", "3.1x", report.met(True)), ("p99", "< 50 ms", "80 ms", "x")]
    assert report.checks("Targets", targets, ["a problem"]) == [
        "### Targets",
        "",
        "| Figure | Target | Measured | Met |",
        "| --- | ---: | ---: | --- |",
        "| Rows/s | >= 2x | 3.1x | yes |",
        "| p99 | < 50 ms | 80 ms | x |",
        "",
        "### Problems",
        "",
        "- a problem",
        "",
    ]
    assert report.checks("Targets", [], []) == []
    assert report.met(False) == "**no**"


@pytest.mark.parametrize(
    ("size", "text"),
    [(1_000_000, "1M"), (100_000, "100k"), (2_500, "2500"), (1_500_000, "1500k"), (999, "999")],
)
def test_short_size(size, text):
    assert report.short_size(size) == text


def test_take_turns_runs_each_call_in_turn_and_repeats_only_while_asked():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name) or len(order)) for name in "ab"}
    runs = report.take_turns(calls, 3, again=lambda done: len(done) < 2)

    assert order == ["a", "b", "a", "b"]
    assert runs == {"a": [1, 3], "b": [2, 4]}


def test_memory_growth_counts_what_was_allocated_after_the_baseline():
    baseline = report.memory_baseline()
    held = bytearray(64 * 1024 * 1024)
    held[::4096] = b"x" * len(held[::4096])  # touch every page
    assert report.growth_mb(baseline) >= 32
    del held
