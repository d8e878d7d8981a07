"""``/metrics``: Prometheus text, aggregated from the log and job tables at scrape time in
two queries (docs/api.md)."""

from __future__ import annotations

import hmac
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Max, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from batching.models import BatchProcessingLog
from jobs.models import Job

Log = BatchProcessingLog
Status = Log.Status

# Run duration buckets, in seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# A run that finished without failing: some rows may have been skipped.
SUCCEEDED = (Status.COMPLETED, Status.PARTIAL)
# Runs whose unprocessed rows count as failed.
STOPPED = (Status.FAILED, Status.INTERRUPTED)
JOB_STATES = (Job.Status.QUEUED, Job.Status.RUNNING)
UNAUTHORIZED = "metrics need Authorization: Bearer <METRICS_TOKEN>"
# The per-variant counters of chunks: (metric, help, the group's figure).
CHUNK_COUNTERS = (
    ("shop_batch_chunks_rolled_back", "Chunk transactions rolled back.", "rolled_back"),
    ("shop_batch_chunks_retried", "Chunks retried after a transient failure.", "retried"),
    (
        "shop_batch_after_commit_failures",
        "Side effects of committed chunks (cache invalidation) that failed; "
        "the chunks stayed committed.",
        "after_commit_failures",
    ),
)
OUTCOMES = ("written", "skipped", "failed")
LABELS = ["operation", "variant"]
# Summed per (operation, variant), with the duration buckets.
SUMMED = (*OUTCOMES, *(figure for *_, figure in CHUNK_COUNTERS), "finished_runs", "duration_sum")


class BatchCollector(Collector):
    """Collects the batch and job metrics from the database on each scrape."""

    def collect(self) -> Iterator[Metric]:
        yield from self._runs()
        yield self._jobs()

    def _runs(self) -> Iterator[Metric]:
        finished = Q(duration_seconds__isnull=False, finished_at__isnull=False)
        buckets = {
            f"le_{i}": Count("id", filter=finished & Q(duration_seconds__lte=bound))
            for i, bound in enumerate(DURATION_BUCKETS)
        }
        groups: Iterable[Mapping[str, Any]] = (
            Log.objects.order_by()
            .values("operation", "variant", "status")
            .annotate(
                runs=Count("id"),
                written=Sum("rows_written"),
                skipped=Sum("rows_skipped"),
                failed=Sum(
                    F("checkpoint_position") - F("rows_written") - F("rows_skipped"),
                    filter=Q(status__in=STOPPED),
                ),
                rolled_back=Sum("chunks_rolled_back"),
                retried=Sum("chunks_retried"),
                after_commit_failures=Sum("after_commit_failures"),
                finished_runs=Count("id", filter=finished),
                duration_sum=Sum("duration_seconds", filter=finished),
                last_success=Max("finished_at", filter=Q(status__in=SUCCEEDED)),
                **buckets,
            )
        )
        runs = CounterMetricFamily(
            "shop_batch_runs",
            "Batch runs by operation, variant and status.",
            labels=[*LABELS, "status"],
        )
        rows = CounterMetricFamily(
            "shop_batch_rows",
            "Rows by outcome: written, skipped (rejected rows), failed "
            "(read by a run that failed or was interrupted, neither written nor skipped).",
            labels=[*LABELS, "outcome"],
        )
        counters = [
            CounterMetricFamily(name, text, labels=LABELS) for name, text, _ in CHUNK_COUNTERS
        ]
        duration = HistogramMetricFamily(
            "shop_batch_run_duration_seconds", "Duration of finished batch runs.", labels=LABELS
        )
        last_success = GaugeMetricFamily(
            "shop_batch_last_success_timestamp_seconds",
            "When the last completed or partial run of each operation finished (Unix time).",
            labels=["operation"],
        )
        per_variant: dict[tuple[str, str], dict[str, float]] = {}
        latest: dict[str, float] = {}
        for group in groups:
            operation, variant = group["operation"], group["variant"]
            runs.add_metric([operation, variant, group["status"]], group["runs"])
            totals = per_variant.setdefault((operation, variant), defaultdict(float))
            for name in (*SUMMED, *buckets):
                totals[name] += max(group[name] or 0, 0)
            if group["last_success"] is not None:
                stamp = group["last_success"].timestamp()
                latest[operation] = max(latest.get(operation, 0.0), stamp)
        for (operation, variant), totals in sorted(per_variant.items()):
            for outcome in OUTCOMES:
                rows.add_metric([operation, variant, outcome], totals[outcome])
            for counter, (*_, figure) in zip(counters, CHUNK_COUNTERS, strict=True):
                counter.add_metric([operation, variant], totals[figure])
            cumulative = [
                (str(bound), totals[f"le_{i}"]) for i, bound in enumerate(DURATION_BUCKETS)
            ]
            cumulative.append(("+Inf", totals["finished_runs"]))
            duration.add_metric([operation, variant], cumulative, totals["duration_sum"])
        for operation, stamp in sorted(latest.items()):
            last_success.add_metric([operation], stamp)
        yield from (runs, rows, *counters, duration, last_success)

    def _jobs(self) -> Metric:
        jobs = GaugeMetricFamily(
            "shop_jobs", "Background jobs waiting or running.", labels=["status"]
        )
        counts: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        by_status = Job.objects.order_by().filter(status__in=JOB_STATES).values("status")
        counts.update(by_status.annotate(count=Count("pk")).values_list("status", "count"))
        for status, count in counts.items():
            jobs.add_metric([status], count)
        return jobs


registry = CollectorRegistry(auto_describe=False)
registry.register(BatchCollector())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    expected = settings.METRICS_TOKEN
    if expected:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {expected}".encode()):
            response = HttpResponse(UNAUTHORIZED, status=401, content_type="text/plain")
            response["WWW-Authenticate"] = "Bearer"
            return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
