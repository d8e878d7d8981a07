"""Admin for orders: browse them, follow their lines, change status and customer, and the
sales report and CSV export. Orders enter only through ``process_orders``: none is added here.

Note:
    Setting the status to "cancelled" here does not put stock back.
"""

from __future__ import annotations

import contextlib
from datetime import date, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone

from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin, filter_moment
from common.charts import line_chart
from common.queries import related_count
from orders.models import Order, OrderItem
from orders.reports import SalesReport, check_range, iter_order_lines_csv, sales_report

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    class ItemCount(TypedDict):
        item_count: int


REPORT_PRODUCTS_SHOWN = 100  # on the page; the command and the CSV export have them all
DAY = forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d")


class SalesRangeForm(forms.Form):
    """A range of whole days, both included; either end may be left open."""

    since = forms.DateField(required=False, label="From", widget=DAY)
    until = forms.DateField(required=False, label="To", widget=DAY)

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        try:
            check_range(cleaned.get("since"), cleaned.get("until"))
        except ValueError as exc:
            raise forms.ValidationError(str(exc), code="reversed") from None
        return cleaned


def revenue_per_day(report: SalesReport) -> list[tuple[date, float]]:
    """Every day from the first sale to the last, a day without sales at zero (the report
    lists only days with orders: the line would run straight over the others)."""
    if not report.days:
        return []
    revenue = {day.day: float(day.revenue) for day in report.days}
    first, last = report.days[0].day, report.days[-1].day
    days = (first + timedelta(days=n) for n in range((last - first).days + 1))
    return [(day, revenue.get(day, 0.0)) for day in days]


def changelist_date_range(query: QueryDict) -> dict[str, str]:
    """The changelist's date filter (midnights; ``__lt`` exclusive) as whole days; a refused
    value, or an ``__lt`` of the first datetime, leaves its end open."""
    days: dict[str, str] = {}
    for name, key, shift in (
        ("since", "created_at__gte", timedelta()),
        ("until", "created_at__lt", timedelta(microseconds=1)),
    ):
        if moment := filter_moment(query.get(key, "")):
            with contextlib.suppress(OverflowError):
                days[name] = timezone.localdate(moment - shift).isoformat()
    return days


def url_with(name: str, query: QueryDict) -> str:
    return reverse(name) + (f"?{query.urlencode()}" if query else "")


class OrderItemInline(ReadOnlyAdminMixin, admin.TabularInline):
    """An order's lines, read-only: editable product widgets would cost a query per line."""

    model = OrderItem
    fields = readonly_fields = ("product", "quantity", "unit_price", "line_total")
    extra = 0

    def get_queryset(self, request: HttpRequest) -> QuerySet[OrderItem]:
        return super().get_queryset(request).select_related("product").order_by("pk")

    @admin.display(description="line total")
    def line_total(self, item: OrderItem) -> Decimal:
        return item.quantity * item.unit_price


@admin.register(Order)
class OrderAdmin(DeclaredFiltersMixin, admin.ModelAdmin):
    list_display = ["reference", "user", "status", "total", "item_count", "created_at"]
    list_select_related = ["user"]
    list_filter = ["status", "created_at"]
    search_fields = ["reference", "user__username"]
    search_help_text = "Order reference or customer username."
    fields = ["reference", "user", "status", "total", "created_at"]
    # The idempotency key, and the sum of the lines process_orders wrote.
    readonly_fields = ["reference", "total", "created_at"]
    raw_id_fields = ["user"]  # the form never loads every user into a <select>
    inlines = [OrderItemInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Order]:
        return super().get_queryset(request).annotate(item_count=related_count(OrderItem, "order"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("sales-report/", view(self.sales_report_view), name="orders_order_sales_report"),
            path("export-csv/", view(self.export_csv_view), name="orders_order_export_csv"),
            *super().get_urls(),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The list, with "Sales report" and "Export CSV" links for its date filter."""
        query = QueryDict(mutable=True)
        query.update(changelist_date_range(request.GET))
        context = {
            "sales_report_url": url_with("admin:orders_order_sales_report", query),
            "export_csv_url": url_with("admin:orders_order_export_csv", query),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def sales_report_view(self, request: HttpRequest) -> HttpResponse:
        """The sales report with a chart; a bad date gets the form's error and status 400."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SalesRangeForm(request.GET)
        report, chart, status = None, None, 400
        if form.is_valid():
            report, status = sales_report(**form.cleaned_data), 200
            chart = line_chart(
                {"revenue": revenue_per_day(report)}, title="Revenue per day", y_label="revenue"
            )
        export_query = request.GET if form.is_valid() else QueryDict()
        context = {
            **self.admin_site.each_context(request),
            "title": "Sales report",
            "opts": self.opts,
            "form": form,
            "report": report,
            "chart": chart,
            "products_shown": REPORT_PRODUCTS_SHOWN,
            "export_csv_url": url_with("admin:orders_order_export_csv", export_query),
        }
        return TemplateResponse(
            request, "admin/orders/order/sales_report.html", context, status=status
        )

    def export_csv_view(self, request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        """Every order line of the range as CSV, streamed (``iter_order_lines_csv``)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SalesRangeForm(request.GET)
        if not form.is_valid():
            return self.sales_report_view(request)
        since, until = form.cleaned_data["since"], form.cleaned_data["until"]
        name = f"order-lines-{since or 'start'}-to-{until or 'end'}"
        return StreamingHttpResponse(
            iter_order_lines_csv(since=since, until=until),
            content_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )

    @admin.display(description="items", ordering="item_count")
    def item_count(self, order: WithAnnotations[Order, ItemCount]) -> int:
        return order.item_count
