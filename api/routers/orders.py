"""Order batches and the sales report."""

from datetime import date
from decimal import Decimal
from typing import Annotated

from django.http import HttpRequest
from ninja import Query, Router, Schema

from api.auth import needs
from api.batch import run_rows
from api.errors import ApiError, row_error
from api.schemas import BATCH_RESPONSES, ERRORS, Background, IdempotencyKey, rows_body
from batching.models import BatchProcessingLog
from orders.reports import sales_report

router = Router()


@router.post(
    "/orders/batch",
    auth=needs("orders.add_order"),
    response=BATCH_RESPONSES,
    summary="Process a batch of orders",
    tags=["batches"],
    openapi_extra=rows_body(
        "Orders of {reference, user_id, items: [{product_id, quantity}]}; each is applied "
        "whole or rejected whole.",
        [{"reference": "ORD-1", "user_id": 1, "items": [{"product_id": 1, "quantity": 2}]}],
    ),
)
def orders_batch(
    request: HttpRequest, background: Background = False, idempotency_key: IdempotencyKey = None
):
    return run_rows(
        request,
        BatchProcessingLog.Operation.ORDERS,
        background=background,
        idempotency_key=idempotency_key,
    )


class ProductSalesOut(Schema):
    product_id: int
    sku: str
    name: str
    units: int
    revenue: Decimal


class DaySalesOut(Schema):
    day: date
    orders: int
    revenue: Decimal


class SalesReportOut(Schema):
    since: date | None
    until: date | None
    orders: int
    revenue: Decimal
    average_order_value: Decimal
    units: int
    products: list[ProductSalesOut]
    days: list[DaySalesOut]


@router.get(
    "/reports/sales",
    auth=needs("orders.view_order"),
    response={200: SalesReportOut, **ERRORS},
    summary="Sales totals, per product and per day",
    tags=["reports"],
)
def sales(
    request: HttpRequest,
    since: Annotated[date | None, Query(description="first day included (UTC)")] = None,
    until: Annotated[date | None, Query(description="last day included (UTC)")] = None,
):
    """Orders that are not cancelled, in whole days; two aggregate queries."""
    try:
        report = sales_report(since=since, until=until)
    except ValueError as exc:  # reports.RANGE_REVERSED
        raise ApiError(400, str(exc), [row_error(None, "since", str(exc))]) from None
    return report.as_dict()
