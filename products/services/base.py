"""What both bulk services share: their methods, arguments and result type.

A service is a set of ``BatchOperation`` classes run by the engine; the naive
and optimized services differ only in those classes, so the benchmark swaps
one service for the other and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any, ClassVar

from batching.engine import BatchOperation, BatchResult, Prepared, RowError, run_batch
from batching.models import BatchProcessingLog
from orders.models import Order
from products import cache
from products.services import rows as r


class BulkOperationsService:
    """Bulk writes for the shop. Bad rows are reported, never raised.

    Every method accepts any iterable (a generator too), reads it chunk by
    chunk, and returns a ``BatchResult`` whose ``log`` is the run's
    BatchProcessingLog row. ``resume`` takes the id of an interrupted run of
    the same operation and variant and continues after its checkpoint; pass
    the same input again.

    Note:
        Bulk writes skip ``Model.save()`` and model signals in the optimized
        service. The rows of every chunk after the first are read from a
        helper thread while the chunk before commits: an iterator that
        queries the database must be read into a list first.
    """

    variant: ClassVar[str]
    views_operation: ClassVar[type[BatchOperation]]
    scores_operation: ClassVar[type[BatchOperation]]
    orders_operation: ClassVar[type[BatchOperation]]
    products_operation: ClassVar[type[BatchOperation]]
    product_updates_operation: ClassVar[type[BatchOperation]]

    def __init__(self, *, using: str = "default") -> None:
        self.using = using

    def _run(
        self,
        operation: type[BatchOperation],
        rows: Iterable[Any],
        chunk_size: int | None,
        resume: int | BatchProcessingLog | None,
    ) -> BatchResult:
        return run_batch(operation(self.using), rows, chunk_size=chunk_size, resume=resume)

    def create_product_views(
        self,
        rows: Iterable[Any],
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> BatchResult:
        """Record product views; each product's view_count grows by its new views."""
        return self._run(self.views_operation, rows, chunk_size, resume)

    def upsert_recommendation_scores(
        self,
        rows: Iterable[Any],
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> BatchResult:
        """Create or update scores by (user, product, algorithm)."""
        return self._run(self.scores_operation, rows, chunk_size, resume)

    def process_orders(
        self,
        orders: Iterable[Any],
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> BatchResult:
        """Apply each order whole or reject it whole; a known reference is a duplicate."""
        return self._run(self.orders_operation, orders, chunk_size, resume)

    def import_products(
        self,
        rows: Iterable[Any],
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> BatchResult:
        """Create or update products by sku, creating categories as needed."""
        return self._run(self.products_operation, rows, chunk_size, resume)

    def update_products(
        self,
        rows: Iterable[Any],
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> BatchResult:
        """Set the price, the stock or both of existing products by sku."""
        return self._run(self.product_updates_operation, rows, chunk_size, resume)


class ViewsOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.PRODUCT_VIEWS

    def prepare(self, raw: Any) -> r.ViewRow:
        return r.parse_view(raw)

    def committed(self, rows: list[Prepared]) -> None:
        # The cards show view_count: drop those of the products viewed.
        cache.invalidate_products(row.item.product_id for row in rows)


class ScoresOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.RECOMMENDATION_SCORES
    key_field = "user_id, product_id, algorithm"
    # A key an earlier chunk wrote is found by the score's last_run mark.
    keys_in_database = True

    def prepare(self, raw: Any) -> r.ScoreRow:
        return r.parse_score(raw)

    def key(self, item: r.ScoreRow) -> tuple[int, int, str]:
        return item.key

    def committed(self, rows: list[Prepared]) -> None:
        cache.invalidate_recommendations(row.item.user_id for row in rows)


class OrdersOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.ORDERS
    key_field = "reference"
    fills = (Order,)  # each item's foreign key looks up the order written before it

    def prepare(self, raw: Any) -> r.OrderRow:
        return r.parse_order(raw)

    def weight(self, raw: Any) -> int:
        # An order weighs its lines: chunk_size bounds the lines a chunk writes.
        return r.order_lines(raw)

    def key(self, item: r.OrderRow) -> str:
        return item.reference

    def committed(self, rows: list[Prepared]) -> None:
        # Stock changed: drop the cards of every product ordered.
        cache.invalidate_products(line.product_id for row in rows for line in row.item.items)


class ProductsOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.PRODUCTS
    key_field = "sku"
    # A sku an earlier chunk wrote is found by the product's last_import mark.
    keys_in_database = True

    def prepare(self, raw: Any) -> r.ProductRow:
        return r.parse_product(raw)

    def key(self, item: r.ProductRow) -> str:
        return item.sku

    def committed(self, rows: list[Prepared]) -> None:
        # Rows name products by sku, not id: retire every card (one cache write).
        cache.invalidate_catalogue()


class ProductUpdatesOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.PRODUCT_UPDATES
    key_field = "sku"
    # A sku an earlier chunk updated is found by the product's last_import mark.
    keys_in_database = True

    def prepare(self, raw: Any) -> r.ProductUpdateRow:
        return r.parse_product_update(raw)

    def key(self, item: r.ProductUpdateRow) -> str:
        return item.sku

    def committed(self, rows: list[Prepared]) -> None:
        # Rows name products by sku, not id: retire every card (one cache write).
        cache.invalidate_catalogue()


def order_rejection(
    index: int,
    order: r.OrderRow,
    known: set[str],
    users: set[int],
    catalogue: dict[int, tuple[Decimal, int, bool]],
    remaining: dict[int, int],
) -> RowError | None:
    """Why an order cannot be applied, or None. Shared so both services decide alike."""
    if order.reference in known:
        return RowError(
            index, "reference", r.DUPLICATE_ORDER.format(reference=order.reference), "duplicate"
        )
    if order.user_id not in users:
        return RowError(index, "user_id", r.UNKNOWN_USER.format(id=order.user_id), "not_found")
    for position, line in enumerate(order.items):
        field = f"items[{position}].product_id"
        if line.product_id not in catalogue:
            return RowError(index, field, r.UNKNOWN_PRODUCT.format(id=line.product_id), "not_found")
        if not catalogue[line.product_id][2]:
            return RowError(index, field, r.INACTIVE_PRODUCT.format(id=line.product_id), "inactive")
    total = sum(
        (catalogue[line.product_id][0] * line.quantity for line in order.items), Decimal("0.00")
    )
    if total >= r.MAX_ORDER_TOTAL:
        message = r.TOTAL_TOO_LARGE.format(total=total, limit=r.MAX_ORDER_TOTAL)
        return RowError(index, "items", message, "invalid")
    for product_id, quantity in order.quantities().items():
        if quantity > remaining[product_id]:
            message = r.INSUFFICIENT_STOCK.format(
                id=product_id, requested=quantity, available=remaining[product_id]
            )
            return RowError(index, "items", message, "insufficient_stock")
    return None


def unknown_sku(row: Prepared) -> RowError:
    """A price and stock update for a sku the catalogue does not have (both services)."""
    return RowError(row.index, "sku", r.UNKNOWN_SKU.format(sku=row.item.sku), "not_found")


def reference_error(index: int, item: Any, users: set[int], products: set[int]) -> RowError | None:
    """The row's user or product is unknown (views and scores), or None."""
    if item.user_id not in users:
        return RowError(index, "user_id", r.UNKNOWN_USER.format(id=item.user_id), "not_found")
    if item.product_id not in products:
        return RowError(
            index, "product_id", r.UNKNOWN_PRODUCT.format(id=item.product_id), "not_found"
        )
    return None
