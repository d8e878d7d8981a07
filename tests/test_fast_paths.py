"""PostgreSQL fast paths: the same input ends in the same state as the portable path.

On PostgreSQL each test runs the input once through the portable path
(``BULK_PG_FAST_PATHS`` off: ``bulk_create``, ``bulk_update``, ``Case``), rolls
it back, then through the fast paths (COPY, arrays through ``unnest``), and
compares the database state and the results. Elsewhere they are skipped: SQLite
always takes the portable path.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from psycopg import sql

from batching.models import BatchProcessingLog
from batching.postgres import ARRAY, _add_to, add_to, array_value, execute
from products.models import Product
from products.services import rows as r
from tests.factories import ProductFactory, RecommendationScoreFactory
from tests.test_services import (
    as_an_earlier_run_left_it,
    order_rows,
    outcome,
    product_rows,
    score_rows,
    shop,  # noqa: F401 - the fixture
    state,
    view_rows,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("the fast paths are PostgreSQL's")


def both_paths(optimized, settings, method: str, rows: list, **kwargs):
    """Portable path (rolled back), then fast path, on the same state."""
    settings.BULK_PG_FAST_PATHS = False
    with transaction.atomic():
        portable = getattr(optimized, method)(iter(rows), **kwargs)
        portable_state = state()
        transaction.set_rollback(True)
    settings.BULK_PG_FAST_PATHS = True
    fast = getattr(optimized, method)(iter(rows), **kwargs)
    return portable, portable_state, fast, state()


@pytest.mark.usefixtures("postgresql")
class TestSameStateAsThePortablePath:
    def test_product_views(self, optimized, settings, shop):  # noqa: F811
        rows = [
            {"user_id": 999_999, "product_id": shop["products"][0].pk, "session_id": "x"},
            {"user_id": shop["users"][0].pk, "product_id": 999_999, "session_id": "y"},
            *view_rows(shop, 30),
            {"user_id": "bad"},
        ]
        as_an_earlier_run_left_it()
        seeded = sum(Product.objects.values_list("view_count", flat=True))
        portable, before, fast, after = both_paths(
            optimized, settings, "create_product_views", rows, chunk_size=8
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        assert sum(Product.objects.values_list("view_count", flat=True)) == seeded + 30
        # Four chunks write, each two queries fewer: users and products are read
        # in one statement, and the portable path locks the products (pk order)
        # before it counts. The chunk with the unknown user and product names
        # them at once: nothing is rolled back.
        assert fast.query_count == portable.query_count - 2 * 4
        assert (fast.log.chunks_rerun, fast.log.chunks_rolled_back) == (0, 0)

    def test_product_views_read_ahead_with_an_unknown_reference(
        self,
        optimized,
        settings,
        shop,  # noqa: F811
    ):
        rows = [
            *view_rows(shop, 8),
            {"user_id": 999_999, "product_id": shop["products"][0].pk, "session_id": "x"},
            *view_rows(shop, 7),
        ]
        portable, before, fast, after = both_paths(
            optimized, settings, "create_product_views", rows, chunk_size=8
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        # Each chunk takes the checked write (users and products in one
        # statement, COPY, count: three queries against the portable path's
        # five: users, products, INSERT, lock, count): it names the row at
        # once and is never rolled back.
        assert fast.query_count == portable.query_count - 2 - 2
        assert (fast.log.chunks_rerun, fast.log.chunks_rolled_back) == (0, 0)

    def test_recommendation_scores(self, optimized, settings, shop):  # noqa: F811
        for row in score_rows(shop, 6):
            RecommendationScoreFactory(
                user_id=row["user_id"],
                product_id=row["product_id"],
                algorithm=row["algorithm"],
                score=0.9,
            )
        as_an_earlier_run_left_it()
        rows = [*score_rows(shop, 12), {"user_id": 999_999, "product_id": 1, "algorithm": "a"}]
        portable, before, fast, after = both_paths(
            optimized, settings, "upsert_recommendation_scores", rows, chunk_size=5
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        assert (fast.created, fast.updated) == (6, 6)

    def test_import_products(self, optimized, settings):
        for row in product_rows(10):
            ProductFactory(sku=row["sku"], price=Decimal("99.00"))
        as_an_earlier_run_left_it()
        portable, before, fast, after = both_paths(
            optimized, settings, "import_products", product_rows(20), chunk_size=6
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        assert (fast.created, fast.updated) == (10, 10)

    def test_update_products(self, optimized, settings):
        skus = [p.sku for p in ProductFactory.create_batch(10, stock_quantity=3)]
        as_an_earlier_run_left_it()
        rows = [
            {"sku": skus[0], "price": "0.99"},
            {"sku": skus[1], "stock_quantity": 0},
            {"sku": "MISSING", "price": "1.00"},
            *({"sku": sku, "price": f"{n}.50", "stock_quantity": n} for n, sku in enumerate(skus)),
        ]
        portable, before, fast, after = both_paths(
            optimized, settings, "update_products", rows, chunk_size=4
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        assert (fast.updated, fast.skipped) == (10, 3)  # one unknown, two repeated skus

    def test_orders(self, optimized, settings, shop):  # noqa: F811
        rows = order_rows(shop, 20)
        rows[3]["items"][0]["quantity"] = 50  # more than the stock: rejected alone
        as_an_earlier_run_left_it()
        portable, before, fast, after = both_paths(
            optimized, settings, "process_orders", rows, chunk_size=4
        )
        assert after == before
        assert outcome(fast) == outcome(portable)
        # As in test_services' TestSameEndState.test_orders: 13 orders fit the stock.
        assert (fast.written, fast.skipped) == (13, 7)
        stock = dict(Product.objects.values_list("pk", "stock_quantity"))
        assert [stock[p.pk] for p in shop["products"]] == [0, 0, 0, 1]


@pytest.mark.usefixtures("postgresql")
class TestFastPathDetails:
    def test_stock_guard_refuses_to_go_below_zero(self):
        """The last line of defence: the whole statement is refused, nothing changes."""
        low, high = ProductFactory(stock_quantity=2), ProductFactory(stock_quantity=10)
        refused = pytest.raises(IntegrityError, match="stock_quantity would go below zero")
        with refused, transaction.atomic():
            add_to(
                Product,
                "stock_quantity",
                {low.pk: -3, high.pk: -1},
                using="default",
                guard=True,
            )
        stocks = dict(Product.objects.values_list("pk", "stock_quantity"))
        assert stocks == {low.pk: 2, high.pk: 10}

    @pytest.mark.parametrize(
        ("values", "type_"),
        [
            (['a"b', "back\\slash", "", "NULL", None, "{x,y}", " padded ", "é\n\tz", ","], "text"),
            ([Decimal("1E+2"), Decimal("-0.50"), None, Decimal("12345678901.23")], "numeric"),
            ([1.5, float("inf"), 1e-7, None], "float8"),
            ([True, False, None], "boolean"),
            ([2**62, -1, 0, None], "bigint"),
            # One type and no NULL: joined whole.
            (["plain", "", "a, b", "{x}", "é\n"], "text"),
            ([3, -2, 2**62], "bigint"),
            ([Decimal("1.50"), Decimal("-2")], "numeric"),
            ([], "integer"),
        ],
    )
    def test_an_array_travels_as_its_text_and_reads_back_the_same(self, values, type_):
        """As the fast paths send it: bound on the server, cast to the column's type."""
        value = array_value(values)
        assert isinstance(value, str)
        assert execute("default", f"SELECT {ARRAY}::{type_}[]", [value]) == (1, (values,))

    def test_an_array_reaches_the_planner_as_a_constant_of_its_type(self):
        """Not text cast at execution: ``= ANY`` then hashes it (and the row estimate knows it)."""
        statement = sql.SQL(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE sku = ANY({}::varchar[])"
        ).format(sql.Identifier(Product._meta.db_table), sql.SQL(ARRAY))
        _, (plan,) = execute("default", statement, [array_value(["A", "B"])])
        assert "= ANY ('{A,B}'::text[])" in json.dumps(plan)

    def test_an_array_of_other_elements_is_left_to_psycopg(self):
        moments = [datetime(2026, 12, 4, 23, 0, tzinfo=UTC), None]
        assert array_value(moments) == moments
        statement = f"SELECT {ARRAY}::timestamptz[]"
        assert execute("default", statement, [moments]) == (1, (moments,))

    def test_add_to_reports_the_rows_it_changed(self):
        product = ProductFactory(view_count=1)
        changed = add_to(Product, "view_count", {product.pk: 2, 999_999: 5}, using="default")
        assert changed == {product.pk}
        assert Product.objects.get(pk=product.pk).view_count == 3

    def test_a_statement_is_composed_once_per_shape(self, django_assert_num_queries):
        """Its text is cached by shape (models, fields, options), never by the rows."""
        product = ProductFactory(view_count=1)
        _add_to.cache_clear()
        with django_assert_num_queries(3):
            add_to(Product, "view_count", {product.pk: 1}, using="default")
            add_to(Product, "view_count", {product.pk: 2, 999_999: 1}, using="default")
            add_to(Product, "view_count", {product.pk: -4}, using="default", guard=True)
        info = _add_to.cache_info()
        assert (info.misses, info.hits) == (2, 1)  # the guard is another shape
        assert Product.objects.get(pk=product.pk).view_count == 0

    def test_a_row_copy_refuses_is_isolated(self, optimized, shop, monkeypatch):  # noqa: F811
        """COPY's errors are Django's: a too-long session id (validation loosened) is isolated."""
        loose = r.text
        monkeypatch.setattr(r, "text", lambda row, name, *, limit: loose(row, name, limit=100))
        rows = view_rows(shop, 10)
        rows[2]["session_id"] = "x" * 70
        result = optimized.create_product_views(rows, chunk_size=10)
        assert [(error.index, error.code) for error in result.errors] == [(2, "database")]
        assert "too long" in result.errors[0].message
        assert result.written == 9
        assert sum(Product.objects.values_list("view_count", flat=True)) == 9

    def test_default_chunk_is_the_missions_on_every_path(
        self,
        optimized,
        settings,
        shop,  # noqa: F811
    ):
        """1,000 rows a chunk, as the product's specification fixes, fast paths or not."""
        assert settings.BULK_CHUNK_SIZE == 1000
        assert optimized.create_product_views(view_rows(shop, 3)).log.chunk_size == 1000
        assert optimized.import_products(product_rows(3)).log.chunk_size == 1000
        settings.BULK_PG_FAST_PATHS = False
        assert optimized.import_products(product_rows(3, prefix="P")).log.chunk_size == 1000


# -- memory ------------------------------------------------------------------------


def view_stream(user_id: int, product_id: int, count: int) -> Iterator[dict]:
    for i in range(count):
        yield {"user_id": user_id, "product_id": product_id, "session_id": f"s{i}"}


def peak_bytes(service, user_id: int, product_id: int, count: int) -> int:
    tracemalloc.start()
    try:
        result = service.create_product_views(
            view_stream(user_id, product_id, count), chunk_size=100
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.written == count
    return peak


@pytest.mark.django_db(transaction=True)
def test_memory_does_not_grow_with_the_input(optimized, shop):  # noqa: F811
    """A run holds one chunk at a time: four times the rows, about the same peak.

    Chunks really commit here (no test transaction around them), as in
    production: work deferred to a commit would otherwise pile up. (The naive
    service streams through the same engine; it is too slow to trace here.)
    """
    user, product = shop["users"][0].pk, shop["products"][0].pk
    peak_bytes(optimized, user, product, 100)  # warm caches and imports first
    small = peak_bytes(optimized, user, product, 500)
    large = peak_bytes(optimized, user, product, 2_000)
    assert large < small * 1.5, (small, large)
    assert BatchProcessingLog.objects.filter(rows_written=2_000).count() == 1
