"""Product cards and each user's top recommendations, cached in bulk.

Pages and API responses show many products and users at once, so the cache is
read and written a page (or a chunk) at a time: one ``get_many`` for every key,
ONE query for the misses, one ``set_many`` to store them. On Redis each of
these is one round trip (MGET, a pipeline of SETs, DEL with many keys); per-key
``get``/``set`` would cost one round trip per product, the N+1 moved from the
database to the cache.

Invalidation
------------
Entries are dropped, never patched, by the writes that change them, once the
chunk that made the change has committed (``BatchOperation.committed``: a
chunk that rolls back drops nothing), at the cost of one cache round trip and
no query per chunk:

- orders (stock) and product views (view_count) know their product ids: they
  drop exactly those cards with one ``delete_many``;
- recommendation-score upserts drop their users' recommendations the same way;
- catalogue imports and updates address products by sku, and their writes do
  not read ids back. They replace the **catalogue generation** instead (one
  ``set``), which every card is stored with and which every read fetches in
  the same ``get_many`` as the cards: a card of an older generation is a miss.
  An import thus retires every card at once; the next reads (or
  ``manage.py warm_cache``) refill them.

The admin drops the card of a product it saves or deletes. A reader that
misses, reads the old row and stores it just after a writer's invalidation can
still leave a stale entry behind; ``CACHE_TIMEOUT`` bounds how long it lives.

A cache that is down
--------------------
The cache is never the record. Reads that cannot reach it are misses: the
rows come from the database and are not stored (the page costs its one query).
An invalidation that cannot reach it raises to its caller, which runs it
after the COMMIT and only logs and counts the failure (the engine's
``after_commit_failures``, the admin's robust ``on_commit``): the write stays
committed, and the stale entries it could not drop expire within
``CACHE_TIMEOUT`` like any other (every card and recommendation is stored with
that timeout).

Recommendations are cached as (product id, algorithm, score) only, never with
product data: a price change then touches one card, not every user who was
recommended the product. Callers join them to ``get_product_cards``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import F, QuerySet, Window
from django.db.models.functions import RowNumber

from products.models import Product, RecommendationScore

# Bump when the shape of a cached value changes: old entries are then ignored.
CARD_PREFIX = "product-card:v1:"
GENERATION_KEY = "product-card:v1:generation"
RECOMMENDATIONS_PREFIX = "recommendations:v1:"
LIMIT_TOO_LARGE = "limit must be between 1 and {maximum} (settings.CACHE_RECOMMENDATIONS)"

logger = logging.getLogger(__name__)

Card = dict[str, Any]
Recommendation = dict[str, Any]


def card_key(product_id: int) -> str:
    return f"{CARD_PREFIX}{product_id}"


def recommendations_key(user_id: int) -> str:
    return f"{RECOMMENDATIONS_PREFIX}{user_id}"


# -- product cards --------------------------------------------------------------


def card_rows(queryset: QuerySet[Product]) -> Iterator[Card]:
    """Cards for a queryset of products, in one query (the category is joined)."""
    rows = queryset.values_list(
        "pk", "sku", "name", "category__name", "price", "stock_quantity", "is_active", "view_count"
    )
    for pk, sku, name, category, price, stock, is_active, view_count in rows:
        yield {
            "id": pk,
            "sku": sku,
            "name": name,
            "category": category,
            "price": str(price),
            "stock": stock,
            "is_active": is_active,
            "view_count": view_count,
        }


def quietly(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` for a read path: None, logged, when the cache cannot be reached."""
    try:
        return call(*args)
    except Exception:
        logger.warning("cache unreachable in %s: serving from the database", call.__name__)
        return None


def new_generation() -> str:
    """Start a new catalogue generation: every card stored before is a miss from now on.

    A random value, not a counter: it takes one ``set`` (Django's Redis
    ``incr`` costs two round trips), and a generation lost to eviction is
    replaced by one no stored card can carry.
    """
    generation = uuid.uuid4().hex
    cache.set(GENERATION_KEY, generation, timeout=None)
    return generation


def current_generation() -> str:
    """The catalogue generation, starting one if the cache has none (one round trip)."""
    return cache.get(GENERATION_KEY) or new_generation()


def store_cards(cards: Iterable[Card], generation: str) -> None:
    """Write cards of ``generation`` with one ``set_many`` (one round trip)."""
    entries = {card_key(card["id"]): (generation, card) for card in cards}
    if entries:
        cache.set_many(entries, timeout=settings.CACHE_TIMEOUT)


def get_product_cards(ids: Iterable[int]) -> dict[int, Card]:
    """The cards of ``ids`` that exist, by id: one get_many, one query for the misses, one set_many.

    The generation is read in the same ``get_many`` as the cards. Products
    that do not exist are left out (and not cached). A fully cached page costs
    one cache round trip and no query.
    """
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    found = quietly(cache.get_many, [GENERATION_KEY, *(card_key(pk) for pk in wanted)])
    cards: dict[int, Card] = {}
    generation = None
    if found is not None:
        generation = found.pop(GENERATION_KEY, None) or quietly(new_generation)
        cards = {card["id"]: card for stored_in, card in found.values() if stored_in == generation}
    misses = [pk for pk in wanted if pk not in cards]
    if misses:
        loaded = list(card_rows(Product.objects.filter(pk__in=misses).order_by()))
        if generation is not None:
            quietly(store_cards, loaded, generation)
        cards.update((card["id"], card) for card in loaded)
    return {pk: cards[pk] for pk in wanted if pk in cards}


def invalidate_products(ids: Iterable[int]) -> None:
    """Drop the cards of ``ids``: one ``delete_many``."""
    invalidate(product_ids=ids)


def invalidate_catalogue() -> None:
    """Retire every card (imports and updates by sku): one ``set``."""
    new_generation()


# -- recommendations -----------------------------------------------------------


def top_recommendations_query(user_ids: Iterable[int]) -> QuerySet[RecommendationScore]:
    """Each user's best ``CACHE_RECOMMENDATIONS`` scores, all users in one query.

    A window function ranks each user's scores (highest first, ties by
    product); Django filters on it with an outer query, served by the
    (user, algorithm, -score) index's leading user column.
    """
    rank = Window(
        RowNumber(),
        partition_by=[F("user_id")],
        order_by=[F("score").desc(), F("product_id").asc(), F("algorithm").asc()],
    )
    return (
        RecommendationScore.objects.filter(user_id__in=list(user_ids))
        .annotate(rank=rank)
        .filter(rank__lte=settings.CACHE_RECOMMENDATIONS)
        .order_by("user_id", "rank")
    )


def load_recommendations(user_ids: Iterable[int]) -> dict[int, list[Recommendation]]:
    """Top recommendations of ``user_ids`` from the database (one query); [] for none."""
    users = list(user_ids)
    result: dict[int, list[Recommendation]] = {pk: [] for pk in users}
    rows = top_recommendations_query(users).values_list(
        "user_id", "product_id", "algorithm", "score"
    )
    for user_id, product_id, algorithm, score in rows:
        result[user_id].append({"product_id": product_id, "algorithm": algorithm, "score": score})
    return result


def store_recommendations(recommendations: dict[int, list[Recommendation]]) -> None:
    """Write users' recommendations with one ``set_many``; an empty list is cached too."""
    if recommendations:
        cache.set_many(
            {recommendations_key(pk): items for pk, items in recommendations.items()},
            timeout=settings.CACHE_TIMEOUT,
        )


def get_top_recommendations(
    user_ids: Iterable[int], *, limit: int = 10
) -> dict[int, list[Recommendation]]:
    """Each user's ``limit`` best recommendations, highest score first.

    One get_many, one query for the users missing from the cache, one
    set_many. The cache holds the best ``settings.CACHE_RECOMMENDATIONS`` per
    user whatever ``limit`` asks for, so every limit up to that shares one
    entry (and one invalidation).

    Raises:
        ValueError: ``limit`` is below 1 or above ``CACHE_RECOMMENDATIONS``.
    """
    maximum = settings.CACHE_RECOMMENDATIONS
    if not 1 <= limit <= maximum:
        raise ValueError(LIMIT_TOO_LARGE.format(maximum=maximum))
    wanted = list(dict.fromkeys(user_ids))
    if not wanted:
        return {}
    keys = {recommendations_key(pk): pk for pk in wanted}
    cached = quietly(cache.get_many, list(keys))
    found = {keys[key]: items for key, items in (cached or {}).items()}
    misses = [pk for pk in wanted if pk not in found]
    if misses:
        loaded = load_recommendations(misses)
        if cached is not None:
            quietly(store_recommendations, loaded)
        found.update(loaded)
    return {pk: found[pk][:limit] for pk in wanted}


def invalidate_recommendations(user_ids: Iterable[int]) -> None:
    """Drop the cached recommendations of ``user_ids``: one ``delete_many``."""
    invalidate(user_ids=user_ids)


def invalidate(*, product_ids: Iterable[int] = (), user_ids: Iterable[int] = ()) -> None:
    """Drop cards and recommendations together: one ``delete_many``, no query."""
    keys = [card_key(pk) for pk in set(product_ids)]
    keys += [recommendations_key(pk) for pk in set(user_ids)]
    if keys:
        cache.delete_many(keys)


# -- warming --------------------------------------------------------------------


def warm_products(chunk_size: int) -> Iterator[int]:
    """Store every product's card, ``chunk_size`` at a time; yield each product id.

    Per chunk: one query (keyset pagination on the primary key, so the cost
    does not grow with the offset) and one ``set_many``. Cards are written
    over, fresh from the database, whatever the cache held.
    """
    generation = current_generation()
    last = 0
    while True:
        cards = list(card_rows(Product.objects.filter(pk__gt=last).order_by("pk")[:chunk_size]))
        store_cards(cards, generation)
        for card in cards:
            yield card["id"]
        if len(cards) < chunk_size:
            return
        last = cards[-1]["id"]


def warm_recommendations(chunk_size: int) -> Iterator[int]:
    """Store the recommendations of every user with scores; yield each user id.

    Per chunk: one query for the next ``chunk_size`` user ids (keyset), one for
    their top scores, and one ``set_many``.
    """
    last = 0
    while True:
        users = list(
            RecommendationScore.objects.filter(user_id__gt=last)
            .order_by("user_id")
            .values_list("user_id", flat=True)
            .distinct()[:chunk_size]
        )
        if users:
            store_recommendations(load_recommendations(users))
        yield from users
        if len(users) < chunk_size:
            return
        last = users[-1]
