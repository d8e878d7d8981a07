"""Admin for orders: browse them, follow their lines, move their status on.

Orders enter the shop only through ``process_orders``, which checks and moves
stock and computes the total in the same transaction as the order. The admin
does none of that, so it cannot add orders, and an order's lines, reference and
total are shown read-only. What staff may change is the fulfilment status and
the customer (raw-id widget: the form never loads every user).

The changelist links to the sales report (``sales-report/``) and to the CSV
export of order lines (``export-csv/``), both built on ``orders.reports``:
the report in two aggregate queries, the export streamed in flat memory.

Note:
    Setting the status to "cancelled" here does not put stock back; that needs
    a cancellation service, which an admin action could then call.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypedDict

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, QueryDict, StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone

from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin, filter_moment
from common.charts import line_chart
from orders.models import Order, OrderItem
from orders.reports import SalesReport, check_range, iter_order_lines_csv, sales_report

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    class ItemCount(TypedDict):
        item_count: int


# Rows of the per-product table on the sales report page; the command and the
# CSV export have them all.
REPORT_PRODUCTS_SHOWN = 100


class SalesRangeForm(forms.Form):
    """A range of whole days, both included; either end may be left open."""

    since = forms.DateField(
        required=False,
        label="From",
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
    )
    until = forms.DateField(
        required=False,
        label="To",
        widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
    )

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        try:
            check_range(cleaned.get("since"), cleaned.get("until"))
        except ValueError as exc:
            raise forms.ValidationError(str(exc), code="reversed") from None
        return cleaned


def revenue_per_day(report: SalesReport) -> list[tuple[date, float]]:
    """Every day from the first sale to the last, a day without sales at zero.

    The report lists only days with orders; drawn as they are, the line would
    run straight over the days between as if there had been sales.
    """
    if not report.days:
        return []
    revenue = {day.day: float(day.revenue) for day in report.days}
    first, last = report.days[0].day, report.days[-1].day
    days = (first + timedelta(days=n) for n in range((last - first).days + 1))
    return [(day, revenue.get(day, 0.0)) for day in days]


def changelist_date_range(query: QueryDict) -> dict[str, str]:
    """The changelist's date filter (``created_at__gte``/``__lt``) as whole days.

    The filter's "Today", "Past 7 days", "This month"... links send aware
    datetimes at midnight; ``__lt`` is exclusive, so the last day is the one
    before it. A value ``filter_moment`` refuses leaves its end open (the
    changelist itself redirects with ``?e=1``), as does an ``__lt`` of the
    first moment a datetime can hold.
    """
    days: dict[str, str] = {}
    for name, key, shift in (
        ("since", "created_at__gte", timedelta()),
        ("until", "created_at__lt", timedelta(microseconds=1)),
    ):
        if moment := filter_moment(query.get(key, "")):
            try:
                days[name] = timezone.localdate(moment - shift).isoformat()
            except OverflowError:
                continue
    return days


class OrderItemInline(ReadOnlyAdminMixin, admin.TabularInline):
    """An order's lines, read-only.

    Editable product widgets would cost one query per line to render their
    labels (raw-id and autocomplete widgets alike); read-only cells come from
    the joined product, so an order of any size renders in the same queries.
    """

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
        suffix = f"?{query.urlencode()}" if query else ""
        context = {
            "sales_report_url": reverse("admin:orders_order_sales_report") + suffix,
            "export_csv_url": reverse("admin:orders_order_export_csv") + suffix,
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def sales_report_view(self, request: HttpRequest) -> HttpResponse:
        """Orders, revenue, average order value, per product and per day, with a chart.

        Two aggregate queries whatever the number of orders. A bad date is
        shown with the form's error and status 400.
        """
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SalesRangeForm(request.GET)
        report, chart, status = None, None, 400
        if form.is_valid():
            report, status = sales_report(**form.cleaned_data), 200
            chart = line_chart(
                {"revenue": revenue_per_day(report)}, title="Revenue per day", y_label="revenue"
            )
        export_query = request.GET.copy() if form.is_valid() else QueryDict()
        context = {
            **self.admin_site.each_context(request),
            "title": "Sales report",
            "opts": self.opts,
            "form": form,
            "report": report,
            "chart": chart,
            "products_shown": REPORT_PRODUCTS_SHOWN,
            "export_csv_url": reverse("admin:orders_order_export_csv")
            + (f"?{export_query.urlencode()}" if export_query else ""),
        }
        return TemplateResponse(
            request, "admin/orders/order/sales_report.html", context, status=status
        )

    def export_csv_view(self, request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        """Every order line of the range as CSV, streamed: see ``iter_order_lines_csv``.

        The response is a generator consumed while it is sent, so the server
        holds one chunk of rows at a time, not the export.
        """
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = SalesRangeForm(request.GET)
        if not form.is_valid():
            return self.sales_report_view(request)
        since, until = form.cleaned_data["since"], form.cleaned_data["until"]
        first = since.isoformat() if since else "start"
        last = until.isoformat() if until else "end"
        name = f"order-lines-{first}-to-{last}"
        return StreamingHttpResponse(
            iter_order_lines_csv(since=since, until=until),
            content_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )

    @admin.display(description="items", ordering="item_count")
    def item_count(self, order: WithAnnotations[Order, ItemCount]) -> int:
        return order.item_count
