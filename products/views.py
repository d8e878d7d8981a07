"""The product list: one page, two data access paths, to see the N+1 in the SQL panel.

``?path=naive``: lazy attributes, two queries per row; ``?path=optimized`` (the
default): ids and counts in one query, the rest from the cached cards. Staff with
the view permission on products only: the naive path is costly by design.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from common.permissions import missing_permissions
from common.queries import related_count
from products import cache
from products.models import Product, RecommendationScore

NAIVE = "naive"
OPTIMIZED = "optimized"
PATHS = (NAIVE, OPTIMIZED)
PER_PAGE = 50
MAX_PER_PAGE = 200
VIEW_PRODUCTS = ("products.view_product",)


def naive_rows(products: Iterable[Product]) -> list[dict]:
    """Two queries per row on top of the page's: the N+1 this page exists to show."""
    return [
        {
            "id": product.pk,
            "sku": product.sku,
            "name": product.name,
            "category": product.category.name,  # a query per row
            "price": str(product.price),
            "stock": product.stock_quantity,
            "is_active": product.is_active,
            "view_count": product.view_count,
            "recommendations": product.recommendation_scores.count(),  # and another
        }
        for product in products
    ]


def optimized_rows(page: Iterable[tuple[int, int]]) -> list[dict]:
    """The page's (id, count) pairs joined to the cached cards (at most one more query)."""
    page = list(page)
    cards = cache.get_product_cards(pk for pk, _ in page)
    return [{**cards[pk], "recommendations": count} for pk, count in page if pk in cards]


def page_size(request: HttpRequest) -> int:
    try:
        size = int(request.GET.get("per_page", PER_PAGE))
    except ValueError:
        return PER_PAGE
    return min(max(size, 1), MAX_PER_PAGE)


@staff_member_required
def product_list(request: HttpRequest) -> HttpResponse:
    if missing_permissions(request.user, VIEW_PRODUCTS):
        raise PermissionDenied
    path = request.GET.get("path", OPTIMIZED)
    if path not in PATHS:
        path = OPTIMIZED
    # Products on the naive path, (id, count) pairs on the optimized one.
    products: QuerySet[Product, Any] = Product.objects.filter(is_active=True).order_by("sku")
    if path == OPTIMIZED:
        products = products.annotate(
            recommendations=related_count(RecommendationScore, "product")
        ).values_list("pk", "recommendations")
    paginator = Paginator(products, page_size(request))
    page = paginator.get_page(request.GET.get("page"))
    rows = naive_rows(page.object_list) if path == NAIVE else optimized_rows(page.object_list)
    return render(
        request,
        "products/product_list.html",
        {"page": page, "rows": rows, "path": path, "paths": PATHS, "per_page": paginator.per_page},
    )
