"""A key repeated across chunks of one run, found in flat memory.

The engine compares keys within a chunk; a key that an earlier chunk of the
same run wrote is found by the mark the run leaves on each row it writes
(``Product.last_import``, ``RecommendationScore.last_run``), so a catalogue
import, a price update or a score refresh holds no keys beyond its chunk.
"""

from decimal import Decimal

import pytest

from batching.engine import BatchRun
from batching.models import BatchProcessingLog
from products.models import Category, Product, RecommendationScore
from products.services.optimized import OptimizedProducts, OptimizedProductUpdates, OptimizedScores
from tests.factories import CategoryFactory, ProductFactory, UserFactory
from tests.test_services import LOG_QUERIES, fast, per_chunk

pytestmark = pytest.mark.django_db

REPEATED = "duplicate sku in this input (first seen at row {first})"
REPEATED_SCORE = (
    "duplicate user_id, product_id, algorithm in this input (first seen at row {first})"
)


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

    def interrupt_second_chunk(self, prepared, run):
        calls.append(len(prepared))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prepared, run)

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


# -- price and stock updates -----------------------------------------------------------


@pytest.fixture
def catalogue():
    category = CategoryFactory(name="Tools")
    return [ProductFactory(sku=sku, category=category) for sku in "ABCDE"]


def price(sku: str, value: str) -> dict:
    return {"sku": sku, "price": value}


def test_an_update_repeated_in_a_later_chunk_is_reported_with_its_first_row(service, catalogue):
    rows = [price("A", "1.00"), price("B", "2.00"), price("C", "3.00"), price("A", "9.00")]
    rows += [price("NOPE", "1.00"), price("D", "4.00")]
    result = service.update_products(rows, chunk_size=2)

    assert [(e.index, e.message, e.code) for e in result.errors] == [
        (3, REPEATED.format(first=0), "duplicate"),
        (4, "no product with sku NOPE", "not_found"),
    ]
    assert (result.written, result.updated, result.skipped) == (4, 4, 2)
    assert Product.objects.get(sku="A").price == Decimal("1.00")  # the first row stands
    product = Product.objects.get(sku="A")
    assert (product.last_import_id, product.last_import_row) == (result.log_id, 0)
    # A later run updates the same products again.
    again = service.update_products([price("A", "5.00")], chunk_size=2)
    assert (again.updated, again.errors) == (1, [])
    assert Product.objects.get(sku="A").price == Decimal("5.00")


def test_an_update_run_keeps_no_keys_beyond_its_chunk(catalogue):
    rows = [price(sku, "1.00") for sku in "ABCDE"] + [price("B", "2.00")]
    run = BatchRun(OptimizedProductUpdates(), chunk_size=2)
    result = run.run(rows)
    assert [e.index for e in result.errors] == [5]
    assert run.seen == {"E": 4, "B": 5}  # the last chunk's keys only


def test_an_update_repeat_costs_one_more_query_in_its_chunk_only(
    optimized, catalogue, django_assert_num_queries
):
    rows = [price("A", "1.00"), price("B", "1.00"), price("C", "1.00"), price("A", "2.00")]
    # One statement a chunk on PostgreSQL (+1 in the chunk with a row not
    # updated, telling repeats from unknown skus); elsewhere the products are
    # read with their marks, then updated.
    expected = LOG_QUERIES + 2 * per_chunk(1 if fast() else 2) + (1 if fast() else 0)
    with django_assert_num_queries(expected):
        result = optimized.update_products(rows, chunk_size=2)
    assert [e.index for e in result.errors] == [3]


# -- recommendation scores -------------------------------------------------------------


@pytest.fixture
def pairs():
    users = UserFactory.create_batch(2)
    products = ProductFactory.create_batch(3, category=CategoryFactory(name="Tools"))
    return [(user.pk, product.pk) for user in users for product in products]


def score(pair: tuple[int, int], value: float, algorithm: str = "als") -> dict:
    return {"user_id": pair[0], "product_id": pair[1], "algorithm": algorithm, "score": value}


def test_a_score_repeated_in_a_later_chunk_is_reported_with_its_first_row(service, pairs):
    RecommendationScore.objects.create(
        user_id=pairs[1][0], product_id=pairs[1][1], algorithm="als", score=0.5
    )
    rows = [score(pairs[0], 0.1), score(pairs[1], 0.2), score(pairs[2], 0.3)]
    rows += [score(pairs[0], 0.9), score(pairs[0], 0.4, "knn"), score(pairs[1], 0.8)]
    result = service.upsert_recommendation_scores(rows, chunk_size=2)

    assert [(e.index, e.field, e.message) for e in result.errors] == [
        (3, "user_id, product_id, algorithm", REPEATED_SCORE.format(first=0)),
        (5, "user_id, product_id, algorithm", REPEATED_SCORE.format(first=1)),
    ]
    assert (result.written, result.created, result.updated) == (4, 3, 1)
    stored = RecommendationScore.objects.values_list(
        "user_id", "product_id", "algorithm", "score", "last_run_id", "last_run_row"
    )
    assert sorted(stored) == sorted(
        [
            (*pairs[0], "als", 0.1, result.log_id, 0),
            (*pairs[1], "als", 0.2, result.log_id, 1),
            (*pairs[2], "als", 0.3, result.log_id, 2),
            (*pairs[0], "knn", 0.4, result.log_id, 4),
        ]
    )


def test_a_score_refresh_keeps_no_keys_beyond_its_chunk(pairs):
    rows = [score(pair, 0.5) for pair in pairs] + [score(pairs[2], 0.7)]
    run = BatchRun(OptimizedScores(), chunk_size=4)
    result = run.run(rows)
    assert [e.index for e in result.errors] == [6]
    assert len(run.seen) == 3  # the last chunk's keys only


def test_a_score_repeat_costs_one_more_query_in_its_chunk_only(
    optimized, pairs, django_assert_num_queries
):
    rows = [score(pairs[0], 0.1), score(pairs[1], 0.2), score(pairs[2], 0.3)]
    rows += [score(pairs[0], 0.4)]
    # users and products (one query on PostgreSQL), one upsert (+ existing
    # keys with their marks, except on PostgreSQL), + the query that finds the
    # repeated row's first one, on PostgreSQL only.
    expected = LOG_QUERIES + 2 * per_chunk(2 if fast() else 4) + (1 if fast() else 0)
    with django_assert_num_queries(expected):
        result = optimized.upsert_recommendation_scores(rows, chunk_size=2)
    assert [e.index for e in result.errors] == [3]


def test_a_repeat_within_a_chunk_names_the_first_row_of_the_whole_run(service, pairs):
    # Row 2 repeats row 1 (found by the mark); row 3 repeats row 2 in its own
    # chunk, so its key's first row is row 1 as well.
    result = service.import_products([row("A"), row("S"), row("S"), row("S")], chunk_size=2)
    assert sorted((e.index, e.message) for e in result.errors) == [
        (2, REPEATED.format(first=1)),
        (3, REPEATED.format(first=1)),
    ]
    scores = [score(pairs[0], 0.1), score(pairs[1], 0.2), score(pairs[1], 0.3)]
    scores.append(score(pairs[1], 0.4))
    result = service.upsert_recommendation_scores(scores, chunk_size=2)
    assert sorted((e.index, e.message) for e in result.errors) == [
        (2, REPEATED_SCORE.format(first=1)),
        (3, REPEATED_SCORE.format(first=1)),
    ]
