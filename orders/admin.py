"""Admin for orders: browse them, follow their lines, move their status on.

Orders enter the shop only through ``process_orders``, which checks and moves
stock and computes the total in the same transaction as the order. The admin
does none of that, so it cannot add orders, and an order's lines, reference and
total are shown read-only. What staff may change is the fulfilment status and
the customer (raw-id widget: the form never loads every user).

Note:
    Setting the status to "cancelled" here does not put stock back; that needs
    a cancellation service, which an admin action could then call.
"""

from __future__ import annotations

from decimal import Decimal

from django.contrib import admin
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest

from batching.admin import ReadOnlyAdminMixin
from orders.models import Order, OrderItem


class OrderItemInline(ReadOnlyAdminMixin, admin.TabularInline):
    """An order's lines, read-only.

    Editable product widgets would cost one query per line to render their
    labels (raw-id and autocomplete widgets alike); read-only cells come from
    the joined product, so an order of any size renders in the same queries.
    """

    model = OrderItem
    fields = ["product", "quantity", "unit_price", "line_total"]
    readonly_fields = fields
    extra = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[OrderItem]:
        return super().get_queryset(request).select_related("product").order_by("pk")

    @admin.display(description="line total")
    def line_total(self, item: OrderItem) -> Decimal:
        return item.quantity * item.unit_price


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["reference", "user", "status", "total", "item_count", "created_at"]
    list_select_related = ["user"]
    list_filter = ["status", "created_at"]
    search_fields = ["reference", "user__username"]
    search_help_text = "Order reference or customer username."
    fields = ["reference", "user", "status", "total", "created_at"]
    # reference is the idempotency key process_orders checks replays against;
    # total is the sum of the lines it wrote.
    readonly_fields = ["reference", "total", "created_at"]
    raw_id_fields = ["user"]
    inlines = [OrderItemInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Order]:
        """Each order with its number of lines, counted by a correlated subquery.

        Not ``annotate(Count("items"))``: that joins every line and groups every
        order, and the paginator's COUNT would have to do the same. A subquery
        annotation is dropped from the COUNT and, on a page, runs only for the
        rows shown, each an index lookup on the lines' order_id.
        """
        lines = (
            OrderItem.objects.filter(order=OuterRef("pk"))
            .order_by()
            .values("order")
            .annotate(count=Count("pk"))
            .values("count")
        )
        return super().get_queryset(request).annotate(item_count=Coalesce(Subquery(lines), 0))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="items", ordering="item_count")
    def item_count(self, order: Order) -> int:
        return order.item_count
