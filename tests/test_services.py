"""The bulk services: query counts, equivalence, bad rows, orders and the log.

Query counts are computed from the number of chunks. These tests run inside
the test transaction, so each chunk's ``transaction.atomic()`` is a savepoint:
SAVEPOINT and RELEASE are two statements per committed chunk, counted here on
purpose (``SAVEPOINTS``).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import factory
import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from batching.models import BatchProcessingLog
from batching.postgres import fast_paths
from orders import rows as parsed_orders
from orders.models import Order, OrderItem
from orders.operations import OptimizedOrders
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import rows as r
from tests.factories import (
    BatchProcessingLogFactory,
    CategoryFactory,
    OrderFactory,
    ProductFactory,
    RecommendationScoreFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

# The log row's INSERT before the first chunk's write, for an operation whose
# marks name the run (the catalogue import, the price update, the score
# refresh). For the others the first chunk's checkpoint is the INSERT; the
# last chunk's checkpoint also finishes the run.
LOG_QUERIES = 1
SAVEPOINTS = 2  # SAVEPOINT + RELEASE per chunk inside the test transaction
CHECKPOINT = 1  # the log's checkpoint UPDATE inside each chunk's transaction
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
EARLIER = datetime(2025, 6, 1, tzinfo=UTC)  # when an earlier run wrote the seeded rows


def chunks(rows: int, chunk_size: int) -> int:
    return math.ceil(rows / chunk_size)


def per_chunk(queries: int) -> int:
    return queries + CHECKPOINT + SAVEPOINTS + prologue()


def portable_locks() -> int:
    """PostgreSQL's portable path locks the products (pk order) before changing counters."""
    return 1 if on_postgresql() and not fast() else 0


def prologue() -> int:
    """PostgreSQL opens each chunk with one statement (immediate foreign keys, lock_timeout)."""
    return 1 if on_postgresql() else 0


def statistics_check(chunk_count: int) -> int:
    """After the first of several chunks, PostgreSQL asks whether the orders table looks empty."""
    return 1 if on_postgresql() and chunk_count > 1 else 0


@pytest.fixture
def orders_statistics():
    """The orders table's statistics say it holds rows, whatever the tests before left.

    ``reltuples`` is written in place by ANALYZE and survives the test's
    rollback: with it above zero, no run of this test analyzes the table.
    """
    if on_postgresql():
        with transaction.atomic():
            OrderFactory()
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE orders_order")
            transaction.set_rollback(True)


def on_postgresql() -> bool:
    return connection.vendor == "postgresql"


def fast() -> bool:
    """The PostgreSQL fast paths are on (``BULK_PG_FAST_PATHS``)."""
    return fast_paths(connection.alias)


@pytest.fixture
def shop():
    """Three users, four active products (stock 10) and one inactive product."""
    users = UserFactory.create_batch(3)
    category = CategoryFactory(name="Tools")
    products = ProductFactory.create_batch(4, category=category, stock_quantity=10)
    inactive = ProductFactory(category=category, is_active=False, stock_quantity=10)
    return {"users": users, "products": products, "inactive": inactive}


def view_rows(shop, count: int) -> list[dict]:
    users, products = shop["users"], shop["products"]
    return [
        {
            "user_id": users[i % len(users)].pk,
            "product_id": products[i % len(products)].pk,
            "session_id": f"s{i}",
            "interaction_type": ["view", "click", "add_to_cart", "purchase"][i % 4],
            "created_at": WHEN + timedelta(seconds=i),
        }
        for i in range(count)
    ]


def score_rows(shop, count: int, algorithm: str = "collaborative") -> list[dict]:
    users, products = shop["users"], shop["products"]
    pairs = [(u, p) for u in users for p in products]
    return [
        {
            "user_id": pairs[i % len(pairs)][0].pk,
            "product_id": pairs[i % len(pairs)][1].pk,
            "algorithm": f"{algorithm}-{i // len(pairs)}",
            "score": round((i % 10) / 10, 1),
        }
        for i in range(count)
    ]


def product_rows(count: int, prefix: str = "NEW") -> list[dict]:
    return [
        {
            "sku": f"{prefix}-{i:04d}",
            "name": f"Imported {i}",
            "category": f"Imported {i % 3}",
            "price": f"{i % 50}.{i % 100:02d}",
            "stock_quantity": i % 7,
            "is_active": i % 5 != 0,
        }
        for i in range(count)
    ]


def order_rows(shop, count: int, prefix: str = "REF") -> list[dict]:
    users, products = shop["users"], shop["products"]
    return [
        {
            "reference": f"{prefix}-{i:04d}",
            "user_id": users[i % len(users)].pk,
            "items": [
                {"product_id": products[(i + k) % len(products)].pk, "quantity": 1}
                for k in range(3)
            ],
        }
        for i in range(count)
    ]


def as_an_earlier_run_left_it() -> None:
    """Every product and score viewed or scored, marked by an earlier run, written long ago.

    So a run that resets a counter, a mark or a timestamp it should keep (or
    keeps one it should write) changes the state.
    """
    earlier = BatchProcessingLogFactory(operation=BatchProcessingLog.Operation.PRODUCTS)
    # auto_now and auto_now_add fill the timestamps on save: set them here.
    Product.objects.update(
        view_count=F("pk") % 5 + 3,
        last_import=earlier,
        last_import_row=F("pk") + 100,
        created_at=EARLIER,
        updated_at=EARLIER,
    )
    RecommendationScore.objects.update(
        last_run=earlier, last_run_row=F("pk") + 100, updated_at=EARLIER
    )


THIS_RUN = "this run"  # a timestamp or a mark the last run wrote


def state() -> dict:
    """The shop's data by natural keys, so two runs can be compared.

    Every column an operation may write is in it. A timestamp or a run mark
    the last run wrote reads ``THIS_RUN`` (the two runs compared write at
    different times, under different log ids); older ones read as they are.
    """
    run = BatchProcessingLog.objects.order_by("-pk").first()

    def at(moment: datetime) -> datetime | str:
        return THIS_RUN if run and moment >= run.started_at else moment

    def mark(log_id: int | None) -> int | str | None:
        return THIS_RUN if run and log_id == run.pk else log_id

    return {
        "categories": sorted(Category.objects.values_list("name", flat=True)),
        "products": {
            sku: (*rest, at(created), at(updated), mark(log_id), row)
            for sku, *rest, created, updated, log_id, row in Product.objects.values_list(
                "sku",
                "name",
                "category__name",
                "price",
                "stock_quantity",
                "is_active",
                "view_count",
                "created_at",
                "updated_at",
                "last_import",
                "last_import_row",
            )
        },
        "views": sorted(
            ProductView.objects.values_list(
                "user_id", "product_id", "session_id", "interaction_type", "created_at"
            )
        ),
        "scores": {
            (u, p, a): (score, at(updated), mark(log_id), row)
            for u, p, a, score, updated, log_id, row in RecommendationScore.objects.values_list(
                "user_id",
                "product_id",
                "algorithm",
                "score",
                "updated_at",
                "last_run",
                "last_run_row",
            )
        },
        "orders": {
            ref: (user, status, total)
            for ref, user, status, total in Order.objects.values_list(
                "reference", "user_id", "status", "total"
            )
        },
        "items": sorted(
            OrderItem.objects.values_list(
                "order__reference", "product_id", "quantity", "unit_price"
            )
        ),
    }


def outcome(result) -> dict:
    data = result.as_dict()
    for volatile in ("log_id", "variant", "query_count", "duration"):
        data.pop(volatile)
    return data


def run_both(naive, optimized, method: str, rows: list, **kwargs):
    """Run naive (then undo it) and optimized on the same state; return both."""
    with transaction.atomic():
        naive_result = getattr(naive, method)(iter(rows), **kwargs)
        naive_state = state()
        transaction.set_rollback(True)
    optimized_result = getattr(optimized, method)(iter(rows), **kwargs)
    return naive_result, naive_state, optimized_result, state()


# -- query counts ----------------------------------------------------------------


class TestOptimizedQueryCounts:
    @pytest.mark.parametrize(("count", "chunk_size"), [(20, 1000), (20, 7), (45, 1000), (45, 7)])
    def test_product_views(self, optimized, shop, django_assert_num_queries, count, chunk_size):
        # users, products, INSERT views, UPDATE view_count (locks, last). The
        # fast path reads users and products in one statement and COPYs the views.
        per_view_chunk = 3 if fast() else 4 + portable_locks()
        expected = chunks(count, chunk_size) * per_chunk(per_view_chunk)
        with django_assert_num_queries(expected):
            result = optimized.create_product_views(view_rows(shop, count), chunk_size=chunk_size)
        assert result.written == count
        # The run records its count at its last checkpoint, before the test
        # transaction's RELEASE of that chunk's savepoint.
        assert result.query_count == expected - 1

    @pytest.mark.parametrize(("count", "chunk_size"), [(12, 1000), (12, 5), (36, 1000), (36, 5)])
    def test_recommendation_scores(
        self, optimized, shop, django_assert_num_queries, count, chunk_size
    ):
        # users, products, one upsert; PostgreSQL reads users and products in
        # one statement and tells created from updated in the upsert itself,
        # elsewhere the existing keys are read first.
        expected = LOG_QUERIES + chunks(count, chunk_size) * per_chunk(2 if fast() else 4)
        with django_assert_num_queries(expected):
            result = optimized.upsert_recommendation_scores(
                score_rows(shop, count), chunk_size=chunk_size
            )
        assert result.written == count

    @pytest.mark.parametrize(("count", "chunk_size"), [(10, 1000), (10, 4), (40, 1000), (40, 4)])
    def test_import_products_known_categories(
        self, optimized, django_assert_num_queries, count, chunk_size
    ):
        for name in ("Imported 0", "Imported 1", "Imported 2"):
            CategoryFactory(name=name)
        # categories, one upsert (+ existing skus, except on PostgreSQL).
        expected = LOG_QUERIES + chunks(count, chunk_size) * per_chunk(2 if fast() else 3)
        with django_assert_num_queries(expected):
            result = optimized.import_products(product_rows(count), chunk_size=chunk_size)
        assert result.created == count

    def test_import_products_creates_missing_categories_in_three_more_queries(
        self, optimized, django_assert_num_queries
    ):
        # categories, skus this run wrote (none), INSERT missing, read their ids
        # back, upsert (+ existing skus).
        with django_assert_num_queries(LOG_QUERIES + per_chunk(5 if fast() else 6)):
            result = optimized.import_products(product_rows(30))
        assert result.created == 30
        assert Category.objects.count() == 3

    @pytest.mark.parametrize(("count", "chunk_size"), [(8, 1000), (8, 3), (32, 1000), (32, 7)])
    def test_orders(
        self, optimized, shop, orders_statistics, django_assert_num_queries, count, chunk_size
    ):
        Product.objects.update(stock_quantity=1000)
        # products, references, users (read, unlocked), INSERT orders, INSERT
        # items, UPDATE stock (locks, last). PostgreSQL reads the three in one
        # statement and inserts orders and items in one. Each order has 3
        # lines, and a chunk holds orders until their lines reach chunk_size.
        order_chunks = chunks(count, math.ceil(chunk_size / 3))
        expected = order_chunks * per_chunk(
            3 if fast() else 6 + portable_locks()
        ) + statistics_check(order_chunks)
        with django_assert_num_queries(expected):
            result = optimized.process_orders(order_rows(shop, count), chunk_size=chunk_size)
        assert result.written == count

    @pytest.mark.parametrize(("count", "chunk_size"), [(12, 1000), (12, 5), (36, 5)])
    def test_update_products(self, optimized, django_assert_num_queries, count, chunk_size):
        ProductFactory.create_batch(count)
        rows = [
            {"sku": sku, "price": "1.50", "stock_quantity": n}
            for n, sku in enumerate(Product.objects.values_list("sku", flat=True))
        ]
        # products by sku (locked), one UPDATE; on PostgreSQL one statement does both.
        expected = LOG_QUERIES + chunks(count, chunk_size) * per_chunk(1 if fast() else 2)
        with django_assert_num_queries(expected):
            result = optimized.update_products(rows, chunk_size=chunk_size)
        assert result.updated == count

    def test_chunk_of_invalid_rows_only_writes_its_checkpoint(
        self, optimized, django_assert_num_queries
    ):
        with django_assert_num_queries(per_chunk(0)):
            result = optimized.create_product_views([{"user_id": "x"}, 7])
        assert result.skipped == 2

    def test_querysets_raise_on_lazy_loads(self, optimized, shop, monkeypatch, settings):
        """FETCH_RAISE: a per-row lazy load in the service fails instead of querying.

        Orders read their products through a queryset on the portable path
        (PostgreSQL's fast path reads them with one array statement).
        """
        settings.BULK_PG_FAST_PATHS = False
        from django.core.exceptions import FieldFetchBlocked

        from orders import operations as module

        original = module.strict

        def strict_then_lazy(queryset):
            queryset = original(queryset)
            if queryset.model is Product:
                for product in queryset.only("pk"):
                    product.category  # noqa: B018 - the lazy load under test
            return queryset

        monkeypatch.setattr(module, "strict", strict_then_lazy)
        with pytest.raises(FieldFetchBlocked):
            optimized.process_orders(order_rows(shop, 2))


class TestNaiveQueryCounts:
    def test_product_views_cost_four_queries_a_row(self, naive, shop, django_assert_num_queries):
        count, chunk_size = 20, 7
        # Per row: user, product, INSERT view, UPDATE product.
        expected = chunks(count, chunk_size) * per_chunk(0) + 4 * count
        with django_assert_num_queries(expected):
            naive.create_product_views(view_rows(shop, count), chunk_size=chunk_size)

    def test_update_products_costs_two_queries_a_row(self, naive, django_assert_num_queries):
        skus = [product.sku for product in ProductFactory.create_batch(5)]
        # Per row: the product by sku, its UPDATE.
        with django_assert_num_queries(LOG_QUERIES + per_chunk(0) + 2 * 5):
            naive.update_products([{"sku": sku, "stock_quantity": 1} for sku in skus])

    def test_queries_grow_with_rows(self, naive, shop):
        small = naive.upsert_recommendation_scores(score_rows(shop, 6)).query_count
        large = naive.upsert_recommendation_scores(score_rows(shop, 24, "other")).query_count
        assert large - per_chunk(0) >= 4 * (small - per_chunk(0))


# -- naive and optimized agree ----------------------------------------------------


class TestSameEndState:
    def test_product_views(self, naive, optimized, shop):
        as_an_earlier_run_left_it()
        before = dict(Product.objects.values_list("pk", "view_count"))
        rows = [*view_rows(shop, 30), {"user_id": 999999, "product_id": 1, "session_id": "x"}]
        n_result, n_state, o_result, o_state = run_both(
            naive, optimized, "create_product_views", rows, chunk_size=8
        )
        assert n_state == o_state
        assert outcome(n_result) == outcome(o_result)
        assert (o_result.written, o_result.skipped) == (30, 1)
        # 30 views over four products in turn: 8, 8, 7 and 7; none of the inactive one.
        grown = dict(zip([p.pk for p in shop["products"]], [8, 8, 7, 7], strict=True))
        assert dict(Product.objects.values_list("pk", "view_count")) == {
            pk: count + grown.get(pk, 0) for pk, count in before.items()
        }

    def test_recommendation_scores(self, naive, optimized, shop):
        existing = score_rows(shop, 6)
        for row in existing:
            RecommendationScoreFactory(
                user_id=row["user_id"],
                product_id=row["product_id"],
                algorithm=row["algorithm"],
                score=0.9,
            )
        as_an_earlier_run_left_it()
        rows = score_rows(shop, 12)
        n_result, n_state, o_result, o_state = run_both(
            naive, optimized, "upsert_recommendation_scores", rows, chunk_size=5
        )
        assert n_state == o_state
        assert outcome(n_result) == outcome(o_result)
        assert (o_result.created, o_result.updated) == (6, 6)

    def test_import_products(self, naive, optimized):
        for row in product_rows(10):
            ProductFactory(sku=row["sku"], price=Decimal("99.00"))
        as_an_earlier_run_left_it()
        n_result, n_state, o_result, o_state = run_both(
            naive, optimized, "import_products", product_rows(20), chunk_size=6
        )
        assert n_state == o_state
        assert outcome(n_result) == outcome(o_result)
        assert (o_result.created, o_result.updated) == (10, 10)

    def test_update_products(self, naive, optimized):
        skus = [product.sku for product in ProductFactory.create_batch(12, stock_quantity=5)]
        as_an_earlier_run_left_it()
        rows = [
            {"sku": skus[0], "price": "1.25", "stock_quantity": 0},
            {"sku": skus[1], "price": "2.50"},  # stock stays
            {"sku": skus[2], "stock_quantity": "7", "price": ""},  # price stays
            {"sku": "NOT-THERE", "price": "1.00"},
            {"sku": skus[1], "price": "9.99"},  # duplicate sku
            *({"sku": sku, "price": f"{n}.{n:02d}"} for n, sku in enumerate(skus[3:])),
        ]
        n_result, n_state, o_result, o_state = run_both(
            naive, optimized, "update_products", rows, chunk_size=4
        )
        assert n_state == o_state
        assert outcome(n_result) == outcome(o_result)
        assert (o_result.written, o_result.updated, o_result.skipped) == (12, 12, 2)
        assert o_state["products"][skus[1]][2:4] == (Decimal("2.50"), 5)
        assert o_state["products"][skus[2]][2:4] == (Decimal("10.00"), 7)

    def test_orders(self, naive, optimized, shop):
        rows = order_rows(shop, 20)
        rows[3]["items"][0]["quantity"] = 50  # more than the stock: rejected alone
        rows.append({**rows[0], "reference": "NEW"})  # valid, different reference
        rows.append({**rows[1]})  # same reference within the input
        n_result, n_state, o_result, o_state = run_both(
            naive, optimized, "process_orders", rows, chunk_size=4
        )
        assert n_state == o_state
        assert outcome(n_result) == outcome(o_result)
        # Each order takes one unit of three of the four products (stock 10):
        # 13 orders take 39 units; from order 13 on, one of its three is gone.
        short = [3, 13, 14, 16, 17, 18, 19, 20]
        assert (o_result.written, o_result.skipped) == (13, 9)
        assert errors_by_index(o_result) == {
            **dict.fromkeys(short, ("items", "insufficient_stock")),
            21: ("reference", "duplicate"),
        }
        stock = dict(Product.objects.values_list("pk", "stock_quantity"))
        assert [stock[p.pk] for p in shop["products"]] == [0, 0, 0, 1]
        assert stock[shop["inactive"].pk] == 10


# -- every column an operation touches, and no other ----------------------------------

NOW = "written by this run"  # stands for a timestamp taken during the run


@pytest.fixture
def marked():
    """Six products as an earlier import left them: views counted, its marks, old times."""
    ProductFactory.create_batch(
        6,
        sku=factory.Iterator(f"OLD-{n}" for n in range(6)),
        category=CategoryFactory(name="Old shelf"),
        price=Decimal("3.00"),
        stock_quantity=9,
    )
    as_an_earlier_run_left_it()


def every_column() -> dict[str, dict]:
    """Each product by sku, every column of it."""
    return {row["sku"]: row for row in Product.objects.values()}


def written_during(columns: dict[str, dict], started: datetime) -> dict[str, dict]:
    """``columns`` with each timestamp taken after ``started`` shown as ``NOW``."""
    return {
        sku: row
        | {
            name: NOW
            for name in ("created_at", "updated_at")
            if started <= row[name] <= timezone.now()
        }
        for sku, row in columns.items()
    }


class TestEveryColumn:
    """The exact state of every column afterwards, from seeded non-zero counters and marks.

    A naive-against-optimized comparison misses what both variants do alike
    (or what the compared columns leave out): these state the values.
    """

    def test_import_products(self, service, marked):
        before = every_column()
        rows = [
            {"sku": "OLD-1", "name": "One", "category": "New shelf", "price": "1.10",
             "stock_quantity": 1, "is_active": False},
            {"sku": "NEW-0", "name": "Fresh", "category": "Old shelf", "price": "5.00",
             "stock_quantity": 4},
            {"sku": "OLD-0", "name": "Zero", "category": "Old shelf", "price": "0.50",
             "stock_quantity": 0},
            {"sku": "NEW-1", "name": "Fresher", "category": "New shelf", "price": "6.00",
             "stock_quantity": 5, "is_active": False},
            {"sku": "OLD-2", "name": "Two", "category": "New shelf", "price": "2.20",
             "stock_quantity": 2},
        ]  # fmt: skip
        started = timezone.now()
        result = service.import_products(rows, chunk_size=2)

        after = written_during(every_column(), started)
        assert (result.created, result.updated, result.skipped) == (2, 3, 0)
        categories = dict(Category.objects.values_list("name", "pk"))
        expected = {sku: before[sku] for sku in ("OLD-3", "OLD-4", "OLD-5")}
        for index, row in enumerate(rows):
            sku = row["sku"]
            written = {
                "name": row["name"],
                "category_id": categories[row["category"]],
                "price": Decimal(row["price"]),
                "stock_quantity": row["stock_quantity"],
                "is_active": row.get("is_active", True),
                "updated_at": NOW,
                "last_import_id": result.log_id,
                "last_import_row": index,
            }
            if sku in before:  # updated: its counter and creation time stay
                expected[sku] = before[sku] | written
            else:
                expected[sku] = written | {
                    "id": after[sku]["id"],
                    "sku": sku,
                    "view_count": 0,
                    "created_at": NOW,
                }
        assert after == expected

    def test_update_products(self, service, marked):
        before = every_column()
        rows = [
            {"sku": "OLD-1", "price": "1.10"},
            {"sku": "OLD-0", "stock_quantity": 0},
            {"sku": "MISSING", "price": "1.00"},
            {"sku": "OLD-2", "price": "2.20", "stock_quantity": 2},
            {"sku": "OLD-1", "stock_quantity": 5},  # repeated: the first row wins
        ]
        started = timezone.now()
        result = service.update_products(rows, chunk_size=2)

        after = written_during(every_column(), started)
        assert (result.updated, result.skipped) == (3, 2)
        assert errors_by_index(result) == {2: ("sku", "not_found"), 4: ("sku", "duplicate")}
        marks = {"updated_at": NOW, "last_import_id": result.log_id}
        assert after == before | {
            "OLD-1": before["OLD-1"] | marks | {"price": Decimal("1.10"), "last_import_row": 0},
            "OLD-0": before["OLD-0"] | marks | {"stock_quantity": 0, "last_import_row": 1},
            "OLD-2": before["OLD-2"]
            | marks
            | {"price": Decimal("2.20"), "stock_quantity": 2, "last_import_row": 3},
        }

    def test_product_views(self, service, marked):
        before = every_column()
        users = UserFactory.create_batch(2)
        pks = dict(Product.objects.values_list("sku", "pk"))
        rows = [
            {"user_id": users[n % 2].pk, "product_id": pks[sku], "session_id": f"v{n}"}
            for n, sku in enumerate(["OLD-0", "OLD-2", "OLD-0", "OLD-5"])
        ]
        result = service.create_product_views(rows, chunk_size=3)

        assert (result.written, result.skipped) == (4, 0)
        assert every_column() == before | {
            sku: before[sku] | {"view_count": before[sku]["view_count"] + views}
            for sku, views in (("OLD-0", 2), ("OLD-2", 1), ("OLD-5", 1))
        }

    def test_orders(self, service, marked):
        before = every_column()
        user = UserFactory()
        pks = dict(Product.objects.values_list("sku", "pk"))
        rows = [
            {"reference": "A", "user_id": user.pk,
             "items": [{"product_id": pks["OLD-0"], "quantity": 4},
                       {"product_id": pks["OLD-1"], "quantity": 1}]},
            {"reference": "B", "user_id": user.pk,
             "items": [{"product_id": pks["OLD-0"], "quantity": 6}]},  # 5 left: rejected
            {"reference": "C", "user_id": user.pk,
             "items": [{"product_id": pks["OLD-0"], "quantity": 5}]},
        ]  # fmt: skip
        result = service.process_orders(rows, chunk_size=2)

        assert (result.written, result.skipped) == (2, 1)
        assert errors_by_index(result) == {1: ("items", "insufficient_stock")}
        assert every_column() == before | {
            "OLD-0": before["OLD-0"] | {"stock_quantity": 0},
            "OLD-1": before["OLD-1"] | {"stock_quantity": 8},
        }
        assert dict(Order.objects.values_list("reference", "total")) == {
            "A": Decimal("15.00"),
            "C": Decimal("15.00"),
        }


# -- bad rows ---------------------------------------------------------------------


def errors_by_index(result) -> dict[int, tuple[str, str]]:
    return {error.index: (error.field, error.code) for error in result.errors}


class TestBadRows:
    def test_product_views(self, service, shop):
        user, product = shop["users"][0].pk, shop["products"][0].pk
        good = {"user_id": user, "product_id": product, "session_id": "s"}
        rows = [
            good,
            {**good, "user_id": 999_999},  # unknown user
            {**good, "product_id": 999_999},  # unknown product
            {"product_id": product, "session_id": "s"},  # missing user_id
            {**good, "user_id": "abc"},  # ill-typed
            {**good, "user_id": True},  # a bool is not an id
            {**good, "interaction_type": "like"},  # not a choice
            {**good, "session_id": "x" * 65},  # too long
            {**good, "created_at": "yesterday"},  # not a date-time
            ["not", "a", "mapping"],
            good,
        ]
        result = service.create_product_views(iter(rows), chunk_size=4)
        assert errors_by_index(result) == {
            1: ("user_id", "not_found"),
            2: ("product_id", "not_found"),
            3: ("user_id", "invalid"),
            4: ("user_id", "invalid"),
            5: ("user_id", "invalid"),
            6: ("interaction_type", "invalid"),
            7: ("session_id", "invalid"),
            8: ("created_at", "invalid"),
            9: ("row", "invalid"),
        }
        assert (result.read, result.written, result.skipped) == (11, 2, 9)
        assert ProductView.objects.count() == 2
        assert Product.objects.get(pk=product).view_count == 2
        assert result.status == BatchProcessingLog.Status.PARTIAL

    def test_recommendation_scores(self, service, shop):
        user, product = shop["users"][0].pk, shop["products"][0].pk
        good = {"user_id": user, "product_id": product, "algorithm": "a", "score": 0.5}
        rows = [
            good,
            {**good, "score": 1.5},  # out of range
            {**good, "algorithm": "b", "score": "nan"},  # not finite
            {**good, "algorithm": "c", "score": "high"},  # ill-typed
            {**good, "algorithm": ""},  # blank
            {**good, "score": 0.7},  # duplicate key of row 0
            {**good, "algorithm": "d", "product_id": 999_999},  # unknown product
            {**good, "algorithm": "e", "score": "0.25"},  # a numeric string is fine
        ]
        result = service.upsert_recommendation_scores(rows, chunk_size=3)
        assert errors_by_index(result) == {
            1: ("score", "invalid"),
            2: ("score", "invalid"),
            3: ("score", "invalid"),
            4: ("algorithm", "invalid"),
            5: ("user_id, product_id, algorithm", "duplicate"),
            6: ("product_id", "not_found"),
        }
        assert "first seen at row 0" in result.errors[4].message
        assert dict(RecommendationScore.objects.values_list("algorithm", "score")) == {
            "a": 0.5,
            "e": 0.25,
        }

    def test_import_products(self, service):
        good = {
            "sku": "A",
            "name": "Anvil",
            "category": "Tools",
            "price": "9.99",
            "stock_quantity": 3,
        }
        rows = [
            good,
            {**good, "sku": "B", "price": "-1"},  # negative
            {**good, "sku": "C", "price": "1.999"},  # too precise
            {**good, "sku": "D", "price": "cheap"},  # ill-typed
            {**good, "sku": "E", "stock_quantity": -2},  # below zero
            {**good, "sku": "F", "stock_quantity": 1.5},  # not an integer
            {**good, "sku": "G", "is_active": "maybe"},  # not a boolean
            {**good, "sku": "H", "name": None},  # missing
            {**good, "name": "Anvil again"},  # duplicate sku of row 0
            {**good, "sku": "I", "price": "1e20"},  # too large
            {**good, "sku": "J", "is_active": "no", "price": 5},
        ]
        result = service.import_products(rows, chunk_size=4)
        assert errors_by_index(result) == {
            1: ("price", "invalid"),
            2: ("price", "invalid"),
            3: ("price", "invalid"),
            4: ("stock_quantity", "invalid"),
            5: ("stock_quantity", "invalid"),
            6: ("is_active", "invalid"),
            7: ("name", "invalid"),
            8: ("sku", "duplicate"),
            9: ("price", "invalid"),
        }
        assert dict(Product.objects.values_list("sku", "name")) == {"A": "Anvil", "J": "Anvil"}
        assert Product.objects.get(sku="J").is_active is False
        assert Product.objects.get(sku="J").price == Decimal("5.00")

    def test_update_products(self, service):
        product = ProductFactory(sku="A", price=Decimal("3.00"), stock_quantity=4)
        before = product.updated_at
        rows = [
            {"sku": "A", "price": "4.50"},
            {"sku": "A", "stock_quantity": 1},  # duplicate sku of row 0
            {"sku": "B", "price": "1.00"},  # unknown sku
            {"sku": "C"},  # nothing to update
            {"sku": "D", "price": "", "stock_quantity": None},  # blank is not given
            {"sku": "E", "price": "-1"},  # negative
            {"sku": "F", "stock_quantity": "many"},  # ill-typed
            {"price": "1.00"},  # no sku
            "A",  # not an object
        ]
        result = service.update_products(rows, chunk_size=4)
        assert errors_by_index(result) == {
            1: ("sku", "duplicate"),
            2: ("sku", "not_found"),
            3: ("row", "invalid"),
            4: ("row", "invalid"),
            5: ("price", "invalid"),
            6: ("stock_quantity", "invalid"),
            7: ("sku", "invalid"),
            8: ("row", "invalid"),
        }
        messages = {error.index: error.message for error in result.errors}
        assert messages[2] == r.UNKNOWN_SKU.format(sku="B")
        assert messages[3] == r.NOTHING_TO_UPDATE
        product.refresh_from_db()
        assert (product.price, product.stock_quantity) == (Decimal("4.50"), 4)
        assert product.updated_at > before
        assert (result.read, result.written, result.updated) == (9, 1, 1)
        log = BatchProcessingLog.objects.get(pk=result.log_id)
        assert log.operation == BatchProcessingLog.Operation.PRODUCT_UPDATES

    def test_orders(self, service, shop):
        user, (p1, p2, *_) = shop["users"][0].pk, shop["products"]
        item = {"product_id": p1.pk, "quantity": 1}
        good = {"reference": "R0", "user_id": user, "items": [item]}
        rows = [
            good,
            {**good, "reference": "R1", "user_id": 999_999},  # unknown user
            {**good, "reference": "R2", "items": [item, {"product_id": 999_999, "quantity": 1}]},
            {
                **good,
                "reference": "R3",
                "items": [{"product_id": shop["inactive"].pk, "quantity": 1}],
            },
            {**good, "reference": "R4", "items": [{"product_id": p1.pk, "quantity": 0}]},
            {**good, "reference": "R5", "items": [{"product_id": p1.pk, "quantity": "2.5"}]},
            {**good, "reference": "R6", "items": []},
            {**good, "reference": "R7", "items": "p1"},
            {**good, "reference": "R8", "items": [{"product_id": p2.pk, "quantity": 11}]},
            {**good, "items": [{"product_id": p2.pk, "quantity": 1}]},  # duplicate reference
            {**good, "reference": "R9"},
        ]
        result = service.process_orders(rows, chunk_size=5)
        assert errors_by_index(result) == {
            1: ("user_id", "not_found"),
            2: ("items[1].product_id", "not_found"),
            3: ("items[0].product_id", "inactive"),
            4: ("items[0].quantity", "invalid"),
            5: ("items[0].quantity", "invalid"),
            6: ("items", "invalid"),
            7: ("items", "invalid"),
            8: ("items", "insufficient_stock"),
            9: ("reference", "duplicate"),
        }
        assert sorted(Order.objects.values_list("reference", flat=True)) == ["R0", "R9"]
        p1.refresh_from_db()
        p2.refresh_from_db()
        assert (p1.stock_quantity, p2.stock_quantity) == (8, 10)

    def test_bad_input_never_raises(self, service):
        for method in (
            service.create_product_views,
            service.upsert_recommendation_scores,
            service.import_products,
            service.process_orders,
            service.update_products,
        ):
            result = method([None, 1, "x", [], {}, {"items": None}])
            assert result.skipped == 6
            assert result.written == 0


# -- orders -------------------------------------------------------------------------


class TestOrders:
    def test_applied_whole_with_catalogue_prices(self, service, shop):
        p1, p2 = shop["products"][:2]
        p1.price, p2.price = Decimal("2.50"), Decimal("4.00")
        Product.objects.bulk_update([p1, p2], ["price"])
        order = {
            "reference": "WHOLE",
            "user_id": shop["users"][0].pk,
            "items": [
                {"product_id": p1.pk, "quantity": 2},
                {"product_id": p2.pk, "quantity": 1},
                {"product_id": p1.pk, "quantity": 1},
            ],
        }
        result = service.process_orders([order])
        assert result.written == 1
        created = Order.objects.get(reference="WHOLE")
        assert created.total == Decimal("11.50")
        assert sorted(created.items.values_list("product_id", "quantity", "unit_price")) == sorted(
            [(p1.pk, 2, Decimal("2.50")), (p2.pk, 1, Decimal("4.00")), (p1.pk, 1, Decimal("2.50"))]
        )
        assert Product.objects.get(pk=p1.pk).stock_quantity == 7

    def test_an_order_the_database_refuses_for_good_is_isolated_not_retried(
        self, optimized, shop, monkeypatch
    ):
        """Only a unique reference is a race worth a retry; another refusal
        (here made by the test) is narrowed to its order and reported."""
        original = OptimizedOrders.insert

        def refusing(op, orders, lines):
            if any(reference == "REF-0003" for reference, *_ in orders):
                raise IntegrityError("new row violates check constraint")
            return original(op, orders, lines)

        monkeypatch.setattr(OptimizedOrders, "insert", refusing)
        result = optimized.process_orders(order_rows(shop, 8))

        assert (result.written, [(e.index, e.code) for e in result.errors]) == (
            7,
            [(3, "database")],
        )
        log = BatchProcessingLog.objects.get(pk=result.log_id)
        assert log.chunks_retried == 0
        assert Order.objects.count() == 7

    def test_short_stock_order_is_rejected_alone_and_whole(self, service, shop):
        p1, p2 = shop["products"][:2]
        user = shop["users"][0].pk
        rows = [
            {"reference": "A", "user_id": user, "items": [{"product_id": p1.pk, "quantity": 6}]},
            # p2 is fine, p1 has only 4 left: nothing of this order is applied.
            {
                "reference": "B",
                "user_id": user,
                "items": [
                    {"product_id": p2.pk, "quantity": 1},
                    {"product_id": p1.pk, "quantity": 5},
                ],
            },
            {"reference": "C", "user_id": user, "items": [{"product_id": p1.pk, "quantity": 4}]},
        ]
        result = service.process_orders(rows)
        assert [e.index for e in result.errors] == [1]
        assert result.errors[0].message == parsed_orders.INSUFFICIENT_STOCK.format(
            id=p1.pk, requested=5, available=4
        )
        assert sorted(Order.objects.values_list("reference", flat=True)) == ["A", "C"]
        assert not OrderItem.objects.filter(order__reference="B").exists()
        stocks = dict(
            Product.objects.filter(pk__in=[p1.pk, p2.pk]).values_list("pk", "stock_quantity")
        )
        assert stocks == {p1.pk: 0, p2.pk: 10}

    def test_stock_never_goes_below_zero(self, service, shop):
        product = shop["products"][0]
        rows = [
            {
                "reference": f"S{i}",
                "user_id": shop["users"][0].pk,
                "items": [{"product_id": product.pk, "quantity": 3}],
            }
            for i in range(6)
        ]
        result = service.process_orders(rows, chunk_size=2)
        assert result.written == 3
        assert Product.objects.get(pk=product.pk).stock_quantity == 1

    def test_a_repeated_reference_is_not_applied_twice(self, service, shop):
        rows = order_rows(shop, 3)
        first = service.process_orders(rows)
        again = service.process_orders(rows)
        assert (first.written, again.written) == (3, 0)
        assert {e.code for e in again.errors} == {"duplicate"}
        assert Order.objects.count() == 3
        assert OrderItem.objects.count() == 9
        assert set(
            Product.objects.filter(is_active=True).values_list("stock_quantity", flat=True)
        ) <= {7, 8}

    def test_known_reference_from_earlier_is_a_duplicate(self, service, shop):
        OrderFactory(reference="OLD", user=shop["users"][0])
        result = service.process_orders(
            [
                {
                    "reference": "OLD",
                    "user_id": shop["users"][0].pk,
                    "items": [{"product_id": shop["products"][0].pk, "quantity": 1}],
                }
            ]
        )
        assert result.errors[0].message == parsed_orders.DUPLICATE_ORDER.format(reference="OLD")


# -- the log ------------------------------------------------------------------------


class TestBatchLog:
    def test_figures_match_what_happened(self, service, shop, django_assert_num_queries, settings):
        settings.BULK_LOG_MAX_ROW_ERRORS = 2
        rows = view_rows(shop, 10) + [{"user_id": "bad"}] * 3
        result = service.create_product_views(iter(rows), chunk_size=4)
        log = BatchProcessingLog.objects.get(pk=result.log_id)
        assert log.operation == BatchProcessingLog.Operation.PRODUCT_VIEWS
        assert log.variant == service.variant
        assert log.status == BatchProcessingLog.Status.PARTIAL
        assert (log.rows_read, log.rows_written, log.rows_created, log.rows_skipped) == (
            13,
            10,
            10,
            3,
        )
        assert (log.chunk_size, log.chunks_committed, log.chunks_rolled_back) == (4, 4, 0)
        assert log.checkpoint_position == 13
        assert log.query_count == result.query_count
        assert log.database_vendor in {"sqlite", "postgresql"}
        assert log.finished_at >= log.started_at
        assert log.duration_seconds == pytest.approx(result.duration)
        assert log.rows_per_second == pytest.approx(13 / log.duration_seconds)
        assert log.row_errors == [
            {"index": 10, "field": "user_id", "message": r.NOT_INTEGER, "code": "invalid"},
            {"index": 11, "field": "user_id", "message": r.NOT_INTEGER, "code": "invalid"},
        ]
        assert log.error_summary == "3 rows skipped: 3 invalid"
        assert len(result.errors) == 3  # the result keeps every error; the log a capped few

    def test_clean_run_is_completed(self, optimized, shop):
        result = optimized.create_product_views(view_rows(shop, 3))
        assert result.log.status == BatchProcessingLog.Status.COMPLETED
        assert result.log.error_summary == ""

    def test_empty_input(self, service):
        result = service.import_products([])
        assert (result.read, result.written, result.status) == (0, 0, "completed")

    def test_unexpected_error_marks_the_log_failed_and_raises(self, optimized, shop, monkeypatch):
        from products.services.optimized import OptimizedViews

        def broken(self, rows, run):
            raise RuntimeError("boom")

        monkeypatch.setattr(OptimizedViews, "write", broken)
        with pytest.raises(RuntimeError):
            optimized.create_product_views(view_rows(shop, 3))
        log = BatchProcessingLog.objects.get()
        assert log.status == BatchProcessingLog.Status.FAILED
        assert log.error_summary == "RuntimeError: boom"

    def test_chunk_size_must_be_positive(self, optimized):
        with pytest.raises(ValueError, match="chunk_size"):
            optimized.import_products([], chunk_size=0)
