"""A bulk run never stalls the live shop: locks late and short, bounded waits.

PostgreSQL only: row locks seen from a second session. The tests commit for
real (``transaction=True``): a second session sees only committed rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from django.db import connection
from django.db.models import Sum

from batching.models import BatchProcessingLog
from orders.models import OrderItem
from products.models import Product, ProductView
from products.services import optimized as optimized_module
from tests.concurrency_helpers import live_session, record_sleeps, require_postgresql
from tests.test_services import order_rows, view_rows
from tests.test_services import shop as shop_fixture

pytestmark = pytest.mark.django_db(transaction=True)
shop = shop_fixture

LOCKED = "55P03"  # lock_not_available


@pytest.fixture(autouse=True)
def _postgresql_only():
    require_postgresql()


def can_lock(product_id: int) -> bool:
    """Whether a checkout or a price save could lock the product at once.

    Their UPDATE of stock or price takes the row's ``FOR NO KEY UPDATE``
    lock. The foreign-key checks of the views and order lines a chunk writes
    take ``FOR KEY SHARE``, which does not stand in its way.
    """
    with live_session() as session:
        try:
            session.execute(
                "SELECT 1 FROM products_product WHERE id = %s FOR NO KEY UPDATE NOWAIT",
                [product_id],
            )
        except psycopg.errors.LockNotAvailable:
            return False
        finally:
            session.rollback()
    return True


def watch_the_last_statement(
    monkeypatch, seen: list[tuple[str, bool, int]], written: Callable[[], int]
) -> None:
    """Before and after the statement that changes products, probe their lock and count
    the chunk's own rows written so far."""
    add_to = optimized_module.add_to

    def probed(model, field, amounts, **kwargs):
        product = min(amounts)
        seen.append(("before", can_lock(product), written()))
        changed = add_to(model, field, amounts, **kwargs)
        seen.append(("after", can_lock(product), written()))
        return changed

    monkeypatch.setattr(optimized_module, "add_to", probed)


def test_views_lock_the_products_only_after_writing_the_views(shop, optimized, monkeypatch):
    seen: list[tuple[str, bool, int]] = []
    watch_the_last_statement(monkeypatch, seen, ProductView.objects.count)

    optimized.create_product_views(view_rows(shop, 8), chunk_size=1000)

    # The views are in the chunk's transaction before any product is locked;
    # the counter statement locks them, and COMMIT follows.
    assert seen == [("before", True, 8), ("after", False, 8)]
    assert can_lock(shop["products"][0].pk)


def test_streamed_views_lock_the_products_last(shop, optimized, monkeypatch):
    seen: list[tuple[str, bool, int]] = []
    watch_the_last_statement(monkeypatch, seen, ProductView.objects.count)

    optimized.create_product_views(view_rows(shop, 8), chunk_size=1000)

    assert seen == [("before", True, 8), ("after", False, 8)]


def test_orders_lock_the_products_only_after_writing_the_orders(shop, optimized, monkeypatch):
    Product.objects.update(stock_quantity=100)
    seen: list[tuple[str, bool, int]] = []
    watch_the_last_statement(monkeypatch, seen, OrderItem.objects.count)

    optimized.process_orders(order_rows(shop, 4), chunk_size=1000)

    assert seen == [("before", True, 12), ("after", False, 12)]


def hold_lock(product_id: int, seconds: float, held: threading.Event) -> threading.Thread:
    """A live transaction that holds the product's row lock for ``seconds``."""

    def live() -> None:
        with live_session() as session:
            session.execute("SELECT 1 FROM products_product WHERE id = %s FOR UPDATE", [product_id])
            held.set()
            time.sleep(seconds)
            session.commit()

    thread = threading.Thread(target=live, name="live-transaction")
    thread.start()
    held.wait(5)
    return thread


def test_a_chunk_waiting_on_a_live_lock_gives_up_and_retries(shop, optimized, settings):
    """The chunk never queues behind the live transaction: it times out, backs off, commits."""
    settings.BULK_LOCK_TIMEOUT_MS = 50
    settings.BULK_RETRY_ATTEMPTS = 8
    settings.BULK_RETRY_BASE_DELAY = 0.1
    settings.BULK_RETRY_MAX_DELAY = 0.2
    held = threading.Event()
    live = hold_lock(shop["products"][0].pk, 0.4, held)
    try:
        result = optimized.create_product_views(view_rows(shop, 12), chunk_size=1000)
    finally:
        live.join()

    assert (result.status, result.written) == ("completed", 12)
    log = BatchProcessingLog.objects.get()
    assert log.chunks_retried >= 1
    assert log.chunks_retried == log.chunks_rolled_back
    # Every view once, every counter exact.
    assert ProductView.objects.count() == 12
    assert Product.objects.aggregate(total=Sum("view_count"))["total"] == 12


def test_a_run_that_cannot_get_its_locks_fails_with_that_cause(
    shop, optimized, settings, monkeypatch
):
    settings.BULK_LOCK_TIMEOUT_MS = 50
    settings.BULK_RETRY_ATTEMPTS = 3
    delays = record_sleeps(monkeypatch)
    held = threading.Event()
    live = hold_lock(shop["products"][0].pk, 2.0, held)
    try:
        result = optimized.create_product_views(view_rows(shop, 12), chunk_size=1000)
    finally:
        live.join()

    assert result.status == "failed"
    assert len(delays) == 2
    log = BatchProcessingLog.objects.get()
    assert (log.status, log.rows_written, log.checkpoint_position) == ("failed", 0, 0)
    assert "lock timeout" in log.error_summary
    assert not ProductView.objects.exists()


def orders_reltuples() -> float:
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = 'orders_order'::regclass")
        return cursor.fetchone()[0]


@pytest.mark.parametrize(("chunk_size", "analyzed"), [(9, True), (1000, False)])
def test_a_run_filling_orders_from_empty_refreshes_their_statistics(
    shop, optimized, chunk_size, analyzed
):
    """Each order line's foreign key looks its order up with a plan cached while the
    table looked empty (a sequential scan, every chunk slower than the one before):
    after its first chunk, a run of several chunks analyzes the table it fills."""
    Product.objects.update(stock_quantity=1000)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE orders_order")
    assert orders_reltuples() <= 0

    result = optimized.process_orders(order_rows(shop, 9), chunk_size=chunk_size)

    assert result.written == 9
    assert (orders_reltuples() > 0) is analyzed
