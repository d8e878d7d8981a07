"""Sales figures and the order-lines CSV export, for the command, the admin and the API.

Every order but cancelled ones, in whole days, both ends included; revenue is the
sum of the order lines, so every figure adds up (docs/admin-and-reports.md).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db.models import Count, DecimalField, ExpressionWrapper, F, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from orders.models import Order, OrderItem

CENT = Decimal("0.01")
ZERO = Decimal("0.00")
EXPORT_CHUNK_SIZE = 2000
CSV_HEADER = (
    "order",
    "date",
    "customer",
    "product_sku",
    "product_name",
    "quantity",
    "unit_price",
    "line_total",
)
# Spreadsheets read a text cell starting with these as a formula: it gets a "'" first.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# The one validation of a report's range, whose message every caller shows.
RANGE_REVERSED = "since ({since}) is after until ({until})"

LINE_TOTAL = ExpressionWrapper(
    F("quantity") * F("unit_price"), output_field=DecimalField(max_digits=20, decimal_places=2)
)


@dataclass(frozen=True)
class ProductSales:
    product_id: int
    sku: str
    name: str
    units: int
    revenue: Decimal


@dataclass(frozen=True)
class DaySales:
    day: date
    orders: int
    revenue: Decimal


@dataclass(frozen=True)
class SalesReport:
    """Sales in ``[since, until]`` (None: unbounded): ``products`` by revenue, highest
    first; ``days`` by day, only days with orders."""

    since: date | None
    until: date | None
    orders: int
    revenue: Decimal
    average_order_value: Decimal
    units: int
    products: list[ProductSales] = field(default_factory=list)
    days: list[DaySales] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_range(since: date | None, until: date | None) -> None:
    """Refuse a reversed range (ValueError, ``RANGE_REVERSED``); either end may be None."""
    if since and until and since > until:
        raise ValueError(RANGE_REVERSED.format(since=since, until=until))


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def _range_filter(since: date | None, until: date | None, prefix: str = "") -> Q:
    """Sold orders created from the start of ``since`` to the end of ``until``, bounded on
    ``created_at`` itself for ``order_created_idx`` (the first and last dates bound nothing)."""
    check_range(since, until)
    condition = ~Q(**{f"{prefix}status": Order.Status.CANCELLED})
    if since is not None and since > date.min:
        condition &= Q(**{f"{prefix}created_at__gte": _start_of(since)})
    if until is not None and until < date.max:
        condition &= Q(**{f"{prefix}created_at__lt": _start_of(until + timedelta(days=1))})
    return condition


def sales_report(*, since: date | None = None, until: date | None = None) -> SalesReport:
    """Orders, revenue, average order value, and sales per product and per day: two queries
    whatever the number of orders; ValueError for a reversed range."""
    orders = Order.objects.filter(_range_filter(since, until))
    line_total = ExpressionWrapper(
        F("items__quantity") * F("items__unit_price"),
        output_field=LINE_TOTAL.output_field,
    )
    per_day = (
        orders.annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(
            # Distinct: the join to the lines repeats each order once per line.
            orders=Count("pk", distinct=True),
            revenue=Coalesce(Sum(line_total), ZERO, output_field=LINE_TOTAL.output_field),
            units=Coalesce(Sum("items__quantity"), 0),
        )
        .order_by("day")
    )
    days, order_count, revenue, units = [], 0, ZERO, 0
    for row in per_day:
        days.append(DaySales(day=row["day"], orders=row["orders"], revenue=_money(row["revenue"])))
        order_count += row["orders"]
        revenue += _money(row["revenue"])
        units += row["units"]

    per_product = (
        OrderItem.objects.filter(_range_filter(since, until, prefix="order__"))
        .values("product_id", "product__sku", "product__name")
        .annotate(units=Sum("quantity"), revenue=Sum(LINE_TOTAL))
        .order_by("-revenue", "product__sku")
    )
    products = [
        ProductSales(product_id=pk, sku=sku, name=name, units=sold, revenue=_money(sales))
        for pk, sku, name, sold, sales in per_product.values_list(
            "product_id", "product__sku", "product__name", "units", "revenue"
        )
    ]
    average = (revenue / order_count).quantize(CENT, ROUND_HALF_UP) if order_count else ZERO
    return SalesReport(
        since=since,
        until=until,
        orders=order_count,
        revenue=revenue,
        average_order_value=average,
        units=units,
        products=products,
        days=days,
    )


def _money(value: Decimal | float | int | None) -> Decimal:
    """A sum as Decimal cents (SQLite sums decimals as floating point)."""
    if value is None:
        return ZERO
    return Decimal(str(value)).quantize(CENT, ROUND_HALF_UP)


def _cell(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


class _Line:
    """A write-only file that hands back what ``csv.writer`` writes to it."""

    def write(self, text: str) -> str:
        return text


def iter_order_lines_csv(
    *, since: date | None = None, until: date | None = None, chunk_size: int = EXPORT_CHUNK_SIZE
) -> Iterator[str]:
    """The header, then one CSV line per order line of ``sales_report``'s orders, oldest first,
    from one query read ``chunk_size`` rows at a time. A reversed range raises ValueError at
    once, before the first line, so a view can still answer with an error."""
    return _csv_lines(_range_filter(since, until, prefix="order__"), chunk_size)


def _csv_lines(condition: Q, chunk_size: int) -> Iterator[str]:
    writer = csv.writer(_Line())
    yield writer.writerow(CSV_HEADER)
    rows = (
        OrderItem.objects.filter(condition)
        .order_by("order__created_at", "order_id", "pk")
        .values_list(
            "order__reference",
            "order__created_at",
            "order__user__username",
            "product__sku",
            "product__name",
            "quantity",
            "unit_price",
        )
        .iterator(chunk_size=chunk_size)
    )
    zone = timezone.get_current_timezone()
    for reference, created_at, username, sku, name, quantity, unit_price in rows:
        price = _money(unit_price)
        moment = created_at.astimezone(zone).isoformat(timespec="seconds")
        texts = [_cell(text) for text in (username, sku, name)]
        yield writer.writerow((_cell(reference), moment, *texts, quantity, price, price * quantity))
