"""/metrics (Prometheus text, read from the database) and /health."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import OperationalError
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from api.health import CHECKS
from batching.models import BatchProcessingLog
from jobs.models import JobPartition
from jobs.services import submit_job
from tests.factories import BatchProcessingLogFactory

pytestmark = pytest.mark.django_db

METRICS_QUERIES = 2  # one grouped aggregate over the logs, one count of jobs by status


def scrape(client=None, **extra) -> dict[tuple[str, tuple], float]:
    response = (client or Client()).get("/metrics", **extra)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def labels(**pairs) -> tuple:
    return tuple(sorted(pairs.items()))


class TestMetrics:
    def test_figures_come_from_the_logs(self, django_assert_num_queries):
        finished = datetime(2026, 1, 1, 12, tzinfo=UTC)
        BatchProcessingLogFactory(
            checkpoint_position=10, rows_written=10, duration_seconds=0.2, finished_at=finished
        )
        BatchProcessingLogFactory(
            status="partial",
            checkpoint_position=10,
            rows_written=7,
            rows_skipped=3,
            duration_seconds=3.0,
            finished_at=finished + timedelta(hours=1),
            chunks_rolled_back=2,
        )
        BatchProcessingLogFactory(
            status="failed",
            checkpoint_position=10,
            rows_written=4,
            rows_skipped=1,
            chunks_retried=3,
            chunks_rolled_back=4,
            duration_seconds=40.0,
            finished_at=finished + timedelta(hours=2),
        )
        BatchProcessingLogFactory(operation="products", variant="naive", status="running")
        for _ in range(4):
            submit_job(operation="orders", rows=[{}])
        with django_assert_num_queries(METRICS_QUERIES):
            samples = scrape()
        orders = {"operation": "orders", "variant": "optimized"}
        for status, count in (("completed", 1), ("partial", 1), ("failed", 1)):
            assert samples[("shop_batch_runs_total", labels(**orders, status=status))] == count
        assert (
            samples[
                (
                    "shop_batch_runs_total",
                    labels(operation="products", variant="naive", status="running"),
                )
            ]
            == 1
        )
        for outcome, rows in (("written", 21), ("skipped", 4), ("failed", 5)):
            assert samples[("shop_batch_rows_total", labels(**orders, outcome=outcome))] == rows
        assert samples[("shop_batch_chunks_rolled_back_total", labels(**orders))] == 6
        assert samples[("shop_batch_chunks_retried_total", labels(**orders))] == 3
        bucket = "shop_batch_run_duration_seconds_bucket"
        assert samples[(bucket, labels(**orders, le="0.25"))] == 1
        assert samples[(bucket, labels(**orders, le="5.0"))] == 2
        assert samples[(bucket, labels(**orders, le="30.0"))] == 2
        assert samples[(bucket, labels(**orders, le="+Inf"))] == 3
        assert samples[("shop_batch_run_duration_seconds_count", labels(**orders))] == 3
        assert samples[("shop_batch_run_duration_seconds_sum", labels(**orders))] == 43.2
        # The failed run finished last; the partial one is the last success.
        last = samples[("shop_batch_last_success_timestamp_seconds", labels(operation="orders"))]
        assert last == (finished + timedelta(hours=1)).timestamp()
        assert ("shop_batch_last_success_timestamp_seconds", labels(operation="products")) not in (
            samples
        )
        assert samples[("shop_jobs", labels(status="queued"))] == 4
        assert samples[("shop_jobs", labels(status="running"))] == 0

    def test_queries_do_not_grow_with_runs(self, django_assert_num_queries):
        for operation in BatchProcessingLog.Operation.values:
            for status in BatchProcessingLog.Status.values:
                BatchProcessingLogFactory(operation=operation, status=status)
        with django_assert_num_queries(METRICS_QUERIES):
            samples = scrape()
        runs = [value for (name, _), value in samples.items() if name == "shop_batch_runs_total"]
        assert len(runs) == len(BatchProcessingLog.Operation) * len(BatchProcessingLog.Status)

    def test_token_when_configured(self, settings):
        settings.METRICS_TOKEN = "scrape-me"
        refused = Client().get("/metrics")
        assert refused.status_code == 401
        assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
        assert scrape(HTTP_AUTHORIZATION="Bearer scrape-me") is not None


class TestHealth:
    def test_healthy(self, django_assert_num_queries):
        # SELECT 1; the oldest queued partition (there is none).
        with django_assert_num_queries(2):
            response = Client().get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["failing"] == []
        assert set(body["checks"]) == {"database", "cache", "worker"}
        assert all(check["ok"] for check in body["checks"].values())

    @pytest.mark.parametrize("part", ["database", "cache"])
    def test_a_failing_part_is_named(self, part, monkeypatch):
        def broken():
            raise OperationalError("connection refused by secret-host:5432")

        monkeypatch.setitem(CHECKS, part, broken)
        response = Client().get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"
        assert body["failing"] == [part]
        assert body["checks"][part] == {"ok": False, "detail": "OperationalError: unavailable"}
        assert "secret-host" not in response.content.decode()

    def test_work_waiting_without_a_worker(self, settings):
        job = submit_job(operation="orders", rows=[{}])
        old = timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 60)
        JobPartition.objects.filter(job=job).update(queued_at=old)
        response = Client().get("/health")
        assert response.status_code == 503
        assert response.json()["failing"] == ["worker"]
        assert "db_worker" in response.json()["checks"]["worker"]["detail"]

    def test_cache_that_loses_values(self, settings):
        # Django's setting_changed handler swaps the cache for this test.
        settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}}
        response = Client().get("/health")
        assert response.status_code == 503
        assert response.json()["failing"] == ["cache"]
