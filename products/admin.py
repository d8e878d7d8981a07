"""Admin for the catalogue and the interaction data the bulk services write.

Every list page runs a fixed number of queries whatever its length; foreign keys
on its forms use autocomplete, so a form never loads a whole table into a ``<select>``.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, TypedDict

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.decorators import method_decorator
from django.views.decorators.http import require_GET, require_http_methods

from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin
from common.queries import related_count
from products import cache, imports
from products.models import Category, Product, ProductView, RecommendationScore

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    class ProductCount(TypedDict):
        product_count: int


@admin.register(Category)
class CategoryAdmin(DeclaredFiltersMixin, admin.ModelAdmin):
    list_display = ["name", "product_count"]
    # Also what the Product form's category autocomplete searches.
    search_fields = ["name"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Category]:
        return (
            super().get_queryset(request).annotate(product_count=related_count(Product, "category"))
        )

    @admin.display(description="products", ordering="product_count")
    def product_count(self, category: WithAnnotations[Category, ProductCount]) -> int:
        return category.product_count

    def save_model(self, request: HttpRequest, obj: Category, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # Cards show the category's name; a rename retires them all, once committed.
        transaction.on_commit(cache.new_generation, robust=True)


# What each kind of import writes, as the permissions it needs.
IMPORT_PERMISSIONS: dict[str, tuple[str, ...]] = {
    imports.PRODUCTS: ("products.add_product", "products.change_product"),
    imports.PRODUCT_VIEWS: ("products.add_productview",),
}


class ImportForm(forms.Form):
    kind = forms.ChoiceField(
        choices=imports.KINDS.items(), initial=imports.PRODUCTS, widget=forms.RadioSelect
    )
    file = forms.FileField(
        help_text="CSV with a header row, or JSON Lines (.csv, .jsonl, .ndjson; optionally .gz)."
    )


@admin.register(Product)
class ProductAdmin(DeclaredFiltersMixin, admin.ModelAdmin):
    list_display = ["sku", "name", "category", "price", "stock_quantity", "is_active", "view_count"]
    list_select_related = ["category"]
    list_filter = ["is_active", "category"]
    search_fields = ["sku", "name"]
    autocomplete_fields = ["category"]
    # view_count is kept by create_product_views: a hand edit would make it disagree.
    readonly_fields = ["view_count", "created_at", "updated_at", "last_import", "last_import_row"]

    # A product saved or deleted here drops its cached card once committed.
    def save_model(self, request: HttpRequest, obj: Product, form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        transaction.on_commit(partial(cache.invalidate_products, [obj.pk]), robust=True)

    def delete_model(self, request: HttpRequest, obj: Product) -> None:
        pk = obj.pk
        super().delete_model(request, obj)
        transaction.on_commit(partial(cache.invalidate_products, [pk]), robust=True)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Product]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        super().delete_queryset(request, queryset)
        transaction.on_commit(partial(cache.invalidate_products, ids), robust=True)

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("import/", view(self.import_upload_view), name="products_product_import"),
            path(
                "import/<str:token>/",
                view(self.import_detail_view),
                name="products_product_import_detail",
            ),
            path(
                "import/<str:token>/status/",
                view(self.import_status_view),
                name="products_product_import_status",
            ),
            *super().get_urls(),
        ]

    def can_import(self, request: HttpRequest, kind: str) -> bool:
        return request.user.has_perms(IMPORT_PERMISSIONS[kind])

    def staged(self, request: HttpRequest, token: str) -> imports.Staged:
        """The user's upload of ``token`` (404 for anyone else), if they may import its kind."""
        if request.user.pk is None:
            raise PermissionDenied
        staged = imports.load(token, request.user.pk)
        if not self.can_import(request, staged.kind):
            raise PermissionDenied
        return staged

    def import_context(self, request: HttpRequest, title: str, **extra) -> dict:
        return {**self.admin_site.each_context(request), "opts": self.opts, "title": title, **extra}

    @method_decorator(require_http_methods(["GET", "POST"]))
    def import_upload_view(self, request: HttpRequest) -> HttpResponse:
        """Upload a file; it is stored and previewed, nothing is written yet."""
        if not any(self.can_import(request, kind) for kind in imports.KINDS):
            raise PermissionDenied
        form = ImportForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            kind = form.cleaned_data["kind"]
            if not self.can_import(request, kind):
                raise PermissionDenied
            try:
                staged = imports.stage(form.cleaned_data["file"], kind, request.user)
            except imports.ImportFileError as exc:
                form.add_error("file", str(exc))
            else:
                return redirect("admin:products_product_import_detail", token=staged.token)
        context = self.import_context(request, "Import products or product views", form=form)
        return TemplateResponse(request, "admin/products/product/import_upload.html", context)

    @method_decorator(require_http_methods(["GET", "POST"]))
    def import_detail_view(self, request: HttpRequest, token: str) -> HttpResponse:
        """The preview and its confirm button, then the progress, then the result."""
        staged = self.staged(request, token)
        if request.method == "POST":
            imports.run(staged, request.user)
            return redirect("admin:products_product_import_detail", token=token)
        job = imports.job_status(staged) if staged.state == imports.RUNNING else None
        logs = [
            (log_id, reverse("admin:batching_batchprocessinglog_change", args=[log_id]))
            for log_id in (staged.result or {}).get("log_ids", [])
        ]
        context = self.import_context(
            request,
            f"Import of {staged.original_name}",
            staged=staged,
            kind_label=imports.KINDS[staged.kind],
            job=job,
            logs=logs,
            status_url=reverse("admin:products_product_import_status", args=[token]),
        )
        return TemplateResponse(request, "admin/products/product/import_detail.html", context)

    @method_decorator(require_GET)
    def import_status_view(self, request: HttpRequest, token: str) -> JsonResponse:
        """JSON for the progress page's poll: the state and the job's progress."""
        staged = self.staged(request, token)
        job = (imports.job_status(staged) if staged.state == imports.RUNNING else None) or {}
        return JsonResponse(
            {
                "state": staged.state,
                "rows_done": job.get("rows_done"),
                "rows_total": job.get("rows_total"),
                "job_status": job.get("status"),
            }
        )


@admin.register(ProductView)
class ProductViewAdmin(DeclaredFiltersMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Interactions are bulk-loaded by create_product_views; here they are only read.

    The shop's largest table: no date hierarchy (a MIN/MAX), no related-object
    filters, exact-match search the indexes serve, no second unfiltered COUNT(*).
    """

    list_display = ["id", "user", "product", "interaction_type", "session_id", "created_at"]
    list_select_related = ["user", "product"]
    list_filter = ["interaction_type", "created_at"]
    search_fields = ["=session_id", "=product__sku", "=user__username"]
    search_help_text = "Exact session id, product sku or username."
    show_full_result_count = False


@admin.register(RecommendationScore)
class RecommendationScoreAdmin(DeclaredFiltersMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Scores are upserted by upsert_recommendation_scores; here they are only read."""

    list_display = ["id", "user", "product", "algorithm", "score", "updated_at"]
    list_select_related = ["user", "product"]
    # No algorithm filter (a SELECT DISTINCT over the table per page): search covers it.
    search_fields = ["=user__username", "=product__sku", "=algorithm"]
    search_help_text = "Exact username, product sku or algorithm."
    show_full_result_count = False
