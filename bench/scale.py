"""The scale benchmark behind ``manage.py bench_scale``: the service against its peers.

Each workload of ``bench.workloads`` writes its deterministic rows with
several strategies: the optimized service, raw SQL (COPY), django-pgbulk (a
benchmark-only extra) and Django's own bulk methods, at sizes up to
1,000,000 rows, on PostgreSQL. The workloads give every strategy the same
input from the same start and read its end state (see there); this module
runs them, checks that every strategy left the same end state, measures and
reports.

* **Same end.** After each strategy's first run the namespace's end state is
  fingerprinted: its row count and an order-independent hash of its rows.
  Every strategy of one workload and size must end with the same fingerprint
  and with one row per input row, or the command fails after reporting.
* **Same commits.** Chunked strategies get the service's chunk size and
  commit each chunk, as the service does; COPY strategies stream every row in
  one statement, their best case.

The peers do less than the service: they neither validate rows nor check that
users and products exist, and the views peers do not maintain
``Product.view_count``. Their figures are therefore upper bounds for doing the
same job with them.

Memory
------
``tracemalloc`` slows a million-row run several times over and misses memory
held by C extensions. Instead each strategy runs in a fresh child process
(``bench_scale --one``). Just before the timed call the child resets its peak
resident set size to the current one (``/proc/self/clear_refs``, Linux 4.0+);
its peak memory growth is the peak (``ru_maxrss``) after the call minus that
baseline. Where the peak cannot be reset, the baseline is the current resident
size, which can overstate the growth by what Django's start-up held and freed.
``--in-process`` skips the children (faster, for tests) and reports no memory.

Slow peers
----------
A peer (django-pgbulk, Django's bulk methods, the naive service) whose time at
the previous size, scaled linearly to the next size, exceeds the peer budget is
not run at that size; the report says so with the projection. The optimized
service and raw SQL, which the targets compare, always run. Orders run at
10,000 at most: beyond, the naive service would take most of an hour.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from bench.namespace import DEFAULT_SEED, reset_namespace
from bench.report import format_ratio, markdown_table, section_head, short_size
from bench.workloads import (
    DJANGO,
    KINDS,
    NAIVE,
    OPTIMIZED,
    PGBULK,
    RAW,
    WORKLOADS,
    BenchError,
    Strategy,
    Workload,
)
from common.charts import bar_chart

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
# A strategy is measured again (with --repeat) only while its runs took less.
REPEAT_BUDGET = 30.0
# Peers are skipped at a size where their projected time exceeds the budget;
# the optimized service and raw SQL, which the targets need, always run.
PEERS = frozenset({PGBULK, DJANGO, NAIVE})
DEFAULT_PEER_BUDGET = 120.0

STATES_DIFFER = "{workload} at {size:,} rows: {strategy} ended in a different state than {first}"
OVER_BUDGET = (
    "not run: {projected:,.0f} s projected from {seconds:.1f} s at {previous:,} "
    "(over the {budget:,.0f} s budget per peer run)"
)
ROWS_MISSING = "{workload} at {size:,} rows: {strategy} left {found:,} rows, expected {expected:,}"

Progress = Callable[[str], None]


# -- measuring -----------------------------------------------------------------------


def resident_kib() -> int | None:
    """The process's current resident set size in KiB (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak() -> bool:
    """Make the peak resident size the current one (Linux 4.0+); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_kib() -> int:
    """The process's peak resident set size so far, in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float
    peak_growth_mb: float | None = None


def run_strategy(workload: Workload, key: str, *, measure_memory: bool) -> Timing:
    """Run one strategy in this process: prepare, then time the call alone."""
    workload.strategy(key)  # an unknown key fails before any work
    workload.prepare()
    gc.collect()
    before = 0
    if measure_memory:
        before = peak_kib() if reset_peak() else (resident_kib() or peak_kib())
    started = time.perf_counter()
    workload.run(key)
    seconds = time.perf_counter() - started
    if not measure_memory:
        return Timing(seconds)
    return Timing(seconds, max(0, peak_kib() - before) / 1024)


def database_url(using: str) -> str:
    """A DATABASE_URL naming the connection's database (the test database in tests)."""
    config = connections[using].settings_dict
    auth = quote(config["USER"] or "", safe="")
    if config.get("PASSWORD"):
        auth += ":" + quote(config["PASSWORD"], safe="")
    host = quote(config["HOST"] or "localhost", safe="")
    port = config["PORT"] or 5432
    return f"postgres://{auth}@{host}:{port}/{quote(config['NAME'], safe='')}"


def run_in_child(workload: Workload, key: str) -> Timing:
    """Run one strategy in a fresh ``manage.py bench_scale --one`` process."""
    command = [
        sys.executable,
        str(Path(settings.BASE_DIR) / "manage.py"),
        "bench_scale",
        "--one",
        workload.name,
        "--strategy",
        key,
        "--sizes",
        str(workload.size),
        "--seed",
        str(workload.seed),
        "--chunk-size",
        str(workload.chunk_size),
        "--work-dir",
        str(workload.work_dir),
    ]
    environment = dict(os.environ, DATABASE_URL=database_url(workload.using))
    child = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        cause = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{workload.name} with {key}: the child process failed: {cause}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    return Timing(figures["seconds"], figures["peak_growth_mb"])


@dataclass(frozen=True, slots=True)
class Measurement:
    """One strategy at one size; without ``seconds`` it did not run and ``note`` says why."""

    workload: str
    strategy: str
    label: str
    size: int
    seconds: float | None = None
    peak_growth_mb: float | None = None
    note: str = ""
    runs: int = 1

    @property
    def rows_per_second(self) -> float | None:
        return self.size / self.seconds if self.seconds else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": self.rows_per_second}


@dataclass(slots=True)
class ScaleReport:
    sizes: list[int]
    workloads: list[str]
    measurements: list[Measurement]
    problems: list[str]
    # Rows per chunk of each workload's service and chunked peers.
    chunk_sizes: dict[str, int] = field(default_factory=dict)

    def find(self, workload: str, strategy: str, size: int) -> Measurement | None:
        for measurement in self.measurements:
            if (measurement.workload, measurement.strategy, measurement.size) == (
                workload,
                strategy,
                size,
            ):
                return measurement
        return None

    def ratio(self, workload: str, strategy: str, size: int) -> float | None:
        """The optimized service's rows/s divided by ``strategy``'s, at ``size``."""
        optimized = self.find(workload, OPTIMIZED, size)
        other = self.find(workload, strategy, size)
        if optimized is None or other is None:
            return None
        if optimized.rows_per_second is None or not other.rows_per_second:
            return None
        return optimized.rows_per_second / other.rows_per_second

    def as_dict(self) -> dict[str, Any]:
        return {
            "sizes": self.sizes,
            "workloads": self.workloads,
            "measurements": [m.as_dict() for m in self.measurements],
            "problems": self.problems,
            "chunk_sizes": self.chunk_sizes,
        }


def run_scale_bench(
    workloads: Sequence[str],
    sizes: Sequence[int],
    *,
    seed: int = DEFAULT_SEED,
    chunk_size: int | None = None,
    using: str = DEFAULT_DB_ALIAS,
    work_dir: Path,
    isolate: bool = True,
    peer_budget: float = DEFAULT_PEER_BUDGET,
    repeat: int = 1,
    progress: Progress | None = None,
) -> ScaleReport:
    """Every strategy of every workload at every size, each from the same start.

    A strategy that fails or ends in another state than the first one is
    reported in ``problems``; the others still run. A peer whose time at the
    previous size, scaled to this size, exceeds ``peer_budget`` seconds is not
    run (the table says so). With ``repeat``, each strategy runs up to that
    many times (see ``measure``). The namespace is deleted at the end.
    """
    report = ScaleReport(list(sizes), list(workloads), [], [])
    for name in workloads:
        cls = WORKLOADS[name]
        last: dict[str, Measurement] = {}
        for size in sizes:
            if cls.max_size is not None and size > cls.max_size:
                note = f"not run above {cls.max_size:,}: {cls.cap_reason}"
                report.measurements.extend(
                    Measurement(name, s.key, s.label, size, note=note) for s in cls.strategies
                )
                continue
            workload = cls(size, seed=seed, chunk_size=chunk_size, using=using, work_dir=work_dir)
            report.chunk_sizes[name] = workload.chunk_size
            skipped: dict[str, Measurement] = {}
            for strategy in cls.strategies:
                previous = last.get(strategy.key)
                if strategy.key in PEERS and (note := over_budget(previous, size, peer_budget)):
                    skipped[strategy.key] = Measurement(
                        name, strategy.key, strategy.label, size, note=note
                    )
            measured = measure(
                workload,
                [s for s in cls.strategies if s.key not in skipped],
                isolate=isolate,
                report=report,
                repeat=repeat,
                after_first_run=EndStates(workload, report),
            )
            for strategy in cls.strategies:
                measurement = skipped.get(strategy.key) or measured[strategy.key]
                report.measurements.append(measurement)
                if measurement.seconds is None:
                    if progress is not None:
                        progress(f"{name} {size:,} {strategy.label}: {measurement.note}")
                    continue
                last[strategy.key] = measurement
                if progress is not None:
                    best = f" (best of {measurement.runs})" if measurement.runs > 1 else ""
                    progress(
                        f"{name} {size:,} {strategy.label}: {measurement.seconds:.2f}s{best}, "
                        f"{measurement.rows_per_second:,.0f} {cls.unit}/s"
                        + (
                            f", peak memory +{measurement.peak_growth_mb:.1f} MB"
                            if measurement.peak_growth_mb is not None
                            else ""
                        )
                    )
    reset_namespace(using)
    return report


class EndStates:
    """Checks each strategy's end state after its first run: every row there, all alike."""

    def __init__(self, workload: Workload, report: ScaleReport) -> None:
        self.workload = workload
        self.report = report
        self.first: tuple[str, dict[str, tuple[int, int]]] | None = None

    def __call__(self, strategy: Strategy) -> None:
        workload, problems = self.workload, self.report.problems
        prints = workload.fingerprints()
        found = next(iter(prints.values()))[0]
        if found != workload.size:
            problems.append(
                ROWS_MISSING.format(
                    workload=workload.name,
                    size=workload.size,
                    strategy=strategy.label,
                    found=found,
                    expected=workload.size,
                )
            )
        if self.first is None:
            self.first = (strategy.label, prints)
        elif prints != self.first[1]:
            problems.append(
                STATES_DIFFER.format(
                    workload=workload.name,
                    size=workload.size,
                    strategy=strategy.label,
                    first=self.first[0],
                )
            )


def over_budget(previous: Measurement | None, size: int, budget: float) -> str:
    """Why a peer is not run at ``size``, or "" when its projected time fits the budget."""
    if previous is None or previous.seconds is None:
        return ""
    projected = previous.seconds * size / previous.size
    if projected <= budget:
        return ""
    return OVER_BUDGET.format(
        projected=projected, seconds=previous.seconds, previous=previous.size, budget=budget
    )


def measure(
    workload: Workload,
    strategies: Sequence[Strategy],
    *,
    isolate: bool,
    report: ScaleReport,
    repeat: int = 1,
    after_first_run: Callable[[Strategy], None] | None = None,
) -> dict[str, Measurement]:
    """Run each strategy from a fresh start, up to ``repeat`` times; the fastest run counts.

    The runs take turns: every strategy runs once, then every strategy
    again, so a slow minute on a shared machine falls on all of them
    rather than on one strategy's every run. A strategy is run again only
    while its runs so far took less than ``REPEAT_BUDGET`` seconds in all, so
    repeats steady the short runs, which a busy machine sways most, without
    multiplying the long ones. Every strategy follows the same rule. Memory
    is the largest growth of any run. ``after_first_run`` is called after
    each strategy's first run, before the next setup (to check its state).
    """
    name, size = workload.name, workload.size
    timings: dict[str, list[Timing]] = {s.key: [] for s in strategies}
    failed: dict[str, Measurement] = {}
    for _ in range(repeat):
        for strategy in strategies:
            runs = timings[strategy.key]
            if strategy.key in failed or sum(t.seconds for t in runs) >= REPEAT_BUDGET:
                continue
            workload.setup()
            try:
                if isolate:
                    runs.append(run_in_child(workload, strategy.key))
                else:
                    runs.append(run_strategy(workload, strategy.key, measure_memory=False))
            except BenchError as exc:
                report.problems.append(str(exc))
                failed[strategy.key] = Measurement(
                    name, strategy.key, strategy.label, size, note=f"failed: {exc}"
                )
                continue
            if len(runs) == 1 and after_first_run is not None:
                after_first_run(strategy)
    measurements = dict(failed)
    for strategy in strategies:
        if strategy.key in failed:
            continue
        runs = timings[strategy.key]
        growths = [t.peak_growth_mb for t in runs if t.peak_growth_mb is not None]
        measurements[strategy.key] = Measurement(
            name,
            strategy.key,
            strategy.label,
            size,
            min(t.seconds for t in runs),
            max(growths) if growths else None,
            runs=len(runs),
        )
    return measurements


# -- reports -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The optimized service at ``size`` must run ``minimum`` times ``strategy``'s rows/s."""

    workload: str
    size: int
    strategy: str
    minimum: float


TARGETS = (
    Target("views", 100_000, RAW, 0.8),
    Target("scores", 100_000, PGBULK, 2.5),
    Target("scores", 100_000, DJANGO, 2.0),
    Target("updates", 100_000, DJANGO, 10.0),
    Target("updates", 100_000, PGBULK, 2.0),
    Target("orders", 10_000, NAIVE, 20.0),
    Target("import", 1_000_000, RAW, 0.6),
)
MEMORY_LIMIT_MB = 100.0
MEMORY_GROWTH_LIMIT = 1.2  # peak growth at 1,000,000 rows against 100,000


def target_rows(report: ScaleReport) -> list[tuple[str, str, str, str]]:
    rows = []
    for target in TARGETS:
        if target.workload not in report.workloads or target.size not in report.sizes:
            continue
        label = WORKLOADS[target.workload].strategy(target.strategy).label
        ratio = report.ratio(target.workload, target.strategy, target.size)
        rows.append(
            (
                f"{target.workload} at {target.size:,}: optimized ÷ {label}",
                f"≥ {target.minimum:.2f}x",
                format_ratio(ratio) if ratio is not None else "not measured",
                "n/a" if ratio is None else ("yes" if ratio >= target.minimum else "**no**"),
            )
        )
    for name in report.workloads:
        peaks = {
            m.size: m.peak_growth_mb
            for m in report.measurements
            if m.workload == name and m.strategy == OPTIMIZED and m.peak_growth_mb is not None
        }
        if not peaks:
            continue
        largest = max(peaks)
        rows.append(
            (
                f"{name} at {largest:,}: optimized peak memory growth",
                f"< {MEMORY_LIMIT_MB:.0f} MB",
                f"{peaks[largest]:.1f} MB",
                "yes" if peaks[largest] < MEMORY_LIMIT_MB else "**no**",
            )
        )
        if 100_000 in peaks and 1_000_000 in peaks and peaks[100_000] > 0:
            growth = peaks[1_000_000] / peaks[100_000]
            rows.append(
                (
                    f"{name}: optimized peak memory growth, 1,000,000 ÷ 100,000",
                    f"≤ {MEMORY_GROWTH_LIMIT:.1f}x",
                    f"{growth:.2f}x",
                    "yes" if growth <= MEMORY_GROWTH_LIMIT else "**no**",
                )
            )
    return rows


def workload_section(report: ScaleReport, name: str) -> list[str]:
    cls = WORKLOADS[name]
    lines = [f"### {cls.title} (`{name}`)", ""]
    lines += [f"- **{s.label}** ({s.kind}): {s.description}." for s in cls.strategies]
    if name in report.chunk_sizes:
        lines.append(f"- Chunks of {report.chunk_sizes[name]:,} rows.")
    lines.append("")
    rows = []
    for size in report.sizes:
        for strategy in cls.strategies:
            m = report.find(name, strategy.key, size)
            if m is None:
                continue
            if m.seconds is None:
                rows.append((m.label, f"{size:,}", "—", "—", "—", "—", "—", m.note))
                continue
            peak = "n/a" if m.peak_growth_mb is None else f"{m.peak_growth_mb:.1f} MB"
            rows.append(
                (
                    m.label,
                    f"{size:,}",
                    f"{m.seconds:.2f} s",
                    str(m.runs),
                    f"{m.rows_per_second:,.0f}",
                    format_ratio(report.ratio(name, strategy.key, size)),
                    peak,
                    "",
                )
            )
    header = (
        "Strategy",
        cls.unit.capitalize(),
        "Time",
        "Runs",
        f"{cls.unit.capitalize()}/s",
        "Optimized ÷ this",
        "Peak memory growth",
        "Note",
    )
    return lines + markdown_table(header, "lrrrrrrl", rows)


def markdown_report(
    report: ScaleReport,
    *,
    command_line: str,
    charts: Sequence[tuple[str, str]] = (),
) -> str:
    """The section of BENCHMARKS.md: how it was made, the targets, one table per workload.

    ``charts`` are (alt text, relative path) pairs to link.
    """
    lines = [
        *section_head(
            "At scale: the optimized service against raw COPY, django-pgbulk and Django",
            command_line,
        ),
        "Each strategy runs alone in a fresh process on the same deterministic rows, from the "
        "same starting state, and must leave the same end state. Time is the wall-clock time "
        "of the strategy's call; generating the input rows is part of it for every strategy, "
        "setup and checks are not. *Runs*: how often the strategy ran, each time from the "
        "same start, the strategies of a size taking turns; the fastest run counts (a "
        "strategy runs again only while its runs took "
        f"under {REPEAT_BUDGET:.0f} s in all). *Optimized ÷ this* is the optimized service's "
        "rows/s divided by this strategy's at the same size (above 1: the service is "
        "faster). *Peak memory growth* is the process's peak resident size during the call "
        "minus its resident size before it (the largest of its runs). The peers do not "
        "validate rows or check references, so their figures are upper bounds for the same "
        "job.",
        "",
    ]
    lines += [f"![{alt}]({path})" for alt, path in charts]
    if charts:
        lines.append("")
    targets = target_rows(report)
    if targets:
        lines += ["### Targets", ""]
        lines += markdown_table(("Figure", "Target", "Measured", "Met"), "lrrl", targets)
        lines.append("")
    if report.problems:
        lines += ["### Problems", "", *(f"- {problem}" for problem in report.problems), ""]
    for name in report.workloads:
        lines += workload_section(report, name)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def chart_series(
    report: ScaleReport, value: Callable[[Measurement], float | None]
) -> tuple[list[str], dict[str, list[float | None]]]:
    """Groups (workload and size, in run order) and one series per kind of strategy."""
    cells: list[tuple[str, int]] = []
    for name in report.workloads:
        for size in report.sizes:
            if any(
                m.workload == name and m.size == size and m.seconds is not None
                for m in report.measurements
            ):
                cells.append((name, size))
    kinds = [
        key for key in KINDS if any(m.strategy == key for m in report.measurements if m.seconds)
    ]
    series: dict[str, list[float | None]] = {}
    for key in kinds:
        values = []
        for name, size in cells:
            m = report.find(name, key, size)
            values.append(None if m is None or m.seconds is None else value(m))
        series[KINDS[key]] = values
    groups = [f"{name} {short_size(size)}" for name, size in cells]
    return groups, series


def throughput_chart(report: ScaleReport) -> str:
    groups, series = chart_series(report, lambda m: m.rows_per_second)
    return bar_chart(
        groups,
        series,
        title="Throughput by strategy, workload and size (PostgreSQL)",
        y_label="rows/s",
        log_scale=True,
        width=max(720, 100 * len(groups) + 120),
        height=420,
    )


def memory_chart(report: ScaleReport) -> str:
    groups, series = chart_series(report, lambda m: m.peak_growth_mb)
    return bar_chart(
        groups,
        series,
        title="Peak memory growth by strategy, workload and size",
        y_label="MB",
        width=max(720, 100 * len(groups) + 120),
        height=360,
    )
