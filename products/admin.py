"""Admin for the catalogue and the interaction data the bulk services write.

Every list page runs a fixed number of queries whatever its length: foreign
keys shown in a column are joined (``list_select_related``) and counts are
annotated, never read per row. Foreign keys on change forms use autocomplete
or raw-id widgets, so a form never loads a whole table into a ``<select>``.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest

from batching.admin import ReadOnlyAdminMixin
from products.models import Category, Product, ProductView, RecommendationScore


@admin.register(Category)
class CategoryAdmin(admin.ModelAdmin):
    list_display = ["name", "product_count"]
    # Also what the Product form's category autocomplete searches.
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Category]:
        """Each category with its number of products, counted by a correlated subquery.

        Not ``annotate(Count("products"))``: that joins and groups the whole
        product table, for the page and again for the paginator's COUNT. The
        subquery is left out of the COUNT and runs per category shown, on the
        (category, is_active) index.
        """
        products = (
            Product.objects.filter(category=OuterRef("pk"))
            .order_by()
            .values("category")
            .annotate(count=Count("pk"))
            .values("count")
        )
        return super().get_queryset(request).annotate(product_count=Coalesce(Subquery(products), 0))

    @admin.display(description="products", ordering="product_count")
    def product_count(self, category: Category) -> int:
        return category.product_count


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = [
        "sku",
        "name",
        "category",
        "price",
        "stock_quantity",
        "is_active",
        "view_count",
    ]
    list_select_related = ["category"]
    list_filter = ["is_active", "category"]
    search_fields = ["sku", "name"]
    autocomplete_fields = ["category"]
    # view_count is the running total of ProductView rows, kept by
    # create_product_views; a hand edit would make it disagree with them.
    readonly_fields = ["view_count", "created_at", "updated_at"]


@admin.register(ProductView)
class ProductViewAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Interactions are bulk-loaded by create_product_views; here they are only read.

    The table is the largest in the shop, so the list avoids what scales with
    it: no date hierarchy (a MIN/MAX over the table), no related-object
    filters (a query over users or products), exact-match search that the
    indexes can serve, and no second unfiltered COUNT(*) next to a filtered
    one (``show_full_result_count``).
    """

    list_display = ["id", "user", "product", "interaction_type", "session_id", "created_at"]
    list_select_related = ["user", "product"]
    list_filter = ["interaction_type", "created_at"]
    search_fields = ["=session_id", "=product__sku", "=user__username"]
    search_help_text = "Exact session id, product sku or username."
    show_full_result_count = False


@admin.register(RecommendationScore)
class RecommendationScoreAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Scores are upserted by upsert_recommendation_scores; here they are only read."""

    list_display = ["id", "user", "product", "algorithm", "score", "updated_at"]
    list_select_related = ["user", "product"]
    # No algorithm filter: without choices it would be a SELECT DISTINCT over
    # the whole table on every page; the exact search below covers it.
    search_fields = ["=user__username", "=product__sku", "=algorithm"]
    search_help_text = "Exact username, product sku or algorithm."
    show_full_result_count = False
