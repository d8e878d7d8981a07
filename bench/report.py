"""What every benchmark shares: options, child processes, repeats, memory, and the reports."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from bench.namespace import DEFAULT_SEED
from bench.server import database_url
from common.cli import positive_int

PROBLEMS = "the benchmark found problems (its figures are not trustworthy):\n{problems}"
BAD_SIZES = "--sizes must be comma-separated whole numbers of at least 1, not {value!r}"
BAD_NAMES = "unknown {noun} {name!r} in {option}: choose from {choices} or all"
CHILD_FAILED = "{what}: the child process failed: {cause}"


class BenchError(RuntimeError):
    """A strategy did not do the work it was given; its figures would mislead."""


def require_postgresql(message: str, using: str = DEFAULT_DB_ALIAS) -> None:
    """Refuse a benchmark that measures PostgreSQL; ``message`` may name the ``{vendor}``."""
    vendor = connections[using].vendor
    if vendor != "postgresql":
        raise CommandError(message.format(vendor=vendor))


def parse_sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",")]
        if min(sizes) < 1:
            raise ValueError(value)
    except ValueError:
        raise CommandError(BAD_SIZES.format(value=value)) from None
    return sorted(set(sizes))


def parse_names(value: str, choices: Iterable[str], option: str, noun: str) -> list[str]:
    """``all``, or comma-separated names from ``choices`` (repeats dropped)."""
    choices = list(choices)
    if value == "all":
        return choices
    names = list(dict.fromkeys(name.strip() for name in value.split(",")))
    for name in (name for name in names if name not in choices):
        text = BAD_NAMES.format(noun=noun, name=name, option=option, choices=", ".join(choices))
        raise CommandError(text)
    return names


def add_seed(parser: Any, seed_help: str) -> None:
    """``--seed``; ``seed_help`` says what it seeds, in the command's words, and the default
    is appended."""
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"{seed_help} (default: {DEFAULT_SEED})."
    )


def add_seed_and_repeat(
    parser: Any, seed_help: str, repeat_help: str, repeat_type: Any = positive_int
) -> None:
    """``--seed`` (see :func:`add_seed`), then ``--repeat``."""
    add_seed(parser, seed_help)
    parser.add_argument("--repeat", type=repeat_type, default=1, help=repeat_help)


def add_files(parser: Any, json_help: str, charts: Mapping[str, str]) -> None:
    """``--markdown``, ``--json`` (its help ``json_help``) and the charts' options (option:
    what it draws), as paths."""
    parser.add_argument("--markdown", type=Path, help="Write the Markdown report here.")
    parser.add_argument("--json", type=Path, help=json_help)
    for option, drawing in charts.items():
        parser.add_argument(option, type=Path, help=f"Write the SVG chart of {drawing} here.")


def print_markdown(command: BaseCommand, path: Path | None, text: str) -> None:
    """Write ``text`` to ``path`` (``--markdown``) when given, and to stdout."""
    if path:
        path.write_text(text + "\n", encoding="utf-8")
    command.stdout.write(text)


def take_turns[T](
    calls: Mapping[str, Callable[[], T]],
    repeat: int,
    again: Callable[[list[T]], bool] = lambda runs: True,
) -> dict[str, list[T]]:
    """Each call ``repeat`` times, taking turns (each once, then each again), so that a slow
    spell of a shared machine falls on all of them; a call runs again only while
    ``again(its runs so far)``."""
    runs: dict[str, list[T]] = {key: [] for key in calls}
    for _ in range(repeat):
        for key, call in calls.items():
            if not runs[key] or again(runs[key]):
                runs[key].append(call())
    return runs


def run_child(what: str, using: str, *arguments: str) -> dict[str, Any]:
    """``manage.py ARGUMENTS`` in a fresh process on this database; its last line, as JSON."""
    command = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), *arguments]
    environment = dict(os.environ, DATABASE_URL=database_url(using))
    child = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        cause = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(CHILD_FAILED.format(what=what, cause=cause))
    return json.loads(child.stdout.strip().splitlines()[-1])


def peak_kib() -> int:
    """The process's peak resident set size so far, in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


def memory_baseline() -> int:
    """Reset the peak resident size to the current one (``/proc/self/clear_refs``, Linux
    4.0+) and return it in KiB; where that is impossible, the current resident size
    (the growth may then include what start-up held and freed)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return peak_kib()
    except OSError:
        pass
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return peak_kib()


def growth_mb(baseline: int) -> float:
    return max(0, peak_kib() - baseline) / 1024


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None if empty."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not values:
        return None
    return sorted(values)[max(0, math.ceil(q / 100 * len(values)) - 1)]


def short_size(size: int) -> str:
    for unit, suffix in ((1_000_000, "M"), (1_000, "k")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def format_ratio(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def machine_description() -> str:
    """CPU model, cores, memory, OS and Python: enough to compare runs."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [line for line in cpuinfo if line.startswith("model name")]
        model = names[0].split(":", 1)[1].strip() if names else model
    except OSError:
        pass
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM"
    except (ValueError, OSError):
        memory = ""
    system = f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    return f"{model}, {os.cpu_count()} CPUs{memory}, {system}"


def database_description(using: str = DEFAULT_DB_ALIAS) -> str:
    """'postgresql (PostgreSQL 15.8)': the vendor, and the server version when known."""
    connection = connections[using]
    try:
        version = ".".join(str(part) for part in connection.get_database_version())
    except NotImplementedError:
        return connection.vendor
    return f"{connection.vendor} ({connection.display_name} {version})"


def section_head(title: str, command_line: str, database: str | None = None) -> list[str]:
    """A BENCHMARKS.md section's first lines: its title, how to re-run it, where and when."""
    machine = f"Machine: {machine_description()}  "
    database = f"Database: {database or database_description()}  "
    date = f"Date: {timezone.now().date().isoformat()}"
    return [f"## {title}", "", f"Command: `{command_line}`", "", machine, database, date, ""]


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """``align``: one character per column, ``l`` or ``r``."""
    marks = [" --- " if a == "l" else " ---: " for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain table: the first column left-aligned, the figures right-aligned."""
    rows = [header, *rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells.extend(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join(cells).rstrip()

    ruler = "  ".join("-" * width for width in widths)
    return "\n".join([line(rows[0]), ruler, *map(line, rows[1:])])


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def checks(title: str, targets: Sequence[Sequence[str]], problems: Sequence[str]) -> list[str]:
    """A report's table of targets (figure, target, measured, met) and its problems."""
    lines = []
    if targets:
        header = ("Figure", "Target", "Measured", "Met")
        lines += [f"### {title}", "", *markdown_table(header, "lrrl", targets), ""]
    if problems:
        lines += ["### Problems", "", *(f"- {problem}" for problem in problems), ""]
    return lines


def write_outputs(
    command: BaseCommand,
    options: dict[str, Any],
    report: Any,
    markdown: Callable[..., str],
    command_line: str,
    charts: Mapping[str, tuple[str, Callable[[Any], str]]],
) -> None:
    """Write the charts (option: alt text, drawing), ``--json`` and ``--markdown`` asked for
    (the Markdown to stdout without a file); fail if the report found problems."""
    for option in ("markdown", "json", *charts):
        if options[option] is not None:
            options[option].parent.mkdir(parents=True, exist_ok=True)
    markdown_path: Path | None = options["markdown"]
    base = markdown_path.resolve().parent if markdown_path else Path.cwd()
    links = []
    for option, (alt, draw) in charts.items():
        if (path := options[option]) is not None:
            path.write_text(draw(report) + "\n", encoding="utf-8")
            links.append((alt, os.path.relpath(path.resolve(), base)))
    if options["json"] is not None:
        options["json"].write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    text = markdown(report, command_line=command_line, charts=links)
    if markdown_path is not None:
        markdown_path.write_text(text, encoding="utf-8")
    elif options["verbosity"] >= 1:
        command.stdout.write(text)
    if report.problems:
        raise CommandError(PROBLEMS.format(problems="\n".join(report.problems)))
