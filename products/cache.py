"""Product cards and each user's top recommendations, cached in bulk (docs/cache.md).

Entries are dropped, never patched. A cache that is down is a miss on reads;
an invalidation raises to its caller, which runs it after COMMIT and only logs it.
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
# A card's fields, each read from the product's field or lookup beside it.
CARD_FIELDS = {
    "id": "pk",
    "sku": "sku",
    "name": "name",
    "category": "category__name",
    "price": "price",
    "stock": "stock_quantity",
    "is_active": "is_active",
    "view_count": "view_count",
}

logger = logging.getLogger(__name__)

Card = dict[str, Any]
Recommendation = dict[str, Any]


def card_key(product_id: int) -> str:
    return f"{CARD_PREFIX}{product_id}"


def recommendations_key(user_id: int) -> str:
    return f"{RECOMMENDATIONS_PREFIX}{user_id}"


def card_rows(queryset: QuerySet[Product]) -> Iterator[Card]:
    """Cards for a queryset of products, in one query (the category is joined)."""
    for row in queryset.values_list(*CARD_FIELDS.values()):
        card = dict(zip(CARD_FIELDS, row, strict=True))
        card["price"] = str(card["price"])
        yield card


def quietly(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)`` for a read path: None, logged, when the cache cannot be reached."""
    try:
        return call(*args)
    except Exception:
        logger.warning("cache unreachable in %s: serving from the database", call.__name__)
        return None


def new_generation() -> str:
    """Start a new catalogue generation: every card stored before is a miss from now on.

    Random, not a counter: one ``set``, and a generation lost to eviction is
    replaced by one no card carries.
    """
    generation = uuid.uuid4().hex
    cache.set(GENERATION_KEY, generation, timeout=None)
    return generation


def store_cards(cards: Iterable[Card], generation: str) -> None:
    """Write cards of ``generation`` with one ``set_many`` (one round trip)."""
    entries = {card_key(card["id"]): (generation, card) for card in cards}
    if entries:
        cache.set_many(entries, timeout=settings.CACHE_TIMEOUT)


def get_product_cards(ids: Iterable[int]) -> dict[int, Card]:
    """The cards of ``ids`` that exist, by id: one get_many (with the generation), one query
    for the misses, one set_many."""
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
    if keys := [card_key(pk) for pk in set(ids)]:
        cache.delete_many(keys)


def load_recommendations(user_ids: Iterable[int]) -> dict[int, list[Recommendation]]:
    """Each user's best ``CACHE_RECOMMENDATIONS`` scores, [] for none: one query, a window
    function ranking each user's scores (ties by product) inside an outer query, served by
    the leading user column of ``score_user_algo_rank_idx``."""
    users = list(user_ids)
    rank = Window(
        RowNumber(),
        partition_by=[F("user_id")],
        order_by=[F("score").desc(), F("product_id").asc(), F("algorithm").asc()],
    )
    rows = (
        RecommendationScore.objects.filter(user_id__in=users)
        .annotate(rank=rank)
        .filter(rank__lte=settings.CACHE_RECOMMENDATIONS)
        .order_by("user_id", "rank")
        .values_list("user_id", "product_id", "algorithm", "score")
    )
    result: dict[int, list[Recommendation]] = {pk: [] for pk in users}
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
    """Each user's ``limit`` best recommendations, highest score first: one get_many, one
    query for the misses, one set_many. ValueError unless 1 <= limit <= CACHE_RECOMMENDATIONS.
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
    if keys := [recommendations_key(pk) for pk in set(user_ids)]:
        cache.delete_many(keys)


def warm_products(chunk_size: int) -> Iterator[int]:
    """Store every product's card, ``chunk_size`` at a time (one query, keyset pagination
    on the primary key, and one ``set_many``); yield each product id."""
    generation = cache.get(GENERATION_KEY) or new_generation()
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
    """Store the recommendations of every user with scores, ``chunk_size`` users (keyset) at
    a time; yield each user id."""
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
