"""The bulk cache: round trips, one query for the misses, invalidation by every write.

Every test runs on the local-memory cache and on a real Redis (database 5 of
``TEST_REDIS_URL``, default redis://127.0.0.1:6379/5). When Redis is down the
Redis runs are skipped, except under CI (``CI`` set, as CI services export
it), where a missing Redis is a failure, not a silent pass. Cache calls are
counted by wrapping the backend's methods, and on Redis also at the client: a
pipeline is one round trip.

The services' invalidation runs once a chunk commits (``transaction.on_commit``).
Inside the test transaction that is at the end of
``django_capture_on_commit_callbacks(execute=True)``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from decimal import Decimal
from io import StringIO

import pytest
import redis
from django.contrib import admin
from django.core.cache import cache, caches
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import transaction
from django.test import RequestFactory

from products import cache as product_cache
from products.models import Product
from tests.factories import (
    CategoryFactory,
    ProductFactory,
    RecommendationScoreFactory,
    StaffFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
COUNTED = ("get", "get_many", "set", "set_many", "add", "delete", "delete_many", "incr")


def redis_is_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(params=["locmem", "redis"])
def backend(request, settings) -> str:
    if request.param == "redis":
        if not redis_is_up():
            message = f"Redis is not reachable at {REDIS_URL}"
            if os.environ.get("CI"):
                pytest.fail(f"{message}, and CI needs it")
            pytest.skip(message)
        settings.CACHES = {
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": REDIS_URL,
            }
        }
    else:
        settings.CACHES = {
            "default": {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "LOCATION": "test-cache",
            }
        }
    cache.clear()
    yield request.param
    cache.clear()


@pytest.fixture
def calls(backend, monkeypatch) -> Counter:
    """Counts the cache API calls by name (each is one round trip on Redis).

    Only outermost calls count: the local-memory backend implements
    ``get_many`` with one ``get`` per key, in-process.
    """
    counter: Counter = Counter()
    depth = [0]
    instance = caches["default"]
    for name in COUNTED:
        original = getattr(instance, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            if not depth[0]:
                counter[_name] += 1
            depth[0] += 1
            try:
                return _original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(instance, name, counted)
    return counter


@pytest.fixture
def catalogue():
    category = CategoryFactory(name="Tools")
    return ProductFactory.create_batch(5, category=category, price=Decimal("10.00"))


def card_of(product: Product) -> dict:
    product.refresh_from_db()
    return {
        "id": product.pk,
        "sku": product.sku,
        "name": product.name,
        "category": product.category.name,
        "price": str(product.price),
        "stock": product.stock_quantity,
        "is_active": product.is_active,
        "view_count": product.view_count,
    }


def ids_of(products) -> list[int]:
    return [product.pk for product in products]


# -- product cards --------------------------------------------------------------


def test_cold_read_is_one_get_many_one_query_one_set_many(
    catalogue, calls, django_assert_num_queries
):
    product_cache.new_generation()
    calls.clear()
    with django_assert_num_queries(1):
        cards = product_cache.get_product_cards(ids_of(catalogue))
    assert calls == {"get_many": 1, "set_many": 1}
    assert list(cards) == ids_of(catalogue)
    assert cards[catalogue[0].pk] == card_of(catalogue[0])


def test_warm_read_is_one_get_many_and_no_query(catalogue, calls, django_assert_num_queries):
    product_cache.get_product_cards(ids_of(catalogue))
    calls.clear()
    with django_assert_num_queries(0):
        cards = product_cache.get_product_cards(ids_of(catalogue))
    assert calls == {"get_many": 1}
    assert cards == {product.pk: card_of(product) for product in catalogue}


def test_partial_miss_loads_only_the_misses_in_one_query(
    catalogue, calls, django_assert_num_queries
):
    product_cache.get_product_cards(ids_of(catalogue[:2]))
    calls.clear()
    with django_assert_num_queries(1):
        cards = product_cache.get_product_cards(ids_of(catalogue))
    assert calls == {"get_many": 1, "set_many": 1}
    assert cards == {product.pk: card_of(product) for product in catalogue}


def test_unknown_ids_are_left_out_and_not_cached(catalogue, calls, django_assert_num_queries):
    missing = max(ids_of(catalogue)) + 1000
    product_cache.get_product_cards([missing, catalogue[0].pk])
    with django_assert_num_queries(1):
        assert product_cache.get_product_cards([missing]) == {}


def test_no_ids_no_round_trip(calls, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert product_cache.get_product_cards([]) == {}
    assert calls == {}


def test_a_lost_generation_retires_every_card(catalogue, django_assert_num_queries):
    product_cache.get_product_cards(ids_of(catalogue))
    cache.delete(product_cache.GENERATION_KEY)  # evicted, say
    Product.objects.filter(pk=catalogue[0].pk).update(price=Decimal("99.00"))
    with django_assert_num_queries(1):
        cards = product_cache.get_product_cards(ids_of(catalogue))
    assert cards[catalogue[0].pk]["price"] == "99.00"


def test_redis_round_trips_are_counted_at_the_client(backend, catalogue, monkeypatch):
    """On Redis a cold page is three round trips: MGET, SET (generation), one pipeline.

    Django's ``set_many`` sends MSET and one EXPIRE per key in one pipeline.
    """
    if backend != "redis":
        pytest.skip("counts Redis commands")
    sent: list[str] = []
    execute_command = redis.Redis.execute_command
    pipeline_execute = redis.client.Pipeline.execute

    def command(self, *args, **options):
        sent.append(str(args[0]))
        return execute_command(self, *args, **options)

    def pipeline(self, *args, **options):
        sent.append("PIPELINE " + " ".join(sorted({str(c[0][0]) for c in self.command_stack})))
        return pipeline_execute(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", command)
    monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)
    product_cache.get_product_cards(ids_of(catalogue))
    assert sent == ["MGET", "SET", "PIPELINE EXPIRE MSET"]
    sent.clear()
    product_cache.get_product_cards(ids_of(catalogue))
    assert sent == ["MGET"]
    sent.clear()
    product_cache.invalidate_products(ids_of(catalogue))
    assert sent == ["DEL"]


# -- recommendations -------------------------------------------------------------


@pytest.fixture
def scored(catalogue):
    users = UserFactory.create_batch(3)
    for rank, product in enumerate(catalogue):
        RecommendationScoreFactory(user=users[0], product=product, score=rank / 10)
    RecommendationScoreFactory(user=users[1], product=catalogue[0], score=0.9, algorithm="a")
    RecommendationScoreFactory(user=users[1], product=catalogue[1], score=0.9, algorithm="b")
    return users


def test_recommendations_best_first_one_query_for_the_misses(
    scored, catalogue, calls, django_assert_num_queries
):
    users = ids_of(scored)
    with django_assert_num_queries(1):
        top = product_cache.get_top_recommendations(users, limit=3)
    assert calls == {"get_many": 1, "set_many": 1}
    assert [item["product_id"] for item in top[users[0]]] == ids_of(catalogue[::-1][:3])
    assert top[users[0]][0] == {
        "product_id": catalogue[4].pk,
        "algorithm": "collaborative",
        "score": 0.4,
    }
    # Ties are broken by product id; a user with no scores has an empty list.
    assert [item["product_id"] for item in top[users[1]]] == ids_of(catalogue[:2])
    assert top[users[2]] == []
    calls.clear()
    with django_assert_num_queries(0):
        again = product_cache.get_top_recommendations(users, limit=5)
    assert calls == {"get_many": 1}
    assert len(again[users[0]]) == 5
    assert again[users[2]] == []


def test_recommendations_keep_at_most_the_configured_number(
    settings, scored, django_assert_num_queries
):
    settings.CACHE_RECOMMENDATIONS = 2
    user = scored[0].pk
    assert len(product_cache.get_top_recommendations([user], limit=2)[user]) == 2
    with pytest.raises(ValueError, match="between 1 and 2"):
        product_cache.get_top_recommendations([user], limit=3)
    with pytest.raises(ValueError):
        product_cache.get_top_recommendations([user], limit=0)


# -- invalidation by the bulk services ---------------------------------------------


def test_import_leaves_no_stale_price_or_stock(
    service, catalogue, calls, django_capture_on_commit_callbacks, django_assert_num_queries
):
    product_cache.get_product_cards(ids_of(catalogue))
    rows = [
        {
            "sku": product.sku,
            "name": f"Renamed {index}",
            "category": "Garden",
            "price": "12.34",
            "stock_quantity": 7,
        }
        for index, product in enumerate(catalogue)
    ]
    calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        result = service.import_products(rows, chunk_size=2)
    assert result.written == 5
    # One cache write per committed chunk, nothing read.
    assert calls == {"set": math.ceil(5 / 2)}
    calls.clear()
    with django_assert_num_queries(1):
        cards = product_cache.get_product_cards(ids_of(catalogue))
    assert cards == {product.pk: card_of(product) for product in catalogue}
    assert {card["price"] for card in cards.values()} == {"12.34"}
    assert {card["stock"] for card in cards.values()} == {7}
    assert {card["category"] for card in cards.values()} == {"Garden"}


def test_product_updates_leave_no_stale_price(
    service, catalogue, calls, django_capture_on_commit_callbacks
):
    product_cache.get_product_cards(ids_of(catalogue))
    with django_capture_on_commit_callbacks(execute=True):
        service.update_products([{"sku": catalogue[0].sku, "price": "1.50"}])
    assert product_cache.get_product_cards([catalogue[0].pk])[catalogue[0].pk]["price"] == "1.50"


def test_orders_leave_no_stale_stock(service, catalogue, calls, django_capture_on_commit_callbacks):
    user = UserFactory()
    product_cache.get_product_cards(ids_of(catalogue))
    orders = [
        {
            "reference": f"ORD-{index}",
            "user_id": user.pk,
            "items": [{"product_id": catalogue[index].pk, "quantity": 3}],
        }
        for index in range(4)
    ]
    calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        service.process_orders(orders, chunk_size=3)
    assert calls == {"delete_many": 2}
    cards = product_cache.get_product_cards(ids_of(catalogue))
    assert [card["stock"] for card in cards.values()] == [97, 97, 97, 97, 100]


def test_views_leave_no_stale_view_count(
    service, catalogue, calls, django_capture_on_commit_callbacks
):
    user = UserFactory()
    product_cache.get_product_cards(ids_of(catalogue))
    rows = [{"user_id": user.pk, "product_id": catalogue[0].pk, "session_id": "s"}] * 3
    calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        service.create_product_views(rows, chunk_size=2)
    assert calls == {"delete_many": 2}
    assert product_cache.get_product_cards([catalogue[0].pk])[catalogue[0].pk]["view_count"] == 3


def test_score_upserts_refresh_recommendations(
    service, scored, catalogue, calls, django_capture_on_commit_callbacks
):
    user = scored[2]
    assert product_cache.get_top_recommendations([user.pk])[user.pk] == []
    rows = [
        {"user_id": user.pk, "product_id": catalogue[1].pk, "algorithm": "x", "score": 0.7},
        {"user_id": user.pk, "product_id": catalogue[2].pk, "algorithm": "x", "score": 0.8},
    ]
    calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        service.upsert_recommendation_scores(rows)
    assert calls == {"delete_many": 1}
    top = product_cache.get_top_recommendations([user.pk])[user.pk]
    assert [item["product_id"] for item in top] == [catalogue[2].pk, catalogue[1].pk]


def test_a_rolled_back_transaction_invalidates_nothing(
    optimized, catalogue, calls, django_capture_on_commit_callbacks
):
    """The invalidation belongs to the commit: a caller's rollback discards it."""
    product_cache.get_product_cards(ids_of(catalogue))
    calls.clear()
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        optimized.import_products(
            [{"sku": "NEW-1", "name": "n", "category": "c", "price": "1", "stock_quantity": 1}]
        )
        raise RuntimeError("the caller's transaction fails")
    assert callbacks == []
    assert calls == {}


@pytest.fixture
def staff_request(rf: RequestFactory):
    """A POST by a staff user, as the admin's save and delete hooks receive it."""
    request = rf.post("/")
    request.user = StaffFactory()
    return request


def test_admin_save_drops_the_card(catalogue, staff_request, django_capture_on_commit_callbacks):
    product = catalogue[0]
    product_cache.get_product_cards([product.pk])
    model_admin = admin.site._registry[Product]
    product.price = Decimal("3.21")
    with django_capture_on_commit_callbacks(execute=True):
        model_admin.save_model(staff_request, product, form=None, change=True)
    assert product_cache.get_product_cards([product.pk])[product.pk]["price"] == "3.21"


def test_admin_deletes_drop_the_cards_once_committed(
    catalogue, calls, staff_request, django_capture_on_commit_callbacks
):
    """One product deleted, then two by the bulk action: one ``delete_many`` each."""
    model_admin = admin.site._registry[Product]
    first, *rest = catalogue[:3]
    product_cache.get_product_cards(ids_of(catalogue[:3]))  # cached: a stale card would show
    calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        model_admin.delete_model(staff_request, first)
        assert calls["delete_many"] == 0  # not before the commit
    with django_capture_on_commit_callbacks(execute=True):
        model_admin.delete_queryset(staff_request, Product.objects.filter(pk__in=ids_of(rest)))
    assert calls["delete_many"] == 2
    assert product_cache.get_product_cards([first.pk, *ids_of(rest)]) == {}


def test_renaming_a_category_in_the_admin_retires_every_card(
    catalogue, staff_request, django_capture_on_commit_callbacks
):
    product = catalogue[0]
    product_cache.get_product_cards([product.pk])
    category = product.category
    category.name = "Renamed"
    model_admin = admin.site._registry[type(category)]
    with django_capture_on_commit_callbacks(execute=True):
        model_admin.save_model(staff_request, category, form=None, change=True)
    assert product_cache.get_product_cards([product.pk])[product.pk]["category"] == "Renamed"


# -- warm_cache ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [2, 5, 1000])
def test_warm_cache_fills_everything_in_chunks(
    scored, catalogue, calls, django_assert_num_queries, chunk_size
):
    users_with_scores = 2
    product_chunks = len(catalogue) // chunk_size + 1
    user_chunks = users_with_scores // chunk_size + 1
    # Per product chunk one query; per user chunk one for the ids and, when
    # there are ids, one for their scores.
    queries = product_chunks + user_chunks + math.ceil(users_with_scores / chunk_size)
    out = StringIO()
    with django_assert_num_queries(queries):
        call_command("warm_cache", chunk_size=chunk_size, stdout=out)
    assert "Cached 5 product cards and the recommendations of 2 users." in out.getvalue()
    assert "\r" not in out.getvalue()  # not a terminal: no progress bar
    assert calls["set_many"] == math.ceil(5 / chunk_size) + math.ceil(2 / chunk_size)
    calls.clear()
    with django_assert_num_queries(0):
        product_cache.get_product_cards(ids_of(catalogue))
        product_cache.get_top_recommendations(ids_of(scored[:2]))
    assert calls == {"get_many": 2}


def test_warm_cache_is_quiet_at_verbosity_zero(catalogue):
    out = StringIO()
    call_command("warm_cache", verbosity=0, stdout=out)
    assert out.getvalue() == ""


def test_warm_cache_draws_a_progress_bar_on_a_terminal(catalogue, monkeypatch):
    out = StringIO()
    monkeypatch.setattr(out, "isatty", lambda: True, raising=False)
    call_command("warm_cache", chunk_size=2, stdout=out)
    assert "product cards: [" in out.getvalue()
    assert "5/5 rows" in out.getvalue()


def test_warm_cache_rejects_a_bad_chunk_size():
    with pytest.raises(CommandError, match="at least 1"):
        call_command("warm_cache", "--chunk-size", "0")


# -- bench_cache -------------------------------------------------------------------


def test_bench_cache_needs_redis(backend):
    if backend == "redis":
        out = StringIO()
        call_command("bench_cache", "--keys", "20", "--json", stdout=out)
        rows = json.loads(out.getvalue())
        assert [row["operation"] for row in rows] == ["set", "get", "delete"]
        assert all(row["keys"] == 20 for row in rows)
        assert cache.get_many([f"bench-cache:{index}" for index in range(20)]) == {}
    else:
        with pytest.raises(CommandError, match="set REDIS_URL"):
            call_command("bench_cache", "--keys", "20")


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_bench_cache_markdown_is_a_benchmarks_section(backend):
    out = StringIO()
    call_command("bench_cache", "--keys", "20", "--markdown", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "## Cache: per-key against bulk operations on Redis"
    assert "Command: `python manage.py bench_cache --keys 20 --markdown`" in lines
    assert any(line.startswith("Database: Redis ") for line in lines)
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| operation | keys | per key (s) | bulk (s) | speedup |"
    assert [row.split(" | ")[0:2] for row in table[2:]] == [
        ["| set", "20"],
        ["| get", "20"],
        ["| delete", "20"],
    ]
