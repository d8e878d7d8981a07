"""The benchmark behind ``manage.py test_bulk_performance``: naive against optimized.

Each operation is a workload of ``bench.workloads`` (the same rows, base
state and end state that ``bench_scale`` and ``bench_live`` use), run by
both services' same method: naive first, then optimized, each from a fresh
base state (``Workload.setup`` resets the namespace). The end states are
compared in logical terms (usernames and skus, never ids), so the two runs
must have done the same work even though their ids differ.

With ``repeat``, the pair runs that many times, taking turns, and each
variant's fastest run counts (as in ``bench_scale``): a run of a few
milliseconds is swayed by whatever else the machine does, and the fastest of
a few is the figure that repeats. Every run must end in the same state.

Setup, row generation and snapshots happen outside the service call and are
not measured: times and query counts are the ``BatchResult``'s, the same
figures each run leaves in its ``BatchProcessingLog`` row (logs are kept).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from batching.engine import BatchResult
from batching.models import BatchProcessingLog
from bench.namespace import DEFAULT_SEED, reset_namespace
from bench.report import format_percent, format_speedup, markdown_table, section_head
from bench.workloads import ImportWorkload, OrdersWorkload, ScoresWorkload, ViewsWorkload, Workload
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService

# The operations the write-up compares, by the name the command takes.
WORKLOADS: dict[str, type[Workload]] = {
    "views": ViewsWorkload,
    "scores": ScoresWorkload,
    "orders": OrdersWorkload,
    "products": ImportWorkload,
}
OPERATIONS: tuple[str, ...] = tuple(WORKLOADS)

Progress = Callable[[str], None]


def percent_less(naive: float, optimized: float) -> float | None:
    """``(1 - optimized / naive) * 100``; None when there is nothing to compare against."""
    if naive <= 0:
        return None
    return (1 - optimized / naive) * 100


@dataclass(frozen=True, slots=True)
class Comparison:
    """One operation run naive then optimized on the same workload; each one's fastest run."""

    operation: str
    records: int
    naive: BatchResult
    optimized: BatchResult
    naive_state: dict[str, Any]
    optimized_state: dict[str, Any]
    # Every run of both variants ended in the same state.
    states_match: bool
    runs: int = 1

    @property
    def query_reduction(self) -> float | None:
        return percent_less(self.naive.query_count, self.optimized.query_count)

    @property
    def time_improvement(self) -> float | None:
        return percent_less(self.naive.duration, self.optimized.duration)

    @property
    def speedup(self) -> float | None:
        if self.optimized.duration <= 0:
            return None
        return self.naive.duration / self.optimized.duration

    @property
    def completed(self) -> bool:
        """Both runs took every row: a skipped row would make the comparison unfair."""
        done = BatchProcessingLog.Status.COMPLETED
        return self.naive.status == done and self.optimized.status == done

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "records": self.records,
            "queries_naive": self.naive.query_count,
            "queries_optimized": self.optimized.query_count,
            "query_reduction_percent": self.query_reduction,
            "time_naive_seconds": self.naive.duration,
            "time_optimized_seconds": self.optimized.duration,
            "time_improvement_percent": self.time_improvement,
            "speedup": self.speedup,
            "naive_log_id": self.naive.log_id,
            "optimized_log_id": self.optimized.log_id,
            "naive_status": self.naive.status,
            "optimized_status": self.optimized.status,
            "states_match": self.states_match,
            "runs": self.runs,
        }


def compare(
    operation: str,
    *,
    size: int,
    chunk_size: int,
    seed: int = DEFAULT_SEED,
    using: str = DEFAULT_DB_ALIAS,
    work_dir: Path,
    repeat: int = 1,
    progress: Progress | None = None,
) -> Comparison:
    """Run ``operation`` naive, then optimized, each from the same base state.

    ``repeat`` times, taking turns; each variant's fastest run counts.
    """
    workload = WORKLOADS[operation](
        size, seed=seed, chunk_size=chunk_size, using=using, work_dir=work_dir
    )
    services = (
        NaiveBulkOperationsService(using=using),
        OptimizedBulkOperationsService(using=using),
    )
    runs: list[list[tuple[BatchResult, dict[str, Any]]]] = [[], []]
    for _ in range(repeat):
        for service, outcomes in zip(services, runs, strict=True):
            workload.setup()
            workload.prepare()
            result = workload.run_service(service, chunk_size)
            if progress is not None:
                progress(
                    f"{operation} ({service.variant}): {result.written} written, "
                    f"{result.query_count} queries, {result.duration:.3f}s "
                    f"(log #{result.log_id})"
                )
            outcomes.append((result, workload.snapshot()))
    (naive, naive_state), (optimized, optimized_state) = (
        min(outcomes, key=lambda outcome: outcome[0].duration) for outcomes in runs
    )
    states = [state for outcomes in runs for _, state in outcomes]
    return Comparison(
        operation,
        size,
        naive,
        optimized,
        naive_state,
        optimized_state,
        states_match=all(state == states[0] for state in states),
        runs=repeat,
    )


def run_benchmark(
    sizes: Mapping[str, int],
    *,
    chunk_size: int,
    seed: int = DEFAULT_SEED,
    using: str = DEFAULT_DB_ALIAS,
    keep_data: bool = False,
    repeat: int = 1,
    progress: Progress | None = None,
) -> list[Comparison]:
    """Compare each operation at its size; afterwards remove the namespace unless ``keep_data``.

    With ``keep_data`` the database is left as the last optimized run made
    it, to inspect; otherwise the demo shop shows no benchmark rows. The
    import's CSV file lives in a temporary directory.
    """
    with tempfile.TemporaryDirectory(prefix="bench-writeup-") as work_dir:
        comparisons = [
            compare(
                operation,
                size=size,
                chunk_size=chunk_size,
                seed=seed,
                using=using,
                work_dir=Path(work_dir),
                repeat=repeat,
                progress=progress,
            )
            for operation, size in sizes.items()
        ]
    if not keep_data:
        reset_namespace(using)
    return comparisons


# -- reports -------------------------------------------------------------------

TITLE = "The naive and the optimized service on the same rows"

COLUMNS = (
    "Operation",
    "Records",
    "Queries (naive)",
    "Queries (optimized)",
    "Query reduction",
    "Time (naive)",
    "Time (optimized)",
    "Time improvement",
    "Speedup",
)


def table_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    return [
        (
            comparison.operation,
            str(comparison.records),
            str(comparison.naive.query_count),
            str(comparison.optimized.query_count),
            format_percent(comparison.query_reduction),
            f"{comparison.naive.duration:.3f}s",
            f"{comparison.optimized.duration:.3f}s",
            format_percent(comparison.time_improvement),
            format_speedup(comparison.speedup),
        )
        for comparison in comparisons
    ]


def text_table(comparisons: Sequence[Comparison]) -> str:
    """A plain table: operation left-aligned, figures right-aligned."""
    rows = [COLUMNS, *table_rows(comparisons)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells.extend(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join(
        [line(rows[0]), "  ".join("-" * width for width in widths)]
        + [line(row) for row in rows[1:]]
    )


def markdown_report(comparisons: Sequence[Comparison], *, command_line: str) -> str:
    """A BENCHMARKS.md section: its head (``section_head``), then the table."""
    runs = max((comparison.runs for comparison in comparisons), default=1)
    method = (
        [
            f"Each time is the fastest of {runs} runs of its service, the two services "
            "taking turns, every run from the same starting state.",
            "",
        ]
        if runs > 1
        else []
    )
    sizes = ", ".join(f"{c.records} {c.operation}" for c in comparisons)
    return "\n".join(
        [
            *section_head(f"{TITLE}: {sizes}", command_line),
            *method,
            *markdown_table(COLUMNS, "l" + "r" * (len(COLUMNS) - 1), table_rows(comparisons)),
        ]
    )
