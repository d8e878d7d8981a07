"""Figures for the batch-run dashboard: three aggregate queries, whatever the number of runs.

One row per operation and variant, the ``SLOWEST`` runs, and the latest
``MAX_POINTS`` finished runs (so the page stays small) for the server-drawn charts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Avg, Count, Q, QuerySet, Sum
from django.utils import timezone
from django.utils.safestring import SafeString

from batching.models import BatchProcessingLog as Log
from common.charts import bar_chart, line_chart

MAX_POINTS = 1000
SLOWEST = 10
VARIANTS = [Log.Variant.NAIVE, Log.Variant.OPTIMIZED]


@dataclass(frozen=True)
class OperationSummary:
    """One operation run by one variant over the period."""

    operation: str
    operation_label: str
    variant: str
    variant_label: str
    runs: int
    failed: int
    partial: int
    interrupted: int
    rows_read: int
    rows_skipped: int
    mean_rows_per_second: float | None
    mean_duration: float | None

    @property
    def failure_rate(self) -> float:
        return self.failed / self.runs if self.runs else 0.0

    @property
    def skip_rate(self) -> float:
        return self.rows_skipped / self.rows_read if self.rows_read else 0.0

    @property
    def failure_percent(self) -> float:
        return 100 * self.failure_rate

    @property
    def skip_percent(self) -> float:
        return 100 * self.skip_rate


@dataclass(frozen=True)
class OperationCharts:
    operation: str
    throughput: SafeString
    duration: SafeString


@dataclass
class Dashboard:
    days: int | None
    summaries: list[OperationSummary] = field(default_factory=list)
    slowest: list[Log] = field(default_factory=list)
    points: int = 0
    points_capped: bool = False
    throughput_chart: SafeString | None = None
    duration_chart: SafeString | None = None
    operation_charts: list[OperationCharts] = field(default_factory=list)


def build_dashboard(*, days: int | None = None) -> Dashboard:
    """The dashboard of the runs started in the last ``days`` days (None: all runs)."""
    runs = Log.objects.all()
    if days:
        runs = runs.filter(started_at__gte=timezone.now() - timedelta(days=days))
    dashboard = Dashboard(days=days, summaries=summarise(runs))
    dashboard.slowest = list(
        runs.filter(duration_seconds__isnull=False)
        .defer("row_errors", "error_summary")
        .order_by("-duration_seconds", "-id")[:SLOWEST]
    )
    # Not "throughput": an annotation does not take a model attribute's name.
    points = list(
        runs.filter(finished_at__isnull=False)
        .annotate(per_second=Log.throughput())
        .filter(per_second__isnull=False)
        .order_by("-started_at", "-id")
        .values_list("operation", "variant", "started_at", "per_second", "duration_seconds")[
            : MAX_POINTS + 1
        ]
    )
    dashboard.points_capped = len(points) > MAX_POINTS
    points = points[:MAX_POINTS]
    dashboard.points = len(points)
    draw(dashboard, points)
    return dashboard


def summarise(runs: QuerySet[Log]) -> list[OperationSummary]:
    rows = (
        runs.order_by()
        .values("operation", "variant")
        .annotate(
            runs=Count("pk"),
            failed=Count("pk", filter=Q(status=Log.Status.FAILED)),
            partial=Count("pk", filter=Q(status=Log.Status.PARTIAL)),
            interrupted=Count("pk", filter=Q(status=Log.Status.INTERRUPTED)),
            # Not "rows_read": an annotation does not take a model attribute's name.
            read=Sum("checkpoint_position"),
            rows_skipped=Sum("rows_skipped"),
            mean_rows_per_second=Avg(Log.throughput(), filter=Q(finished_at__isnull=False)),
            mean_duration=Avg("duration_seconds"),
        )
    )
    operations = dict(Log.Operation.choices)
    variants = dict(Log.Variant.choices)
    order = {value: index for index, value in enumerate(operations)}
    summaries = [
        OperationSummary(
            operation=row["operation"],
            operation_label=operations.get(row["operation"], row["operation"]),
            variant=row["variant"],
            variant_label=variants.get(row["variant"], row["variant"]),
            runs=row["runs"],
            failed=row["failed"],
            partial=row["partial"],
            interrupted=row["interrupted"],
            rows_read=row["read"],
            rows_skipped=row["rows_skipped"],
            mean_rows_per_second=row["mean_rows_per_second"],
            mean_duration=row["mean_duration"],
        )
        for row in rows
    ]
    return sorted(
        summaries, key=lambda s: (order.get(s.operation, len(order)), s.operation, s.variant)
    )


def draw(dashboard: Dashboard, points: list[tuple]) -> None:
    """The summary bar charts and, per operation, rows/s and duration over time."""
    operations = dict(Log.Operation.choices)
    seen = {s.operation for s in dashboard.summaries}
    shown = [op for op in operations if op in seen]
    shown += sorted(seen - set(operations))
    by_key = {(s.operation, s.variant): s for s in dashboard.summaries}
    variant_labels = dict(Log.Variant.choices)
    groups = [operations.get(op, op) for op in shown]

    def bars(attribute: str, title: str, y_label: str) -> SafeString:
        series = {
            variant_labels[v]: [
                getattr(by_key[(op, v)], attribute) if (op, v) in by_key else None for op in shown
            ]
            for v in VARIANTS
        }
        return bar_chart(groups, series, title=title, y_label=y_label, log_scale=True)

    dashboard.throughput_chart = bars(
        "mean_rows_per_second", "Mean rows per second by operation", "rows per second"
    )
    dashboard.duration_chart = bars("mean_duration", "Mean duration by operation", "seconds")

    over_time: dict[str, dict[str, dict[str, list]]] = defaultdict(
        lambda: {"throughput": defaultdict(list), "duration": defaultdict(list)}
    )
    zone = timezone.get_current_timezone()
    for operation, variant, started_at, rows_per_second, duration in points:
        label = variant_labels.get(variant, variant)
        moment = started_at.astimezone(zone)
        over_time[operation]["throughput"][label].append((moment, rows_per_second))
        over_time[operation]["duration"][label].append((moment, duration))

    def lines(series: dict[str, list], title: str, y_label: str) -> SafeString:
        # Naive first, optimized second, so each variant keeps its colour on every chart.
        ordered = {label: series.get(label, []) for _, label in Log.Variant.choices} | series
        return line_chart(
            ordered, title=title, y_label=y_label, log_scale=True, width=560, height=280
        )

    for operation in (op for op in shown if op in over_time):
        name, series = operations.get(operation, operation), over_time[operation]
        throughput = lines(series["throughput"], f"{name}: rows per second", "rows per second")
        duration = lines(series["duration"], f"{name}: duration", "seconds")
        dashboard.operation_charts.append(OperationCharts(operation, throughput, duration))
