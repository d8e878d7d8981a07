"""Order rows: parsing and validation shared by both order operations (pure Python)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from batching.engine import RowInvalid
from products.services.rows import NOT_AN_OBJECT, REQUIRED, as_mapping, integer, text

NO_ITEMS = "an order needs at least one item"
TOO_MANY_ITEMS = "an order has at most {limit} items"
NOT_A_LIST = "must be a list"

# Outcomes of the database phase.
INACTIVE_PRODUCT = "product {id} is not active"
INSUFFICIENT_STOCK = "not enough stock for product {id}: {requested} requested, {available} left"
DUPLICATE_ORDER = "order {reference} was already processed"
TOTAL_TOO_LARGE = "the order's total {total} is too large (the limit is {limit})"

MAX_ORDER_ITEMS = 100
MAX_ORDER_TOTAL = Decimal("1000000000000")  # Order.total: 14 digits, 2 after the point


@dataclass(slots=True)
class OrderLine:
    product_id: int
    quantity: int


@dataclass(slots=True)
class OrderRow:
    reference: str
    user_id: int
    items: tuple[OrderLine, ...]

    def quantities(self) -> dict[int, int]:
        """Quantity per product, a product listed twice counted once."""
        wanted: dict[int, int] = {}
        for line in self.items:
            wanted[line.product_id] = wanted.get(line.product_id, 0) + line.quantity
        return wanted


def order_lines(raw: Any) -> int:
    """How many lines a raw order has (at least 1): its weight in a chunk or a request."""
    items = raw.get("items") if isinstance(raw, Mapping) else None
    return max(len(items), 1) if isinstance(items, list | tuple) else 1


def parse_order(raw: Any) -> OrderRow:
    row = as_mapping(raw)
    reference = text(row, "reference", limit=64)
    user_id = integer(row, "user_id")
    items = row.get("items")
    if items is None:
        raise RowInvalid("items", REQUIRED)
    if isinstance(items, str | bytes | Mapping) or not hasattr(items, "__iter__"):
        raise RowInvalid("items", NOT_A_LIST)
    items = list(items)
    if not items:
        raise RowInvalid("items", NO_ITEMS)
    if len(items) > MAX_ORDER_ITEMS:
        raise RowInvalid("items", TOO_MANY_ITEMS.format(limit=MAX_ORDER_ITEMS))
    lines = []
    for position, raw_item in enumerate(items):
        prefix = f"items[{position}]"
        if not isinstance(raw_item, Mapping):
            raise RowInvalid(prefix, NOT_AN_OBJECT)
        try:
            lines.append(OrderLine(integer(raw_item, "product_id"), integer(raw_item, "quantity")))
        except RowInvalid as exc:
            raise RowInvalid(f"{prefix}.{exc.field}", exc.message) from None
    return OrderRow(reference, user_id, tuple(lines))
