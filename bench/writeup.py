"""The benchmark behind ``manage.py test_bulk_performance``: naive against optimized.

Both services' same method runs on a workload of ``bench.workloads``, each from a fresh
base state, ``repeat`` times taking turns; each variant's fastest run counts and every
run must end in the same logical state. Times and query counts are the ``BatchResult``'s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from django.db import DEFAULT_DB_ALIAS

from batching.engine import BatchResult
from batching.models import BatchProcessingLog
from bench.namespace import DEFAULT_SEED, reset_namespace
from bench.report import format_ratio, markdown_table, section_head, take_turns, text_table
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
TITLE = "The naive and the optimized service on the same rows"
COLUMNS = ("Operation", "Records", "Queries (naive)", "Queries (optimized)", "Query reduction",
           "Time (naive)", "Time (optimized)", "Time improvement", "Speedup")  # fmt: skip


def percent_less(naive: float, optimized: float) -> float | None:
    return (1 - optimized / naive) * 100 if naive > 0 else None


@dataclass(frozen=True, slots=True)
class Comparison:
    """One operation run naive then optimized on the same workload; each one's fastest run."""

    operation: str
    records: int
    naive: BatchResult
    optimized: BatchResult
    naive_state: dict[str, Any]
    optimized_state: dict[str, Any]
    states_match: bool  # every run of both variants ended in the same state
    runs: int = 1

    @property
    def query_reduction(self) -> float | None:
        return percent_less(self.naive.query_count, self.optimized.query_count)

    @property
    def time_improvement(self) -> float | None:
        return percent_less(self.naive.duration, self.optimized.duration)

    @property
    def speedup(self) -> float | None:
        optimized = self.optimized.duration
        return self.naive.duration / optimized if optimized > 0 else None

    @property
    def completed(self) -> bool:
        """Both runs took every row: a skipped row would make the comparison unfair."""
        done = BatchProcessingLog.Status.COMPLETED
        return self.naive.status == done and self.optimized.status == done

    def as_dict(self) -> dict[str, Any]:
        naive, optimized = self.naive, self.optimized
        return {
            "operation": self.operation,
            "records": self.records,
            "queries_naive": naive.query_count,
            "queries_optimized": optimized.query_count,
            "query_reduction_percent": self.query_reduction,
            "time_naive_seconds": naive.duration,
            "time_optimized_seconds": optimized.duration,
            "time_improvement_percent": self.time_improvement,
            "speedup": self.speedup,
            "naive_log_id": naive.log_id,
            "optimized_log_id": optimized.log_id,
            "naive_status": naive.status,
            "optimized_status": optimized.status,
            "states_match": self.states_match,
            "runs": self.runs,
        }

    def cells(self) -> tuple[str, ...]:
        naive, optimized = self.naive, self.optimized
        queries = (str(self.records), str(naive.query_count), str(optimized.query_count))
        times = (f"{naive.duration:.3f}s", f"{optimized.duration:.3f}s")
        reduction = format_ratio(self.query_reduction, ".1f", "%")
        improvement = format_ratio(self.time_improvement, ".1f", "%")
        speedup = format_ratio(self.speedup, ".1f")
        return (self.operation, *queries, reduction, *times, improvement, speedup)


def compare(
    operation: str,
    *,
    size: int,
    chunk_size: int,
    seed: int = DEFAULT_SEED,
    using: str = DEFAULT_DB_ALIAS,
    work_dir: Path,
    repeat: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run ``operation`` naive, then optimized, each from the same base state, ``repeat``
    times taking turns; each variant's fastest run counts."""
    workload = WORKLOADS[operation](
        size, seed=seed, chunk_size=chunk_size, using=using, work_dir=work_dir
    )

    def run(service: Any) -> tuple[BatchResult, dict[str, Any]]:
        workload.setup()
        workload.prepare()
        result = workload.run_service(service, chunk_size)
        if progress is not None:
            progress(
                f"{operation} ({service.variant}): {result.written} written, "
                f"{result.query_count} queries, {result.duration:.3f}s (log #{result.log_id})"
            )
        return result, workload.snapshot()

    services = (NaiveBulkOperationsService, OptimizedBulkOperationsService)
    runs = take_turns({s.variant: partial(run, s(using=using)) for s in services}, repeat)
    (naive, naive_state), (optimized, optimized_state) = (
        min(outcomes, key=lambda outcome: outcome[0].duration) for outcomes in runs.values()
    )
    states = [state for outcomes in runs.values() for _, state in outcomes]
    match = all(state == states[0] for state in states)
    return Comparison(
        operation=operation,
        records=size,
        naive=naive,
        optimized=optimized,
        naive_state=naive_state,
        optimized_state=optimized_state,
        states_match=match,
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
    progress: Callable[[str], None] | None = None,
) -> list[Comparison]:
    """Compare each operation at its size; then remove the namespace, unless ``keep_data``
    (the database left as the last optimized run made it)."""
    with tempfile.TemporaryDirectory(prefix="bench-writeup-") as work_dir:
        run = partial(compare, chunk_size=chunk_size, seed=seed, using=using, repeat=repeat)
        comparisons = [
            run(name, size=size, work_dir=Path(work_dir), progress=progress)
            for name, size in sizes.items()
        ]
    if not keep_data:
        reset_namespace(using)
    return comparisons


def text_report(comparisons: Sequence[Comparison]) -> str:
    return text_table(COLUMNS, [comparison.cells() for comparison in comparisons])


def markdown_report(comparisons: Sequence[Comparison], *, command_line: str) -> str:
    """A BENCHMARKS.md section: its head (``section_head``), then the table."""
    runs = max((comparison.runs for comparison in comparisons), default=1)
    method = [
        f"Each time is the fastest of {runs} runs of its service, the two services "
        "taking turns, every run from the same starting state.",
        "",
    ]
    sizes = ", ".join(f"{c.records} {c.operation}" for c in comparisons)
    table = markdown_table(
        COLUMNS, "l" + "r" * (len(COLUMNS) - 1), [c.cells() for c in comparisons]
    )
    return "\n".join(
        [*section_head(f"{TITLE}: {sizes}", command_line), *(method if runs > 1 else []), *table]
    )
