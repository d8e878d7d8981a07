"""The scale benchmark behind ``manage.py bench_scale``: the service against its peers.

Every strategy of each workload (``bench.workloads``) runs on the same rows from the
same start, each in a fresh child process (``bench_scale --one``) that measures its
peak memory growth; after its first run its end state must match the others', with one
row per input row, or the command fails after reporting. Method: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from bench import workloads as wl
from bench.namespace import DEFAULT_SEED, reset_namespace
from bench.report import (
    BenchError,
    checks,
    format_ratio,
    growth_mb,
    markdown_table,
    memory_baseline,
    met,
    run_child,
    section_head,
    short_size,
    take_turns,
)
from common.charts import bar_chart

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
REPEAT_BUDGET = 30.0  # a strategy runs again (--repeat) only while its runs took less
# Peers are skipped where their projected time exceeds the budget; the optimized
# service and raw SQL, which the targets need, always run.
PEERS = frozenset({wl.PGBULK, wl.DJANGO, wl.NAIVE})
DEFAULT_PEER_BUDGET = 120.0

STATES_DIFFER = "{workload} at {size:,} rows: {strategy} ended in a different state than {first}"
OVER_BUDGET = (
    "not run: {projected:,.0f} s projected from {seconds:.1f} s at {previous:,} "
    "(over the {budget:,.0f} s budget per peer run)"
)
ROWS_MISSING = "{workload} at {size:,} rows: {strategy} left {found:,} rows, expected {expected:,}"


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float
    peak_growth_mb: float | None = None


def run_strategy(workload: wl.Workload, key: str, *, measure_memory: bool) -> Timing:
    """Run one strategy in this process: prepare, then time the call alone."""
    workload.strategy(key)  # an unknown key fails before any work
    workload.prepare()
    gc.collect()
    baseline = memory_baseline() if measure_memory else 0
    started = time.perf_counter()
    workload.run(key)
    seconds = time.perf_counter() - started
    return Timing(seconds, growth_mb(baseline) if measure_memory else None)


def run_in_child(workload: wl.Workload, key: str) -> Timing:
    """Run one strategy in a fresh ``manage.py bench_scale --one`` process."""
    figures = run_child(
        f"{workload.name} with {key}",
        workload.using,
        *("bench_scale", "--one", workload.name, "--strategy", key),
        *("--sizes", str(workload.size), "--seed", str(workload.seed)),
        *("--chunk-size", str(workload.chunk_size), "--work-dir", str(workload.work_dir)),
    )
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

    def progress(self, unit: str) -> str:
        if self.seconds is None:
            return f"{self.workload} {self.size:,} {self.label}: {self.note}"
        best = f" (best of {self.runs})" if self.runs > 1 else ""
        growth = self.peak_growth_mb
        memory = f", peak memory +{growth:.1f} MB" if growth is not None else ""
        return (
            f"{self.workload} {self.size:,} {self.label}: {self.seconds:.2f}s{best}, "
            f"{self.rows_per_second:,.0f} {unit}/s{memory}"
        )


@dataclass(slots=True)
class ScaleReport:
    sizes: list[int]
    workloads: list[str]
    measurements: list[Measurement]
    problems: list[str]
    chunk_sizes: dict[str, int] = field(default_factory=dict)  # rows per chunk, per workload

    def find(self, workload: str, strategy: str, size: int) -> Measurement | None:
        wanted = (workload, strategy, size)
        return next(
            (m for m in self.measurements if (m.workload, m.strategy, m.size) == wanted), None
        )

    def ratio(self, workload: str, strategy: str, size: int) -> float | None:
        """The optimized service's rows/s divided by ``strategy``'s, at ``size``."""
        found = [self.find(workload, key, size) for key in (wl.OPTIMIZED, strategy)]
        mine, theirs = (m.rows_per_second if m else None for m in found)
        return mine / theirs if mine and theirs else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "measurements": [m.as_dict() for m in self.measurements]}


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
    progress: Callable[[str], None] | None = None,
) -> ScaleReport:
    """Every strategy of every workload at every size, each from the same start.

    A strategy that fails or ends in another state than the first is reported
    in ``problems``; the others still run. The namespace is deleted at the end.
    """
    report = ScaleReport(list(sizes), list(workloads), [], [])
    for name in workloads:
        cls = wl.WORKLOADS[name]
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
            skipped = {
                s.key: Measurement(name, s.key, s.label, size, note=note)
                for s in cls.strategies
                if s.key in PEERS and (note := over_budget(last.get(s.key), size, peer_budget))
            }
            measured = measure(
                workload,
                [s for s in cls.strategies if s.key not in skipped],
                isolate=isolate,
                report=report,
                repeat=repeat,
                after_first_run=end_states(workload, report.problems),
            )
            for strategy in cls.strategies:
                m = skipped.get(strategy.key) or measured[strategy.key]
                report.measurements.append(m)
                if m.seconds is not None:
                    last[strategy.key] = m
                if progress is not None:
                    progress(m.progress(cls.unit))
    reset_namespace(using)
    return report


def end_states(workload: wl.Workload, problems: list[str]) -> Callable[[wl.Strategy], None]:
    """Checks each strategy's end state after its first run: every row there, all alike."""
    first: list[tuple[str, dict[str, tuple[int, int]]]] = []

    def check(strategy: wl.Strategy) -> None:
        prints = workload.fingerprints()
        found = next(iter(prints.values()))[0]
        where = {"workload": workload.name, "size": workload.size, "strategy": strategy.label}
        if found != workload.size:
            problems.append(ROWS_MISSING.format(**where, found=found, expected=workload.size))
        first.append((strategy.label, prints))
        if prints != first[0][1]:
            problems.append(STATES_DIFFER.format(**where, first=first[0][0]))

    return check


def over_budget(previous: Measurement | None, size: int, budget: float) -> str:
    """Why a peer is not run at ``size``, or "" when its projected time fits the budget."""
    if previous is None or previous.seconds is None:
        return ""
    seconds, previous_size = previous.seconds, previous.size
    figures = {"seconds": seconds, "previous": previous_size, "budget": budget}
    projected = seconds * size / previous_size
    return OVER_BUDGET.format(projected=projected, **figures) if projected > budget else ""


def measure(
    workload: wl.Workload,
    strategies: Sequence[wl.Strategy],
    *,
    isolate: bool,
    report: ScaleReport,
    repeat: int = 1,
    after_first_run: Callable[[wl.Strategy], None] | None = None,
) -> dict[str, Measurement]:
    """Run each strategy from a fresh start, up to ``repeat`` times, taking turns; the
    fastest run counts, memory is the largest growth. A strategy runs again only while
    its runs so far took under ``REPEAT_BUDGET`` seconds in all, and never after a
    failure. ``after_first_run`` is called after each strategy's first run."""

    def once(strategy: wl.Strategy) -> Timing | str:
        workload.setup()
        try:
            if isolate:
                timing = run_in_child(workload, strategy.key)
            else:
                timing = run_strategy(workload, strategy.key, measure_memory=False)
        except BenchError as exc:
            report.problems.append(str(exc))
            return f"failed: {exc}"
        if after_first_run is not None and strategy.key not in checked:
            checked.add(strategy.key)
            after_first_run(strategy)
        return timing

    def again(runs: list[Timing | str]) -> bool:
        timings = [run for run in runs if isinstance(run, Timing)]
        return len(timings) == len(runs) and sum(t.seconds for t in timings) < REPEAT_BUDGET

    checked: set[str] = set()
    tries = take_turns({s.key: partial(once, s) for s in strategies}, repeat, again)
    measurements = {}
    for strategy in strategies:
        runs = tries[strategy.key]
        measured = partial(
            Measurement,
            workload=workload.name,
            strategy=strategy.key,
            label=strategy.label,
            size=workload.size,
        )
        timings = [run for run in runs if isinstance(run, Timing)]
        if len(timings) < len(runs):
            measurements[strategy.key] = measured(note=str(runs[-1]))
            continue
        growth = max(
            (t.peak_growth_mb for t in timings if t.peak_growth_mb is not None), default=None
        )
        best = min(t.seconds for t in timings)
        measurements[strategy.key] = measured(seconds=best, peak_growth_mb=growth, runs=len(runs))
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
    Target("views", 100_000, wl.RAW, 0.8),
    Target("scores", 100_000, wl.PGBULK, 2.5),
    Target("scores", 100_000, wl.DJANGO, 2.0),
    Target("updates", 100_000, wl.DJANGO, 10.0),
    Target("updates", 100_000, wl.PGBULK, 2.0),
    Target("orders", 10_000, wl.NAIVE, 20.0),
    Target("import", 1_000_000, wl.RAW, 0.6),
)
MEMORY_LIMIT_MB = 100.0
MEMORY_GROWTH_LIMIT = 1.2  # peak growth at 1,000,000 rows against 100,000


def target_rows(report: ScaleReport) -> list[tuple[str, str, str, str]]:
    rows = []
    for target in TARGETS:
        if target.workload not in report.workloads or target.size not in report.sizes:
            continue
        label = wl.WORKLOADS[target.workload].strategy(target.strategy).label
        ratio = report.ratio(target.workload, target.strategy, target.size)
        measured = format_ratio(ratio) if ratio is not None else "not measured"
        ok = "n/a" if ratio is None else met(ratio >= target.minimum)
        figure = f"{target.workload} at {target.size:,}: optimized ÷ {label}"
        rows.append((figure, f"≥ {target.minimum:.2f}x", measured, ok))
    for name in report.workloads:
        peaks = {
            m.size: m.peak_growth_mb
            for m in report.measurements
            if m.workload == name and m.strategy == wl.OPTIMIZED and m.peak_growth_mb is not None
        }
        if not peaks:
            continue
        largest = peaks[max(peaks)]
        figure = f"{name} at {max(peaks):,}: optimized peak memory growth"
        limit = f"< {MEMORY_LIMIT_MB:.0f} MB"
        rows.append((figure, limit, f"{largest:.1f} MB", met(largest < MEMORY_LIMIT_MB)))
        if 100_000 in peaks and 1_000_000 in peaks and peaks[100_000] > 0:
            growth = peaks[1_000_000] / peaks[100_000]
            figure = f"{name}: optimized peak memory growth, 1,000,000 ÷ 100,000"
            limit = f"≤ {MEMORY_GROWTH_LIMIT:.1f}x"
            rows.append((figure, limit, f"{growth:.2f}x", met(growth <= MEMORY_GROWTH_LIMIT)))
    return rows


def workload_section(report: ScaleReport, name: str) -> list[str]:
    cls = wl.WORKLOADS[name]
    lines = [f"### {cls.title} (`{name}`)", ""]
    lines += [f"- **{s.label}** ({s.kind}): {s.description}." for s in cls.strategies]
    if name in report.chunk_sizes:
        lines.append(f"- Chunks of {report.chunk_sizes[name]:,} rows.")
    lines.append("")
    rows = []
    for size in report.sizes:
        for strategy in cls.strategies:
            if (m := report.find(name, strategy.key, size)) is None:
                continue
            if m.seconds is None:
                rows.append((m.label, f"{size:,}", "—", "—", "—", "—", "—", m.note))
                continue
            peak = "n/a" if m.peak_growth_mb is None else f"{m.peak_growth_mb:.1f} MB"
            ratio = format_ratio(report.ratio(name, strategy.key, size))
            rate = f"{m.rows_per_second:,.0f}"
            rows.append(
                (m.label, f"{size:,}", f"{m.seconds:.2f} s", str(m.runs), rate, ratio, peak, "")
            )
    unit = cls.unit.capitalize()
    header = ("Strategy", unit, "Time", "Runs", f"{unit}/s", "Optimized ÷ this",
              "Peak memory growth", "Note")  # fmt: skip
    return lines + markdown_table(header, "lrrrrrrl", rows)


def markdown_report(
    report: ScaleReport, *, command_line: str, charts: Sequence[tuple[str, str]] = ()
) -> str:
    """The BENCHMARKS.md section; ``charts`` are (alt text, relative path) pairs to link."""
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
    lines += [f"![{alt}]({path})" for alt, path in charts] + ([""] if charts else [])
    lines += checks("Targets", target_rows(report), report.problems)
    for name in report.workloads:
        lines += [*workload_section(report, name), ""]
    return "\n".join(lines).rstrip() + "\n"


def chart(report: ScaleReport, memory: bool = False) -> str:
    """Throughput (rows/s, log scale), or peak memory growth, per kind of strategy,
    grouped by workload and size in run order."""
    ran = [m for m in report.measurements if m.seconds is not None]
    cells = [
        (name, size)
        for name in report.workloads
        for size in report.sizes
        if any(m.workload == name and m.size == size for m in ran)
    ]
    series: dict[str, list[float | None]] = {}
    for key in [k for k in wl.KINDS if any(m.strategy == k for m in ran)]:
        found = [report.find(name, key, size) for name, size in cells]
        series[wl.KINDS[key]] = [
            None
            if m is None or m.seconds is None
            else (m.peak_growth_mb if memory else m.rows_per_second)
            for m in found
        ]
    groups = [f"{name} {short_size(size)}" for name, size in cells]
    title, unit, height = (
        ("Peak memory growth by strategy, workload and size", "MB", 360)
        if memory
        else ("Throughput by strategy, workload and size (PostgreSQL)", "rows/s", 420)
    )
    width = max(720, 100 * len(groups) + 120)
    return bar_chart(
        groups, series, title=title, y_label=unit, log_scale=not memory, width=width, height=height
    )


CHARTS: dict[str, tuple[str, Callable[[ScaleReport], str]]] = {
    "chart": ("Throughput by strategy and size", chart),
    "memory_chart": ("Peak memory growth by strategy and size", partial(chart, memory=True)),
}
