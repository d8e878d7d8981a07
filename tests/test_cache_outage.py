"""A cache that is down never fails or repeats a committed write.

The cache here is a Redis on a port nothing listens on: every call fails at
once. The tests commit for real (``transaction=True``), so the invalidations
run after COMMIT as they do in production.
"""

from __future__ import annotations

import socket

import pytest
from django.db.models import Sum
from django.test import Client

from api.models import ApiToken, IdempotencyRecord
from batching.models import BatchProcessingLog
from products import cache as product_cache
from products.models import Product, ProductView
from products.services.optimized import OptimizedProducts, OptimizedViews
from tests.factories import StaffFactory
from tests.test_admin_import import PRODUCTS_CSV, detail_url, upload
from tests.test_api import post_views
from tests.test_services import order_rows, product_rows, score_rows, view_rows
from tests.test_services import shop as shop_fixture

pytestmark = pytest.mark.django_db(transaction=True)
shop = shop_fixture

Status = BatchProcessingLog.Status

METHODS = {
    "views": "create_product_views",
    "scores": "upsert_recommendation_scores",
    "products": "import_products",
    "orders": "process_orders",
}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def redis_down(settings):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{closed_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 0.5},
        }
    }


@pytest.fixture(autouse=True)
def _empty_cache():
    """Overrides the suite's cache.clear(): here the cache cannot be reached."""
    yield


@pytest.fixture
def api():
    _, secret = ApiToken.issue(StaffFactory(), name="tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}", raise_request_exception=False)


@pytest.fixture
def admin_client(client, settings, tmp_path):
    settings.ADMIN_IMPORT_DIR = tmp_path / "imports"
    client.force_login(StaffFactory())
    return client


def rows_for(operation: str, shop) -> list[dict]:
    return {
        "views": lambda: view_rows(shop, 10),
        "scores": lambda: score_rows(shop, 10),
        "products": lambda: product_rows(10),
        "orders": lambda: order_rows(shop, 4),
    }[operation]()


def failing_in_chunk_2(monkeypatch, operation: type) -> None:
    """``operation.write`` raises an unexpected error on its second call."""
    calls = []
    write = operation.write

    def failing(self, rows, run):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("injected fault in chunk 2")
        return write(self, rows, run)

    monkeypatch.setattr(operation, "write", failing)


@pytest.mark.parametrize("operation", sorted(METHODS))
def test_every_write_commits_and_counts_the_failed_invalidation(
    redis_down, shop, service, operation
):
    rows = rows_for(operation, shop)
    result = getattr(service, METHODS[operation])(rows, chunk_size=3)

    # An order of 3 lines fills a chunk of 3 on its own.
    chunks = len(rows) if operation == "orders" else -(-len(rows) // 3)
    assert (result.status, result.written, result.skipped) == ("completed", len(rows), 0)
    log = BatchProcessingLog.objects.get()
    assert (log.status, log.rows_written, log.checkpoint_position) == (
        Status.COMPLETED,
        len(rows),
        len(rows),
    )
    assert (log.chunks_committed, log.after_commit_failures) == (chunks, chunks)


def test_views_count_once_when_the_cache_is_down(redis_down, shop, optimized):
    optimized.create_product_views(view_rows(shop, 10))

    assert ProductView.objects.count() == 10
    assert Product.objects.aggregate(total=Sum("view_count"))["total"] == 10


def test_a_batch_retried_during_an_outage_is_written_once(redis_down, shop, api):
    """The fault as found: three sends of one batch with one key wrote it three times."""
    rows = view_rows(shop, 10)

    answers = [post_views(api, rows, HTTP_IDEMPOTENCY_KEY="outage") for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].json()["written"] == 10
    assert ProductView.objects.count() == 10
    assert Product.objects.aggregate(total=Sum("view_count"))["total"] == 10
    assert IdempotencyRecord.objects.get().status_code == 200
    log = BatchProcessingLog.objects.get()
    assert (log.status, log.rows_written, log.checkpoint_position) == (Status.COMPLETED, 10, 10)


def test_an_import_confirmed_three_times_during_an_outage_imports_once(redis_down, admin_client):
    url = detail_url(upload(admin_client, PRODUCTS_CSV))

    for _ in range(3):
        assert admin_client.post(url).status_code == 302

    assert BatchProcessingLog.objects.count() == 1
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["NEW-1", "NEW-2", "OLD-1"]


def test_reads_fall_back_to_the_database(redis_down, shop, client, django_assert_num_queries):
    ids = [product.pk for product in shop["products"]]
    with django_assert_num_queries(1):
        cards = product_cache.get_product_cards(ids)
    assert sorted(cards) == sorted(ids)
    client.force_login(StaffFactory())
    assert client.get("/products/").status_code == 200


def test_health_reports_the_cache_and_metrics_count_the_failures(redis_down, shop, optimized):
    optimized.create_product_views(view_rows(shop, 4), chunk_size=2)

    health = Client().get("/health")
    assert health.status_code == 503
    assert health.json()["checks"]["cache"]["ok"] is False
    metrics = Client().get("/metrics").content.decode()
    expected = (
        'shop_batch_after_commit_failures_total{operation="product_views",variant="optimized"} 2.0'
    )
    assert expected in metrics


# -- a run that raises after some chunks committed -------------------------------------


def test_a_key_is_kept_once_a_failing_run_committed_rows(shop, api, settings, monkeypatch):
    """A retry must not write the committed chunk again: it gets the first answer."""
    failing_in_chunk_2(monkeypatch, OptimizedViews)
    settings.BULK_CHUNK_SIZE = 4
    rows = view_rows(shop, 10)

    first = post_views(api, rows, HTTP_IDEMPOTENCY_KEY="half")
    again = post_views(api, rows, HTTP_IDEMPOTENCY_KEY="half")

    log = BatchProcessingLog.objects.get()
    assert (log.status, log.checkpoint_position, log.rows_written) == (Status.FAILED, 4, 4)
    assert first.status_code == again.status_code == 500
    assert first.json() == again.json()
    assert first.json()["log_id"] == log.pk
    assert "failed after committing 4 of its rows" in first.json()["detail"]
    assert ProductView.objects.count() == 4


def test_an_import_that_failed_after_committing_rows_keeps_its_claim(
    admin_client, settings, monkeypatch
):
    failing_in_chunk_2(monkeypatch, OptimizedProducts)
    settings.BULK_CHUNK_SIZE = 2
    url = detail_url(upload(admin_client, PRODUCTS_CSV))

    assert admin_client.post(url).status_code == 302
    assert admin_client.post(url).status_code == 302

    log = BatchProcessingLog.objects.get()
    assert (log.status, log.rows_written) == (Status.FAILED, 2)
    page = admin_client.get(url)
    assert page.context["staged"].result["status"] == "failed"
    assert "injected fault in chunk 2" in page.content.decode()
    assert Product.objects.count() == 2


def test_a_failed_run_records_only_what_it_committed(shop, optimized, monkeypatch):
    """The rows of the chunk that failed are neither read nor skipped in the log."""
    failing_in_chunk_2(monkeypatch, OptimizedViews)
    rows = view_rows(shop, 8)
    rows[1]["user_id"] = "not a number"  # chunk 1: skipped and committed
    rows[5]["user_id"] = "not a number"  # chunk 2: rolled back with it

    with pytest.raises(RuntimeError, match="injected fault"):
        optimized.create_product_views(rows, chunk_size=4)

    log = BatchProcessingLog.objects.get()
    assert (log.rows_read, log.rows_written, log.rows_skipped) == (4, 3, 1)
    assert [error["index"] for error in log.row_errors] == [1]
    resumed = optimized.create_product_views(rows, resume=log.pk)
    assert (resumed.read, resumed.written, resumed.skipped) == (8, 6, 2)
    assert ProductView.objects.count() == 6
