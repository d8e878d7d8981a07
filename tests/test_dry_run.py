"""A dry run: what a run would do with an input, with the run's own checks, writing nothing.

The admin's import preview is one (``jobs.services.check_job``); here the
engine's ``dry_run`` is compared with a real run of the same input.
"""

import pytest

from batching.engine import dry_run, run_batch
from batching.models import BatchProcessingLog
from products.models import Category, Product, ProductView
from products.services.optimized import OptimizedProducts, OptimizedScores, OptimizedViews
from tests.factories import CategoryFactory, ProductFactory, UserFactory

pytestmark = pytest.mark.django_db


def product(sku: str, price: str = "1.00") -> dict:
    return {"sku": sku, "name": sku, "category": "New", "price": price, "stock_quantity": 1}


def outcome(result) -> tuple:
    errors = [(e.index, e.field, e.message, e.code) for e in result.errors]
    return result.read, result.created, result.updated, result.skipped, errors


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_a_catalogue_dry_run_is_what_the_run_does(chunk_size):
    ProductFactory(sku="OLD", category=CategoryFactory(name="Tools"))
    # A bad price, a repeat in a later chunk (at 2 rows a chunk), an existing sku.
    rows = [product("A"), product("B", "x"), product("OLD"), product("A"), product("C")]
    checked = dry_run(OptimizedProducts(), rows, chunk_size=chunk_size)
    assert (Product.objects.count(), Category.objects.count()) == (1, 1)
    assert not BatchProcessingLog.objects.exists()
    assert outcome(checked) == outcome(run_batch(OptimizedProducts(), rows, chunk_size=chunk_size))
    assert (checked.created, checked.updated, checked.skipped) == (2, 1, 2)


def test_a_views_dry_run_is_what_the_run_does():
    user, item = UserFactory(), ProductFactory()
    rows = [
        {"user_id": user.pk, "product_id": item.pk, "session_id": "a"},
        {"user_id": user.pk + 100, "product_id": item.pk, "session_id": "b"},
        {"user_id": user.pk, "product_id": item.pk + 100, "session_id": "c"},
        {"user_id": "x", "product_id": item.pk, "session_id": "d"},
    ]
    checked = dry_run(OptimizedViews(), rows, chunk_size=3)
    assert not ProductView.objects.exists()
    assert outcome(checked) == outcome(run_batch(OptimizedViews(), rows, chunk_size=3))
    assert [error.field for error in checked.errors] == ["user_id", "product_id", "user_id"]


def test_an_operation_without_a_check_has_no_dry_run():
    user, item = UserFactory(), ProductFactory()
    rows = [{"user_id": user.pk, "product_id": item.pk, "algorithm": "a", "score": 0.5}]
    with pytest.raises(NotImplementedError, match="has no dry run"):
        dry_run(OptimizedScores(), rows)
