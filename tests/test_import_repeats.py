"""A sku repeated across chunks of one catalogue import, in flat memory.

The engine compares keys within a chunk; a sku that an earlier chunk of the
same run wrote is found by the product's ``last_import`` mark, so a run holds
no keys beyond its current chunk.
"""

from decimal import Decimal

import pytest

from batching.engine import BatchRun
from batching.models import BatchProcessingLog
from products.models import Category, Product
from products.services.optimized import OptimizedProducts
from tests.test_services import LOG_QUERIES, fast, per_chunk

pytestmark = pytest.mark.django_db

REPEATED = "duplicate sku in this input (first seen at row {first})"


def row(sku: str, price: str = "1.00", category: str = "Tools") -> dict:
    return {
        "sku": sku,
        "name": f"name {sku}",
        "category": category,
        "price": price,
        "stock_quantity": 1,
    }


def test_a_sku_repeated_in_a_later_chunk_is_reported_with_its_first_row(service):
    rows = [row("A"), row("B"), row("C"), row("D"), row("A", "9.00", "Toys"), row("E")]
    result = service.import_products(rows, chunk_size=2)

    assert [(e.index, e.field, e.message, e.code) for e in result.errors] == [
        (4, "sku", REPEATED.format(first=0), "duplicate")
    ]
    assert (result.written, result.created, result.updated, result.skipped) == (5, 5, 0, 1)
    # The first row stands, and the repeated row created nothing (no "Toys").
    assert Product.objects.get(sku="A").price == Decimal("1.00")
    assert list(Category.objects.values_list("name", flat=True)) == ["Tools"]
    product = Product.objects.get(sku="A")
    assert (product.last_import_id, product.last_import_row) == (result.log_id, 0)


def test_a_later_run_updates_what_an_earlier_run_wrote(service):
    first = service.import_products([row("A"), row("B")], chunk_size=1)
    again = service.import_products([row("A", "2.00"), row("B", "3.00")], chunk_size=1)
    assert (again.created, again.updated, again.errors) == (0, 2, [])
    assert Product.objects.get(sku="B").price == Decimal("3.00")
    assert first.log_id != again.log_id == Product.objects.get(sku="A").last_import_id


def test_the_run_keeps_no_keys_beyond_its_chunk():
    rows = [row(f"S-{n}") for n in range(50)] + [row("S-3")]
    run = BatchRun(OptimizedProducts(), chunk_size=10)
    result = run.run(rows)
    assert [e.index for e in result.errors] == [50]
    assert len(run.seen) == 1  # the last chunk's one key


def test_a_repeat_costs_one_more_query_in_its_chunk_only(optimized, django_assert_num_queries):
    Category.objects.create(name="Tools")
    rows = [row("A"), row("B"), row("C"), row("A")]
    # categories and one upsert a chunk (+ existing skus, except on PostgreSQL),
    # + the query that finds the repeated row's first one, on PostgreSQL only:
    # elsewhere the existing skus come with their marks.
    expected = LOG_QUERIES + 2 * per_chunk(2 if fast() else 3) + (1 if fast() else 0)
    with django_assert_num_queries(expected):
        result = optimized.import_products(rows, chunk_size=2)
    assert [e.index for e in result.errors] == [3]


def test_a_resumed_run_still_knows_the_skus_it_wrote_before(optimized, monkeypatch):
    rows = [row("A"), row("B"), row("C"), row("A", "5.00")]
    calls = []
    original = OptimizedProducts.write

    def interrupt_second_chunk(self, prepared):
        calls.append(len(prepared))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prepared)

    monkeypatch.setattr(OptimizedProducts, "write", interrupt_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        optimized.import_products(rows, chunk_size=2)
    log = BatchProcessingLog.objects.get()
    assert (log.status, log.checkpoint_position) == ("interrupted", 2)

    monkeypatch.setattr(OptimizedProducts, "write", original)
    result = optimized.import_products(rows, resume=log.pk)
    assert [(e.index, e.message) for e in result.errors] == [(3, REPEATED.format(first=0))]
    assert Product.objects.get(sku="A").price == Decimal("1.00")
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["A", "B", "C"]
