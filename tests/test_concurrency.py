"""Concurrent runs on PostgreSQL: no oversell, no lost counter, no double apply.

Workers are threads, each with its own connection and transactions, released
together by a barrier (see ``tests.concurrency_helpers``). The optimized
service locks the products it changes (``SELECT ... FOR NO KEY UPDATE`` in
primary-key order) and changes stock and counters with ``F()``; the naive
service reads, adds in Python and saves, which these tests show losing updates.

PostgreSQL only: SQLite serialises writers on one file lock, so there is no
row-level concurrency there to prove anything about.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count, Sum

from batching.engine import BatchResult
from batching.models import BatchProcessingLog
from batching.postgres import fast_paths
from orders import operations as order_operations
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService
from products.services import optimized as optimized_module
from products.services.base import BulkOperationsService
from tests.concurrency_helpers import live_session, require_postgresql, run_together
from tests.factories import CategoryFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

Status = BatchProcessingLog.Status
FINISHED = {Status.COMPLETED, Status.PARTIAL}

# A lost update needs two transactions to interleave between a read and a
# write; it is likely, never certain. The naive scenarios are repeated until
# one loses (almost always the first attempt), at most this many times.
LOSS_ATTEMPTS = 5


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    require_postgresql()


@pytest.fixture(autouse=True)
def _waits_are_not_retries(settings) -> None:
    """A chunk here waits for the other run's locks rather than yield after 50 ms.

    These tests count retries to prove there is no deadlock (PostgreSQL
    still detects one after ``deadlock_timeout``); on a starved CPU a
    competing chunk can hold its locks past ``BULK_LOCK_TIMEOUT_MS``, and
    that retry (tested in test_live_shop.py) would read as one.
    """
    settings.BULK_LOCK_TIMEOUT_MS = 30_000


def stock_by_product() -> dict[int, int]:
    return dict(Product.objects.values_list("pk", "stock_quantity"))


def sold_by_product() -> dict[int, int]:
    """Units in stored order lines, per product: what the stock must have lost."""
    return dict(
        OrderItem.objects.values("product")
        .annotate(units=Sum("quantity"))
        .values_list("product", "units")
    )


def assert_finished_cleanly(results: list[BatchResult], *, conflicts: int = 0) -> None:
    """Every run finished (completed or partial), each retry rolled its chunk
    back, and no run needed more than ``conflicts`` retries: no deadlock.

    Orders decide before they lock, so a concurrent run can overtake a chunk;
    each such conflict costs one rollback and one retry.
    """
    for result in results:
        log = BatchProcessingLog.objects.get(pk=result.log_id)
        assert log.status in FINISHED, log.error_summary
        assert log.chunks_retried == log.chunks_rolled_back <= conflicts, (
            log.chunks_retried,
            log.chunks_rolled_back,
            log.error_summary,
        )


# -- 1. orders competing for scarce stock --------------------------------------------

ORDERS = 1000
WORKERS = 4
PRODUCTS = 10
ORDER_CHUNK = 25


def competing_orders(users: list[Any], rng: random.Random) -> list[dict[str, Any]]:
    """1,000 orders of 1-3 lines over 10 products, each stocked with half its demand."""
    plans = [
        [
            (position, rng.randint(1, 3))
            for position in rng.sample(range(PRODUCTS), rng.randint(1, 3))
        ]
        for _ in range(ORDERS)
    ]
    demand = Counter[int]()
    for plan in plans:
        for position, quantity in plan:
            demand[position] += quantity
    stocks = [demand[position] // 2 for position in range(PRODUCTS)]
    category = CategoryFactory(name="Contended")
    products = [ProductFactory(category=category, stock_quantity=stock) for stock in stocks]
    orders = [
        {
            "reference": f"CONC-{n:05d}",
            "user_id": users[n % len(users)].pk,
            "items": [
                {"product_id": products[position].pk, "quantity": quantity}
                for position, quantity in plan
            ],
        }
        for n, plan in enumerate(plans)
    ]
    return orders


def test_concurrent_orders_never_oversell():
    """Four workers, interleaved shares of 1,000 orders, stock for about half of them."""
    users = UserFactory.create_batch(20)
    orders = competing_orders(users, random.Random(20260101))
    initial = stock_by_product()
    # Interleaved shares: every worker orders every product, chunk after chunk.
    shares = [orders[worker::WORKERS] for worker in range(WORKERS)]

    def worker(share: list[dict]) -> Callable[[], BatchResult]:
        return lambda: OptimizedBulkOperationsService().process_orders(
            share, chunk_size=ORDER_CHUNK
        )

    results = run_together([worker(share) for share in shares])

    final = stock_by_product()
    sold = sold_by_product()
    accepted = sum(result.written for result in results)
    rejected = sum(len(result.errors) for result in results)
    oversell = sum(max(sold.get(pk, 0) - initial[pk], 0) for pk in initial)
    print(
        f"\nconcurrent orders: {ORDERS} orders, {WORKERS} workers, {accepted} accepted, "
        f"{rejected} rejected, final stock {sum(final.values())} of {sum(initial.values())} "
        f"({min(final.values())} lowest), oversell {oversell}"
    )

    # After its stock was overtaken once, a run locks first: it never conflicts again.
    assert_finished_cleanly(results, conflicts=1)
    assert min(final.values()) >= 0
    assert oversell == 0
    assert {pk: initial[pk] - final[pk] for pk in initial} == {
        pk: sold.get(pk, 0) for pk in initial
    }
    assert accepted + rejected == ORDERS
    assert Order.objects.count() == accepted
    assert 0 < rejected < ORDERS  # the stock really ran out, and not at once
    errors_by_reference = {
        share[error.index]["reference"]: error
        for share, result in zip(shares, results, strict=True)
        for error in result.errors
    }
    assert {error.code for error in errors_by_reference.values()} == {"insufficient_stock"}
    assert set(Order.objects.values_list("reference", flat=True)) == {
        order["reference"] for order in orders if order["reference"] not in errors_by_reference
    }
    # Stock only falls, so an order refused for want of stock still cannot be served.
    for order in orders:
        if order["reference"] in errors_by_reference:
            assert any(item["quantity"] > final[item["product_id"]] for item in order["items"])


# -- 2-3. view counters: exact with locks and F(), lossy with read-modify-write -----

VIEW_WORKERS = 4
VIEWS_PER_WORKER = 300


def test_concurrent_views_keep_every_counter_exact():
    users = UserFactory.create_batch(5)
    products = ProductFactory.create_batch(3, category=CategoryFactory(name="Viewed"))

    def worker(number: int) -> Callable[[], BatchResult]:
        rows = [
            {
                "user_id": users[n % len(users)].pk,
                "product_id": products[(n + number) % len(products)].pk,
                "session_id": f"w{number}-{n}",
            }
            for n in range(VIEWS_PER_WORKER)
        ]
        return lambda: OptimizedBulkOperationsService().create_product_views(rows, chunk_size=20)

    results = run_together([worker(number) for number in range(VIEW_WORKERS)])

    assert_finished_cleanly(results)
    assert sum(result.written for result in results) == VIEW_WORKERS * VIEWS_PER_WORKER
    stored = dict(
        ProductView.objects.values("product").annotate(n=Count("pk")).values_list("product", "n")
    )
    counters = dict(Product.objects.values_list("pk", "view_count"))
    assert counters == stored
    assert sum(counters.values()) == VIEW_WORKERS * VIEWS_PER_WORKER


HAMMER_WORKERS = 8
HAMMER_ROWS = 25


def lost_view_updates(service_class: type[BulkOperationsService]) -> int:
    """Eight workers view one fresh product, one row per chunk; views minus counter."""
    users = UserFactory.create_batch(2)
    product = ProductFactory(category=CategoryFactory(name="Hammered"))

    def worker(number: int) -> Callable[[], BatchResult]:
        rows = [
            {"user_id": users[n % 2].pk, "product_id": product.pk, "session_id": f"{number}-{n}"}
            for n in range(HAMMER_ROWS)
        ]
        return lambda: service_class().create_product_views(rows, chunk_size=1)

    results = run_together([worker(number) for number in range(HAMMER_WORKERS)])
    assert all(result.status == Status.COMPLETED for result in results)
    views = ProductView.objects.filter(product=product).count()
    assert views == HAMMER_WORKERS * HAMMER_ROWS
    product.refresh_from_db()
    return views - product.view_count


def oversold_units(service_class: type[BulkOperationsService]) -> int:
    """Eight workers order one unit each of one product with stock for half of them.

    Returns the units sold beyond what the stock lost: zero unless updates were lost.
    """
    users = UserFactory.create_batch(2)
    stock = HAMMER_WORKERS * HAMMER_ROWS // 2
    product = ProductFactory(category=CategoryFactory(name="Scarce"), stock_quantity=stock)
    tag = f"{service_class.variant}-{product.pk}"

    def worker(number: int) -> Callable[[], BatchResult]:
        orders = [
            {
                "reference": f"{tag}-{number}-{n}",
                "user_id": users[n % 2].pk,
                "items": [{"product_id": product.pk, "quantity": 1}],
            }
            for n in range(HAMMER_ROWS)
        ]
        return lambda: service_class().process_orders(orders, chunk_size=1)

    results = run_together([worker(number) for number in range(HAMMER_WORKERS)])
    assert all(result.status in FINISHED for result in results)
    product.refresh_from_db()
    sold = OrderItem.objects.filter(product=product).aggregate(units=Sum("quantity"))["units"]
    assert sold == sum(result.written for result in results)
    return sold - (stock - product.stock_quantity)


def losses_within_attempts(scenario: Callable[[], int]) -> list[int]:
    """Run ``scenario`` until it reports a loss, at most LOSS_ATTEMPTS times."""
    losses: list[int] = []
    while len(losses) < LOSS_ATTEMPTS and not any(losses):
        losses.append(scenario())
    return losses


@pytest.mark.parametrize(
    "scenario", [lost_view_updates, oversold_units], ids=["view-counter", "stock"]
)
def test_naive_read_modify_write_loses_updates_that_optimized_keeps(scenario):
    """The baseline's flaw, shown: the same contention loses updates only in the naive service.

    A loss is probable rather than certain (two transactions must both read
    before either writes), so the naive run is repeated until one loses, at
    most LOSS_ATTEMPTS times; the optimized run must lose nothing in as many.
    """
    naive = losses_within_attempts(lambda: scenario(NaiveBulkOperationsService))
    optimized = [scenario(OptimizedBulkOperationsService) for _ in naive]

    print(f"\nlost updates ({scenario.__name__}): naive {naive}, optimized {optimized}")
    assert any(loss > 0 for loss in naive), naive
    assert optimized == [0] * len(naive)


# -- 4. the same input submitted twice at once -----------------------------------------

REPLAYED = 200
REPLAY_CHUNK = 50


def both_start_before_either_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the replay race: each of two workers waits, at the first query of its
    first chunk, until the other is there too, so both chunks are under way before
    either commits.

    The hooks are ``strict``, which wraps every query the optimized operations
    build with the ORM (in ``products.services.optimized`` and
    ``orders.operations``), and ``read_by_key``, the orders' first read on
    PostgreSQL's fast path: for scores the first call is the user lookup, for
    the catalogue the category lookup.
    """
    inside_together = threading.Barrier(2)
    started = threading.local()

    def meeting(original):
        def rendezvous(*args, **kwargs):
            if not getattr(started, "value", False):
                started.value = True
                inside_together.wait(timeout=30)
            return original(*args, **kwargs)

        return rendezvous

    monkeypatch.setattr(optimized_module, "strict", meeting(optimized_module.strict))
    monkeypatch.setattr(order_operations, "strict", meeting(order_operations.strict))
    monkeypatch.setattr(order_operations, "read_by_key", meeting(order_operations.read_by_key))


@pytest.mark.parametrize("reverse", [False, True], ids=["same-order", "reversed-one-chunk"])
@pytest.mark.parametrize("forced", [False, True], ids=["free-race", "both-inside-first-chunk"])
def test_concurrent_replay_of_the_same_orders_applies_each_once(
    monkeypatch, caplog, forced, reverse
):
    """Two submissions of the same 200 references: each order lands once, stock falls once.

    A chunk reads the known references without locks; when both runs have
    the same references under way, the second's INSERT waits in their
    unique index for the first's COMMIT and is refused; retried, that chunk
    reads the committed orders as duplicates: at most once per chunk. Never
    a deadlock, even when the second run's input is the first's reversed (in
    one chunk each, so both INSERTs of 200 orders run at once): each chunk
    inserts its references sorted, so two runs meet in the index in one
    order, and neither locks a product before its INSERT.
    """
    caplog.set_level(logging.INFO, logger="batching.engine")
    if forced:
        both_start_before_either_commits(monkeypatch)
    users = UserFactory.create_batch(5)
    products = ProductFactory.create_batch(
        5, category=CategoryFactory(name="Replayed"), stock_quantity=10_000
    )
    orders = [
        {
            "reference": f"REPLAY-{n:04d}",
            "user_id": users[n % len(users)].pk,
            "items": [
                {"product_id": products[(n + line) % len(products)].pk, "quantity": 1 + line}
                for line in range(1 + n % 3)
            ],
        }
        for n in range(REPLAYED)
    ]
    second = orders[::-1] if reverse else orders
    chunk_size = 1_000 if reverse else REPLAY_CHUNK
    initial = stock_by_product()

    results = run_together(
        [
            lambda submitted=submitted: OptimizedBulkOperationsService().process_orders(
                submitted, chunk_size=chunk_size
            )
            for submitted in (orders, second)
        ]
    )

    lines = sum(len(order["items"]) for order in orders)
    assert_finished_cleanly(results, conflicts=-(-lines // chunk_size))
    assert not [record for record in caplog.records if "deadlock" in record.getMessage()]
    for result in results:
        assert result.written + len(result.errors) == REPLAYED
        assert {error.code for error in result.errors} <= {"duplicate"}
    assert sum(result.written for result in results) == REPLAYED
    assert Order.objects.count() == REPLAYED
    demand = Counter[int]()
    for order in orders:
        for item in order["items"]:
            demand[item["product_id"]] += item["quantity"]
    final = stock_by_product()
    assert {pk: initial[pk] - final[pk] for pk in initial} == dict(demand)
    assert sold_by_product() == dict(demand)


def waiting_on_a_lock(table: str, timeout: float = 10.0) -> None:
    """Return once a session's statement on ``table`` waits for a lock; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND query LIKE %s",
                [f'%"{table}"%'],
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.01)
    pytest.fail(f"no statement on {table} waited for a lock within {timeout} s")


def test_a_chunk_takes_its_references_in_one_order(caplog):
    """Another run holds the smallest reference and then inserts a larger one: no deadlock.

    The chunk's input lists its references in reverse. It inserts them
    sorted, so it waits at the smallest, holding none the other run needs;
    once the other commits, the chunk is refused, retried once, and reads
    those two orders as taken. (Inserted in input order, the chunk would
    hold the larger one while it waits: a deadlock, broken by rolling one
    of them back.)
    """
    caplog.set_level(logging.INFO, logger="batching.engine")
    user = UserFactory()
    product = ProductFactory(stock_quantity=1_000)
    references = [f"ORDERED-{n:02d}" for n in range(10)]
    orders = [
        {
            "reference": reference,
            "user_id": user.pk,
            "items": [{"product_id": product.pk, "quantity": 1}],
        }
        for reference in reversed(references)
    ]
    insert = (
        "INSERT INTO orders_order (reference, user_id, status, total, created_at) "
        "VALUES (%s, %s, 'confirmed', 0, now())"
    )
    results: list[BatchResult] = []
    with live_session() as other:
        other.execute(insert, [references[0], user.pk])

        def bulk() -> None:
            try:
                results.append(OptimizedBulkOperationsService().process_orders(orders))
            finally:
                connection.close()

        run = threading.Thread(target=bulk, name="bulk-run")
        run.start()
        waiting_on_a_lock("orders_order")
        other.execute(insert, [references[5], user.pk])
        other.commit()
        run.join(30)

    (result,) = results
    assert (result.status, result.written) == ("partial", 8)
    taken = {(error.index, error.code) for error in result.errors}
    assert taken == {(9, "duplicate"), (4, "duplicate")}
    assert_finished_cleanly(results, conflicts=1)
    assert not [record for record in caplog.records if "deadlock" in record.getMessage()]
    assert Order.objects.count() == 10


@pytest.mark.parametrize("forced", [False, True], ids=["free-race", "both-inside-first-chunk"])
def test_concurrent_replay_of_scores_and_catalogue_ends_as_one_run_would(monkeypatch, forced):
    """The same scores, then the same catalogue, submitted twice at once: one run's end state.

    Forced, both catalogue runs find the same categories missing and insert
    them together: the second insert waits for the first and skips them, and
    both read the committed ids back.
    """
    if forced:
        both_start_before_either_commits(monkeypatch)
    users = UserFactory.create_batch(10)
    products = ProductFactory.create_batch(10, category=CategoryFactory(name="Scored"))
    scores = [
        {
            "user_id": user.pk,
            "product_id": product.pk,
            "algorithm": f"algo-{(u * p) % 3}",
            "score": round(((u + 1) * (p + 3) % 97) / 97, 4),
        }
        for u, user in enumerate(users)
        for p, product in enumerate(products)
    ]
    catalogue = [
        {
            "sku": f"CAT-{n:04d}",
            "name": f"Catalogued {n}",
            "category": f"Shelf {n % 7}",
            "price": f"{n % 90 + 1}.50",
            "stock_quantity": n % 40,
        }
        for n in range(300)
    ]

    def twice(submit: Callable[[], BatchResult]) -> list[BatchResult]:
        return run_together([submit, submit])

    score_runs = twice(
        lambda: OptimizedBulkOperationsService().upsert_recommendation_scores(scores, chunk_size=30)
    )
    catalogue_runs = twice(
        lambda: OptimizedBulkOperationsService().import_products(catalogue, chunk_size=50)
    )

    assert_finished_cleanly(score_runs + catalogue_runs)
    for runs, rows in ((score_runs, scores), (catalogue_runs, catalogue)):
        assert [result.written for result in runs] == [len(rows), len(rows)]
        if fast_paths("default"):
            # Each key was inserted by exactly one run and updated by the other:
            # the upsert tells them apart row by row (RETURNING xmax = 0), races
            # included.
            assert sum(result.created for result in runs) == len(rows)
            assert sum(result.updated for result in runs) == len(rows)
        else:
            # The portable path reads the existing keys before its upsert: a key
            # both runs found missing is counted as created by both
            # (docs/architecture.md, "PostgreSQL fast paths"). The state below
            # is exact all the same.
            assert sum(result.created for result in runs) >= len(rows)
            assert all(result.created + result.updated == len(rows) for result in runs)
    assert {
        (user, product, algorithm): score
        for user, product, algorithm, score in RecommendationScore.objects.values_list(
            "user", "product", "algorithm", "score"
        )
    } == {(row["user_id"], row["product_id"], row["algorithm"]): row["score"] for row in scores}
    imported = {
        sku: (name, category, str(price), stock)
        for sku, name, category, price, stock in Product.objects.filter(
            sku__startswith="CAT-"
        ).values_list("sku", "name", "category__name", "price", "stock_quantity")
    }
    assert imported == {
        row["sku"]: (row["name"], row["category"], row["price"], row["stock_quantity"])
        for row in catalogue
    }
    assert Category.objects.filter(name__startswith="Shelf ").count() == 7
