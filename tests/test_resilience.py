"""Faults inside a chunk: what is kept, what is undone, and what the log says.

Faults are injected by replacing an optimized operation's ``write`` with one
that does the real work and then raises (``inject_faults``), so every failed
chunk has rows in its transaction that the rollback must undo. Backoff delays
are recorded instead of slept.

These tests run with ``transaction=True``: the engine retries a transient
failure only when it owns the transaction (inside a caller's atomic block it
must re-raise), and "chunks 1-2 are committed" means committed for real.
They run on SQLite and PostgreSQL alike, except where a test says otherwise.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Count

from batching.models import BatchProcessingLog
from batching.postgres import fast_paths
from orders import operations as order_operations
from orders.models import Order
from orders.operations import OptimizedOrders
from products.models import Product, ProductView
from products.services import OptimizedBulkOperationsService
from products.services import rows as r
from products.services.optimized import OptimizedProducts, OptimizedViews
from tests.concurrency_helpers import (
    inject_faults,
    record_sleeps,
    require_postgresql,
    transient_error,
)
from tests.factories import CategoryFactory, ProductFactory, UserFactory
from tests.test_services import order_rows, portable_locks, prologue
from tests.test_services import shop as shop_fixture

pytestmark = pytest.mark.django_db(transaction=True)

shop = shop_fixture  # three users, four active products, one inactive

Status = BatchProcessingLog.Status

CHUNK = 100
# Views need no statement for the log row: the first chunk's checkpoint
# inserts it, the last one's finishes the run.
# users, products locked, views inserted, view counts updated (the PostgreSQL
# fast path locks and counts in one statement).
VIEW_WRITE = 4
CHECKPOINT = 1  # the log's checkpoint UPDATE inside each chunk's transaction
# Each chunk attempt is its own transaction. Django logs its BEGIN and its COMMIT
# or ROLLBACK as queries (django_assert_num_queries sees them); the engine's own
# counter sees only executed statements, which includes SQLite's BEGIN IMMEDIATE.
TRANSACTION = 2
RETRY_ATTEMPTS = 4
BASE_DELAY = 0.1
MAX_DELAY = 0.25
JITTER = (0.5, 1.5)


@pytest.fixture
def optimized() -> OptimizedBulkOperationsService:
    return OptimizedBulkOperationsService()


@pytest.fixture
def retry_settings(settings) -> None:
    """Small, known delays: four attempts, 0.1 s doubling, capped at 0.25 s."""
    settings.BULK_RETRY_ATTEMPTS = RETRY_ATTEMPTS
    settings.BULK_RETRY_BASE_DELAY = BASE_DELAY
    settings.BULK_RETRY_MAX_DELAY = MAX_DELAY


def executed_begin() -> int:
    """SQLite's BEGIN IMMEDIATE is an executed statement; psycopg's BEGIN is implicit."""
    return 1 if connection.vendor == "sqlite" else 0


def nominal_delay(retry: int) -> float:
    """The delay before the given retry (1-based) without jitter."""
    return min(MAX_DELAY, BASE_DELAY * 2 ** (retry - 1))


def assert_backoff(delays: list[float], retries: int) -> None:
    """One delay per retry, each within the jitter bounds of its doubling, capped."""
    assert len(delays) == retries
    for retry, delay in enumerate(delays, start=1):
        low, high = (factor * nominal_delay(retry) for factor in JITTER)
        assert low <= delay <= high, (retry, delay)


def product_rows(count: int) -> list[dict[str, Any]]:
    return [
        {
            "sku": f"IMP-{n:05d}",
            "name": f"Imported {n}",
            "category": f"Category {n % 5}",
            "price": "9.99",
            "stock_quantity": n % 50,
        }
        for n in range(count)
    ]


def imported_skus() -> list[str]:
    return sorted(Product.objects.values_list("sku", flat=True))


def fail_from(call: int, make_error) -> Any:
    """A fault plan: every call from ``call`` on fails with a fresh error."""
    return lambda number: make_error() if number >= call else None


def deadlock() -> OperationalError:
    return transient_error("40P01", "deadlock detected")


def serialization_failure() -> OperationalError:
    return transient_error("40001", "could not serialize access due to concurrent update")


def lost_connection() -> OperationalError:
    return transient_error(None, "server closed the connection unexpectedly")


# -- an unexpected error ----------------------------------------------------------


def test_unexpected_error_in_chunk_3_keeps_chunks_1_and_2(monkeypatch, optimized):
    """The error is re-raised after the log is marked failed; resuming finishes the work."""
    rows = product_rows(5 * CHUNK)
    faulty = inject_faults(
        monkeypatch,
        OptimizedProducts,
        lambda call: RuntimeError("injected fault in chunk 3") if call == 3 else None,
    )

    with pytest.raises(RuntimeError, match="injected fault in chunk 3"):
        optimized.import_products(rows, chunk_size=CHUNK)

    log = BatchProcessingLog.objects.get()
    assert log.status == Status.FAILED
    assert log.error_summary == "RuntimeError: injected fault in chunk 3"
    assert log.checkpoint_position == 2 * CHUNK
    assert (log.chunks_committed, log.rows_written) == (2, 2 * CHUNK)
    assert log.finished_at is not None
    # Chunk 3 was written, then rolled back; chunks 4 and 5 never ran.
    assert imported_skus() == [row["sku"] for row in rows[: 2 * CHUNK]]
    assert faulty.calls == [CHUNK, CHUNK, CHUNK]

    resumed = optimized.import_products(rows, resume=log.pk)

    assert (resumed.status, resumed.log_id, resumed.written) == (Status.COMPLETED, log.pk, 500)
    assert imported_skus() == [row["sku"] for row in rows]
    assert faulty.calls == [CHUNK] * 6  # the committed chunks were not written again
    log.refresh_from_db()
    assert (log.resume_count, log.checkpoint_position, log.error_summary) == (1, 500, "")


def test_a_database_error_that_is_not_transient_fails_the_run_at_once(monkeypatch, optimized):
    """A full disk is not retried: chunk 3 is rolled back, the error is raised, 1-2 stay."""
    delays = record_sleeps(monkeypatch)
    rows = product_rows(5 * CHUNK)
    faulty = inject_faults(
        monkeypatch,
        OptimizedProducts,
        lambda call: transient_error("53100", "could not extend file") if call == 3 else None,
    )

    with pytest.raises(OperationalError, match="could not extend file"):
        optimized.import_products(rows, chunk_size=CHUNK)

    log = BatchProcessingLog.objects.get()
    assert (log.status, log.error_summary) == (
        Status.FAILED,
        "OperationalError: could not extend file",
    )
    assert (log.checkpoint_position, log.chunks_rolled_back, log.chunks_retried) == (
        2 * CHUNK,
        0,
        0,
    )
    assert imported_skus() == [row["sku"] for row in rows[: 2 * CHUNK]]
    assert (faulty.calls, delays) == ([CHUNK] * 3, [])


def test_a_transient_error_inside_the_callers_transaction_is_left_to_the_caller(
    monkeypatch, optimized
):
    """The caller owns the transaction: the chunk is not retried, and its rollback takes it all."""
    delays = record_sleeps(monkeypatch)
    faulty = inject_faults(monkeypatch, OptimizedProducts, fail_from(2, deadlock))

    with pytest.raises(OperationalError, match="deadlock detected"), transaction.atomic():
        optimized.import_products(product_rows(3 * CHUNK), chunk_size=CHUNK)

    assert (faulty.calls, delays) == ([CHUNK, CHUNK], [])
    assert not Product.objects.exists()
    assert not BatchProcessingLog.objects.exists()


def test_a_log_that_cannot_be_finished_does_not_hide_the_runs_failure(
    monkeypatch, optimized, caplog
):
    """The database goes away: the write's error is raised, the failed save only logged."""
    inject_faults(monkeypatch, OptimizedProducts, lambda call: RuntimeError("write failed"))
    save = BatchProcessingLog.save

    def unreachable(log, *args, **kwargs):
        if kwargs.get("update_fields") or log.status == Status.FAILED:
            raise OperationalError("server closed the connection unexpectedly")
        return save(log, *args, **kwargs)

    monkeypatch.setattr(BatchProcessingLog, "save", unreachable)

    with pytest.raises(RuntimeError, match="write failed"):
        optimized.import_products(product_rows(CHUNK), chunk_size=CHUNK)

    assert not Product.objects.exists()
    assert "could not record the end of batch run" in caplog.text


# -- transient errors -------------------------------------------------------------


@pytest.mark.usefixtures("retry_settings")
def test_transient_fault_that_persists_fails_the_run_without_raising(monkeypatch, optimized):
    delays = record_sleeps(monkeypatch)
    faulty = inject_faults(monkeypatch, OptimizedProducts, fail_from(3, deadlock))
    rows = product_rows(5 * CHUNK)

    result = optimized.import_products(rows, chunk_size=CHUNK)

    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert result.status == log.status == Status.FAILED
    assert log.error_summary == (
        f"TransientFailure: chunk at row {2 * CHUNK} failed after {RETRY_ATTEMPTS} attempts: "
        "deadlock detected"
    )
    assert log.checkpoint_position == 2 * CHUNK
    assert (log.chunks_committed, log.chunks_rolled_back, log.chunks_retried) == (
        2,
        RETRY_ATTEMPTS,
        RETRY_ATTEMPTS - 1,
    )
    assert imported_skus() == [row["sku"] for row in rows[: 2 * CHUNK]]
    assert faulty.calls == [CHUNK] * (2 + RETRY_ATTEMPTS)  # chunks 4-5 never ran
    assert_backoff(delays, retries=RETRY_ATTEMPTS - 1)


@pytest.mark.usefixtures("retry_settings")
def test_backoff_doubles_from_the_base_delay_up_to_the_cap(monkeypatch, settings, optimized):
    """With the jitter pinned at 1.0 the delays are exactly base, 2 x base, then the cap."""
    settings.BULK_RETRY_ATTEMPTS = 5
    jitter_ranges: list[tuple[float, float]] = []

    class PinnedJitter:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            jitter_ranges.append((low, high))
            return 1.0

    monkeypatch.setattr("batching.engine.random", PinnedJitter)
    delays = record_sleeps(monkeypatch)
    inject_faults(monkeypatch, OptimizedProducts, fail_from(1, serialization_failure))

    result = optimized.import_products(product_rows(10), chunk_size=CHUNK)

    assert result.status == Status.FAILED
    assert delays == pytest.approx([0.1, 0.2, 0.25, 0.25])
    assert jitter_ranges == [JITTER] * 4
    assert Product.objects.count() == 0


def view_rows(count: int) -> list[dict[str, Any]]:
    users = UserFactory.create_batch(3)
    products = ProductFactory.create_batch(4, category=CategoryFactory(name="Views"))
    return [
        {
            "user_id": users[n % len(users)].pk,
            "product_id": products[n % len(products)].pk,
            "session_id": f"session-{n}",
        }
        for n in range(count)
    ]


def assert_views_landed_once(rows: list[dict[str, Any]]) -> None:
    """Every row is one ProductView, and each product's counter matches its rows."""
    expected: dict[int, int] = {}
    for row in rows:
        expected[row["product_id"]] = expected.get(row["product_id"], 0) + 1
    stored = dict(
        ProductView.objects.values("product").annotate(n=Count("pk")).values_list("product", "n")
    )
    counters = dict(Product.objects.values_list("pk", "view_count"))
    assert stored == expected
    assert counters == expected
    assert sorted(ProductView.objects.values_list("session_id", flat=True)) == sorted(
        row["session_id"] for row in rows
    )


@pytest.mark.usefixtures("retry_settings")
@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([deadlock, serialization_failure], id="deadlock-then-serialization"),
        pytest.param([lost_connection], id="lost-connection"),
        pytest.param([lambda: InterfaceError("connection already closed")], id="interface-error"),
    ],
)
def test_transient_faults_in_chunk_2_are_retried_until_it_commits(
    monkeypatch, optimized, django_assert_num_queries, faults
):
    """The failed attempts are rolled back: every view lands once, every counter is exact."""
    rows = view_rows(3 * CHUNK)
    delays = record_sleeps(monkeypatch)
    # Call 1 is chunk 1; calls 2.. are chunk 2's attempts: they fail in turn, then pass.
    plan = {2 + n: make_error for n, make_error in enumerate(faults)}
    inject_faults(monkeypatch, OptimizedViews, lambda call: plan[call]() if call in plan else None)
    chunks, failures = 3, len(faults)
    view_write = VIEW_WRITE - 1 if fast_paths(connection.alias) else VIEW_WRITE + portable_locks()
    view_write += prologue()  # every attempt opens with it, on PostgreSQL
    # A failed attempt runs the chunk's writes but never reaches its checkpoint.
    with django_assert_num_queries(
        chunks * (TRANSACTION + view_write + CHECKPOINT) + failures * (TRANSACTION + view_write)
    ):
        result = optimized.create_product_views(rows, chunk_size=CHUNK)

    begin = executed_begin()
    assert result.query_count == (
        chunks * (begin + view_write + CHECKPOINT) + failures * (begin + view_write)
    )

    assert (result.status, result.written, result.errors) == (Status.COMPLETED, 3 * CHUNK, [])
    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert (log.chunks_committed, log.chunks_retried, log.chunks_rolled_back) == (
        chunks,
        failures,
        failures,
    )
    assert log.checkpoint_position == 3 * CHUNK
    assert_views_landed_once(rows)
    assert_backoff(delays, retries=failures)


def test_a_connection_killed_mid_chunk_is_retried_on_a_new_one(monkeypatch, optimized):
    """PostgreSQL only: the server ends the session inside chunk 2's transaction.

    The backend is terminated from another connection after chunk 2's rows are
    written; the chunk's checkpoint UPDATE then finds the connection gone. The
    server discards the uncommitted rows, the engine reconnects and retries.
    """
    require_postgresql()
    rows = view_rows(3 * CHUNK)
    delays = record_sleeps(monkeypatch)

    def kill_this_session(call: int) -> None:
        if call != 2:
            return None
        backend_pid = connection.connection.info.backend_pid

        def terminate() -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
            finally:
                connection.close()

        killer = threading.Thread(target=terminate)
        killer.start()
        killer.join()
        return None

    inject_faults(monkeypatch, OptimizedViews, kill_this_session)

    result = optimized.create_product_views(rows, chunk_size=CHUNK)

    assert (result.status, result.written) == (Status.COMPLETED, 3 * CHUNK)
    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert (log.chunks_committed, log.chunks_retried) == (3, 1)
    assert_views_landed_once(rows)
    assert len(delays) == 1


# -- rows only the database rejects ---------------------------------------------------

BAD_ROWS = (7, 500, 999)
VIOLATIONS = {
    # A negative price: Python's money() refuses it; here it slips through to
    # the CHECK constraint, which both databases enforce (IntegrityError).
    "check-constraint": (lambda n: {"price": Decimal("-1.00")}, "product_price_non_negative"),
    # A 70-character sku: varchar(64) on PostgreSQL raises DataError; SQLite
    # does not enforce lengths, so this one is PostgreSQL's.
    "value-too-long": (lambda n: {"sku": f"TOO-LONG-{n:03d}-".ljust(70, "x")}, "too long"),
}


@pytest.mark.parametrize("chunk_size", [1000, 100])
@pytest.mark.parametrize(
    "violation",
    [
        "check-constraint",
        "value-too-long",
    ],
)
def test_rows_rejected_only_by_the_database_are_isolated(
    monkeypatch, optimized, chunk_size, violation
):
    """997 rows land; the 3 the database refuses are reported with its reason.

    The parser is loosened for three rows (a validation gap, simulated) so they
    reach the database. Isolation re-runs halves of a rejected chunk: each bad
    row costs at most one rollback per halving level, and every rolled-back
    piece of more than one row is re-run as two halves.
    """
    if violation == "value-too-long":
        require_postgresql()
    overrides, reason = VIOLATIONS[violation]
    rows = product_rows(1000)
    for n in BAD_ROWS:
        rows[n]["_db_only"] = overrides(n)
    parse = r.parse_product
    monkeypatch.setattr(
        r, "parse_product", lambda raw: replace(parse(raw), **raw.get("_db_only", {}))
    )

    result = optimized.import_products(rows, chunk_size=chunk_size)

    assert (result.status, result.written, result.skipped) == (Status.PARTIAL, 997, 3)
    assert [(error.index, error.code) for error in result.errors] == [
        (n, "database") for n in BAD_ROWS
    ]
    for error in result.errors:
        assert error.message.startswith("rejected by the database: ")
        assert reason in error.message
    assert Product.objects.count() == 997
    assert not Product.objects.filter(sku__in=[rows[n]["sku"] for n in BAD_ROWS]).exists()
    assert not Product.objects.filter(price__lt=0).exists()

    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert (log.status, log.rows_skipped, log.checkpoint_position) == (Status.PARTIAL, 3, 1000)
    assert log.chunks_committed == 1000 // chunk_size  # chunks, not the pieces of their halving
    assert log.error_summary == "3 rows skipped: 3 database"
    assert [error["index"] for error in log.row_errors] == list(BAD_ROWS)
    assert log.chunks_rolled_back > len(BAD_ROWS)
    assert log.chunks_rolled_back <= len(BAD_ROWS) * (math.ceil(math.log2(chunk_size)) + 1)
    assert log.chunks_rerun == 2 * (log.chunks_rolled_back - len(BAD_ROWS))


def test_a_row_the_driver_cannot_encode_is_reported_not_raised(optimized):
    """Bad rows never raise: a string that is not valid Unicode is the row's fault."""
    rows = product_rows(3)
    rows[1]["name"] = "broken \ud800 name"

    result = optimized.import_products(rows, chunk_size=CHUNK)

    assert (result.status, result.written) == (Status.PARTIAL, 2)
    assert [(error.index, error.field, error.code) for error in result.errors] == [
        (1, "name", "invalid")
    ]


# -- orders overtaken between their read and their write -------------------------------


def test_a_reference_taken_before_the_insert_retries_the_chunk(monkeypatch, optimized, shop):
    """Another run commits one of the chunk's references first: the chunk is rolled back and
    re-run (the race is simulated inside the chunk's transaction, so the rollback undoes it)."""
    insert, raced = OptimizedOrders.insert, []

    def overtaken_once(self, orders, lines):
        if not raced:
            raced.append(orders[0][0])
            Order.objects.create(reference=orders[0][0], user_id=orders[0][1], total=0)
        insert(self, orders, lines)

    monkeypatch.setattr(OptimizedOrders, "insert", overtaken_once)
    result = optimized.process_orders(order_rows(shop, 2))

    assert (result.status, result.written, result.errors) == (Status.COMPLETED, 2, [])
    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert (log.chunks_rolled_back, log.chunks_retried) == (1, 1)
    assert sorted(Order.objects.values_list("reference", flat=True)) == ["REF-0000", "REF-0001"]
    assert Order.objects.get(reference=raced[0]).items.count() == 3


def test_stock_taken_before_the_update_retries_the_chunk_with_the_products_locked(
    monkeypatch, optimized, shop
):
    """A checkout empties a product between the read and the stock update: the guard refuses,
    and the chunk re-runs deciding under the products' locks (simulated as above)."""
    add_to_each, products = order_operations.add_to_each, shop["products"]

    def checkout_first(using, field, amounts, *, guard=False):
        if not products_locked:
            Product.objects.filter(pk=products[0].pk).update(stock_quantity=0)
        products_locked.append(True)
        add_to_each(using, field, amounts, guard=guard)

    products_locked: list[bool] = []
    monkeypatch.setattr(order_operations, "add_to_each", checkout_first)
    result = optimized.process_orders(order_rows(shop, 2))

    assert (result.status, result.written) == (Status.COMPLETED, 2)
    log = BatchProcessingLog.objects.get(pk=result.log_id)
    assert (log.chunks_rolled_back, log.chunks_retried) == (1, 1)
    # Each order took one of each of three products, from 10 in stock.
    stock = dict(Product.objects.values_list("pk", "stock_quantity"))
    assert [stock[product.pk] for product in products] == [9, 8, 8, 9]
