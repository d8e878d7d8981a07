"""Sales figures and the order-lines CSV export, for the command, the admin and the API.

What counts: every order that is not cancelled (confirmed and shipped ones),
in a range of whole days of the current time zone (``since`` and ``until``
both included). Revenue is the sum of the order lines, quantity times the unit
price the line was sold at, so the per-product and per-day figures add up to
the total and to the line totals of the CSV export. (``Order.total`` holds the
same sum, written by ``process_orders``; the lines are its source.)

Queries: the report is two aggregate queries (orders and revenue per day, then
units and revenue per product) whatever the number of orders; the totals are
summed from the days in Python. The export reads the lines, joined to their
order, customer and product, with ``QuerySet.iterator()``: rows arrive in
chunks (a server-side cursor on PostgreSQL) and each CSV line is yielded as
soon as it is written, so memory stays flat however many lines there are.
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
# A text cell starting with one of these is read as a formula by spreadsheets
# (CSV injection): such cells are prefixed with an apostrophe.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# The one validation of a report's range; the command, the admin form and the
# API show these messages as their own errors.
BAD_DATE = "{value!r} is not a date (expected YYYY-MM-DD)"
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
    """Sales in ``[since, until]`` (None: unbounded), cancelled orders left out.

    ``products`` is sorted by revenue, highest first; ``days`` by day, and
    lists only days with orders.
    """

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


def parse_day(value: str) -> date:
    """A ``YYYY-MM-DD`` day.

    Raises:
        ValueError: with ``BAD_DATE``.
    """
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(BAD_DATE.format(value=value)) from None


def check_range(since: date | None, until: date | None) -> None:
    """Refuse a reversed range; either end may be None (unbounded).

    Raises:
        ValueError: with ``RANGE_REVERSED``.
    """
    if since and until and since > until:
        raise ValueError(RANGE_REVERSED.format(since=since, until=until))


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))


def _range_filter(since: date | None, until: date | None, prefix: str = "") -> Q:
    """Sold orders created from the start of ``since`` to the end of ``until``.

    Bounds on ``created_at`` itself (not on its date), so the
    ``order_created_idx`` index serves them. The first and last days a date
    can hold are no bound at all: the moment before the first or after the
    last is not a datetime.
    """
    check_range(since, until)
    condition = ~Q(**{f"{prefix}status": Order.Status.CANCELLED})
    if since is not None and since > date.min:
        condition &= Q(**{f"{prefix}created_at__gte": _start_of(since)})
    if until is not None and until < date.max:
        condition &= Q(**{f"{prefix}created_at__lt": _start_of(until + timedelta(days=1))})
    return condition


def sales_report(*, since: date | None = None, until: date | None = None) -> SalesReport:
    """Orders, revenue, average order value, and sales per product and per day.

    Two queries, whatever the number of orders. Days are days of the current
    time zone (``settings.TIME_ZONE`` unless activated otherwise).

    Raises:
        ValueError: ``since`` is after ``until``.
    """
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
        ProductSales(
            product_id=row["product_id"],
            sku=row["product__sku"],
            name=row["product__name"],
            units=row["units"],
            revenue=_money(row["revenue"]),
        )
        for row in per_product
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
    *,
    since: date | None = None,
    until: date | None = None,
    chunk_size: int = EXPORT_CHUNK_SIZE,
) -> Iterator[str]:
    """The header, then one CSV line per order line, oldest order first.

    The same orders as ``sales_report`` (cancelled ones left out). One query,
    read ``chunk_size`` rows at a time; nothing is accumulated, so a consumer
    that writes each line out as it comes (a streaming response, a file) runs
    in flat memory. Dates are ISO 8601 in the current time zone; text cells
    that a spreadsheet would take for a formula are prefixed with ``'``.

    Raises:
        ValueError: ``since`` is after ``until`` (raised at once, before the
        first line, so a view can still answer with an error).
    """
    condition = _range_filter(since, until, prefix="order__")
    return _csv_lines(condition, chunk_size)


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
        unit_price = _money(unit_price)
        yield writer.writerow(
            (
                _cell(reference),
                created_at.astimezone(zone).isoformat(timespec="seconds"),
                _cell(username),
                _cell(sku),
                _cell(name),
                quantity,
                unit_price,
                unit_price * quantity,
            )
        )
