"""Input rows: parsing and validation shared by the naive and optimized services.

Pure Python, raising ``RowInvalid(field, message)``. Run once per input row: the
common case is decided first, and rows are slotted dataclasses built positionally
(a frozen one is slower to build).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from batching.engine import RowInvalid
from products.models import ProductView

# Messages are constants so tests, the API and both services agree on them.
NOT_AN_OBJECT = "row must be an object (a mapping of field to value)"
REQUIRED = "this field is required"
NOT_INTEGER = "must be an integer"
NOT_POSITIVE = "must be a positive integer"
NEGATIVE = "must not be negative"
NOT_TEXT = "must be a string"
NUL_CHARACTER = "must not contain NUL characters"
NOT_UNICODE = "must be valid Unicode text (no lone surrogates)"
TOO_LONG = "must be at most {limit} characters"
NOT_NUMBER = "must be a number"
NOT_FINITE = "must be a finite number"
OUT_OF_UNIT_RANGE = "must be between 0 and 1"
NOT_DECIMAL = "must be a decimal number"
TOO_PRECISE = "must have at most {places} decimal places"
TOO_LARGE = "must be less than {limit}"
NOT_BOOLEAN = "must be a boolean (true/false)"
NOT_DATETIME = "must be an ISO 8601 date-time"
BAD_CHOICE = "must be one of: {choices}"
NOTHING_TO_UPDATE = "give price, stock_quantity or both"

# Outcomes of the database phase.
UNKNOWN_USER = "user {id} does not exist"
UNKNOWN_PRODUCT = "product {id} does not exist"
UNKNOWN_SKU = "no product with sku {sku}"
UNKNOWN_REFERENCE = "a user or product of this chunk does not exist"

CENT = Decimal("0.01")
MAX_PRICE = Decimal("10000000000")  # Product.price: 12 digits, 2 after the point
MAX_INT = 2**31 - 1
# ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,20}", re.ASCII)
INTERACTION_TYPES = frozenset(ProductView.InteractionType.values)
DEFAULT_INTERACTION = str(ProductView.InteractionType.VIEW.value)
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f"})


def as_mapping(raw: Any) -> Mapping[str, Any]:
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise RowInvalid("row", NOT_AN_OBJECT)
    return raw


def given(row: Mapping[str, Any], name: str) -> bool:
    """A field is given: present, and not blank (an empty CSV cell is not)."""
    value = row.get(name)
    return value is not None and not (isinstance(value, str) and value.strip() == "")


def present(row: Mapping[str, Any], name: str) -> Any:
    if not given(row, name):
        raise RowInvalid(name, REQUIRED)
    return row[name]


def integer(row: Mapping[str, Any], name: str, *, minimum: int = 1) -> int:
    value = row.get(name)
    if type(value) is int and minimum <= value <= MAX_INT:
        return value  # the common case, decided without the checks below
    value = present(row, name)
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and INTEGER_TEXT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise RowInvalid(name, NOT_INTEGER)
    if number < minimum:
        raise RowInvalid(name, NOT_POSITIVE if minimum > 0 else NEGATIVE)
    if number > MAX_INT:
        raise RowInvalid(name, TOO_LARGE.format(limit=MAX_INT + 1))
    return number


def text(row: Mapping[str, Any], name: str, *, limit: int) -> str:
    value = row.get(name)
    if type(value) is str:  # the common case, decided without the checks below
        stripped = value.strip()
        if stripped and len(stripped) <= limit and stripped.isascii() and "\x00" not in stripped:
            return stripped
    value = present(row, name)
    if not isinstance(value, str):
        raise RowInvalid(name, NOT_TEXT)
    value = value.strip()
    if "\x00" in value:
        raise RowInvalid(name, NUL_CHARACTER)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RowInvalid(name, NOT_UNICODE) from None
    if len(value) > limit:
        raise RowInvalid(name, TOO_LONG.format(limit=limit))
    return value


def unit_score(row: Mapping[str, Any], name: str) -> float:
    value = row.get(name)
    if type(value) is float and 0.0 <= value <= 1.0:
        return value  # the common case (NaN and infinities fail the range)
    value = present(row, name)
    if isinstance(value, bool):
        raise RowInvalid(name, NOT_NUMBER)
    try:
        number = float(value) if isinstance(value, int | float | str | Decimal) else None
    except (ValueError, OverflowError):  # OverflowError: an int beyond any float
        number = None
    if number is None:
        raise RowInvalid(name, NOT_NUMBER)
    if not math.isfinite(number):
        raise RowInvalid(name, NOT_FINITE)
    if not 0.0 <= number <= 1.0:
        raise RowInvalid(name, OUT_OF_UNIT_RANGE)
    return number


def money(row: Mapping[str, Any], name: str) -> Decimal:
    value = present(row, name)
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise RowInvalid(name, NOT_DECIMAL)
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise RowInvalid(name, NOT_DECIMAL) from None
    if not amount.is_finite():
        raise RowInvalid(name, NOT_FINITE)
    if amount < 0:
        raise RowInvalid(name, NEGATIVE)
    if amount >= MAX_PRICE:
        raise RowInvalid(name, TOO_LARGE.format(limit=MAX_PRICE))
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -2 and amount != amount.quantize(CENT):
        raise RowInvalid(name, TOO_PRECISE.format(places=2))
    return amount.quantize(CENT)


def boolean(row: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = row.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, int) and value in (0, 1):  # True and False too
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
    raise RowInvalid(name, NOT_BOOLEAN)


def moment(row: Mapping[str, Any], name: str) -> datetime:
    value = row.get(name)
    if value is None or value == "":
        return datetime.now(UTC)
    parsed = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = parse_datetime(value.strip())
    if parsed is None:
        raise RowInvalid(name, NOT_DATETIME)
    if parsed.tzinfo is UTC:
        return parsed  # already what is stored
    try:
        if timezone.is_naive(parsed):
            parsed = timezone.make_aware(parsed, timezone.get_default_timezone())
        # Stored in UTC: a moment whose UTC value leaves years 1-9999 cannot be.
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        raise RowInvalid(name, NOT_DATETIME) from None


@dataclass(slots=True)
class ViewRow:
    user_id: int
    product_id: int
    session_id: str
    interaction_type: str
    created_at: datetime


def parse_view(raw: Any) -> ViewRow:
    row = as_mapping(raw)
    interaction = row.get("interaction_type") or DEFAULT_INTERACTION
    if not isinstance(interaction, str) or interaction not in INTERACTION_TYPES:
        choices = ", ".join(sorted(INTERACTION_TYPES))
        raise RowInvalid("interaction_type", BAD_CHOICE.format(choices=choices))
    return ViewRow(
        integer(row, "user_id"),
        integer(row, "product_id"),
        text(row, "session_id", limit=64),
        str(interaction),
        moment(row, "created_at"),
    )


@dataclass(slots=True)
class ScoreRow:
    user_id: int
    product_id: int
    algorithm: str
    score: float

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.user_id, self.product_id, self.algorithm)


def parse_score(raw: Any) -> ScoreRow:
    row = as_mapping(raw)
    return ScoreRow(
        integer(row, "user_id"),
        integer(row, "product_id"),
        text(row, "algorithm", limit=64),
        unit_score(row, "score"),
    )


@dataclass(slots=True)
class ProductRow:
    sku: str
    name: str
    category: str
    price: Decimal
    stock_quantity: int
    is_active: bool


def parse_product(raw: Any) -> ProductRow:
    row = as_mapping(raw)
    return ProductRow(
        text(row, "sku", limit=64),
        text(row, "name", limit=200),
        text(row, "category", limit=100),
        money(row, "price"),
        integer(row, "stock_quantity", minimum=0),
        boolean(row, "is_active", default=True),
    )


@dataclass(slots=True)
class ProductUpdateRow:
    """New values for an existing product; ``None`` leaves that field as it is."""

    sku: str
    price: Decimal | None
    stock_quantity: int | None


def parse_product_update(raw: Any) -> ProductUpdateRow:
    row = as_mapping(raw)
    sku = text(row, "sku", limit=64)
    price = money(row, "price") if given(row, "price") else None
    stock = integer(row, "stock_quantity", minimum=0) if given(row, "stock_quantity") else None
    if price is None and stock is None:
        raise RowInvalid("row", NOTHING_TO_UPDATE)
    return ProductUpdateRow(sku, price, stock)
