"""``batching.portable.insert_rows``: one executemany, values adapted per column, upserts."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from batching.portable import insert_rows
from products.models import Product
from tests.factories import CategoryFactory, ProductFactory

pytestmark = pytest.mark.django_db

WHEN = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)
FIELDS = ["sku", "name", "category", "price", "stock_quantity", "is_active"]


def test_inserts_every_row_in_one_statement_with_constants(django_assert_num_queries):
    category = CategoryFactory()
    rows = [
        (f"P-{n}", f"Name {n}", category.pk, Decimal(f"{n}.25"), n, n % 2 == 0) for n in range(3)
    ]
    with django_assert_num_queries(1):
        insert_rows(
            Product,
            FIELDS,
            rows,
            constants={"created_at": WHEN, "updated_at": WHEN, "view_count": 0},
            using="default",
        )
    stored = Product.objects.order_by("sku").values_list(
        "sku", "name", "category_id", "price", "stock_quantity", "is_active", "created_at"
    )
    assert list(stored) == [(*row, WHEN) for row in rows]


def test_upsert_updates_only_the_named_fields_of_a_conflicting_row():
    existing = ProductFactory(sku="P-1", name="Old", price=Decimal("9.00"), view_count=7)
    insert_rows(
        Product,
        FIELDS,
        [
            ("P-1", "New", existing.category_id, Decimal("1.50"), 4, True),
            ("P-2", "Second", existing.category_id, Decimal("2.50"), 5, False),
        ],
        constants={"created_at": WHEN, "updated_at": WHEN, "view_count": 0},
        unique_fields=["sku"],
        update_fields=["name", "price"],
        using="default",
    )
    updated = Product.objects.get(sku="P-1")
    assert (updated.name, updated.price, updated.view_count) == ("New", Decimal("1.50"), 7)
    assert updated.created_at == existing.created_at  # not in update_fields
    assert Product.objects.get(sku="P-2").name == "Second"


def test_no_rows_is_no_query(django_assert_num_queries):
    with django_assert_num_queries(0):
        insert_rows(Product, FIELDS, [], using="default")
