"""What both bulk services share: their methods, arguments and result type.

The services differ only in the variant of the operations they run, found in
``batching.registry``, so this package imports nothing of orders.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from batching.engine import BatchOperation, BatchResult, Prepared, RowError, run_batch
from batching.models import BatchProcessingLog
from batching.registry import operation_class
from products import cache
from products.services import rows as r

Operation = BatchProcessingLog.Operation
Resume = int | BatchProcessingLog | None  # a run to continue, by id or row


class Registered:
    """A service's operation class, looked up by name and the service's variant when used."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, service: Any, owner: type[BulkOperationsService]) -> type[BatchOperation]:
        return operation_class(self.name, owner.variant)


class BulkOperationsService:
    """Bulk writes for the shop, chunk by chunk; bad rows are reported, never raised.

    ``resume`` continues an interrupted run of the same operation and variant
    after its checkpoint, given the same input again.

    Note:
        The optimized service's bulk writes skip ``Model.save()`` and signals.
        Chunks after the first are read from a helper thread while the one
        before commits: an iterator that queries the database must be a list.
    """

    variant: ClassVar[str]
    views_operation = Registered(Operation.PRODUCT_VIEWS)
    scores_operation = Registered(Operation.RECOMMENDATION_SCORES)
    orders_operation = Registered(Operation.ORDERS)
    products_operation = Registered(Operation.PRODUCTS)
    product_updates_operation = Registered(Operation.PRODUCT_UPDATES)

    def __init__(self, *, using: str = "default") -> None:
        self.using = using

    def _run(self, operation: type[BatchOperation], rows: Iterable[Any], **options) -> BatchResult:
        return run_batch(operation(self.using), rows, **options)

    def create_product_views(
        self, rows: Iterable[Any], *, chunk_size: int | None = None, resume: Resume = None
    ) -> BatchResult:
        """Record product views; each product's view_count grows by its new views."""
        return self._run(self.views_operation, rows, chunk_size=chunk_size, resume=resume)

    def upsert_recommendation_scores(
        self, rows: Iterable[Any], *, chunk_size: int | None = None, resume: Resume = None
    ) -> BatchResult:
        """Create or update scores by (user, product, algorithm)."""
        return self._run(self.scores_operation, rows, chunk_size=chunk_size, resume=resume)

    def process_orders(
        self, orders: Iterable[Any], *, chunk_size: int | None = None, resume: Resume = None
    ) -> BatchResult:
        """Apply each order whole or reject it whole; a known reference is a duplicate."""
        return self._run(self.orders_operation, orders, chunk_size=chunk_size, resume=resume)

    def import_products(
        self, rows: Iterable[Any], *, chunk_size: int | None = None, resume: Resume = None
    ) -> BatchResult:
        """Create or update products by sku, creating categories as needed."""
        return self._run(self.products_operation, rows, chunk_size=chunk_size, resume=resume)

    def update_products(
        self, rows: Iterable[Any], *, chunk_size: int | None = None, resume: Resume = None
    ) -> BatchResult:
        """Set the price, the stock or both of existing products by sku."""
        return self._run(self.product_updates_operation, rows, chunk_size=chunk_size, resume=resume)


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


class BySku(BatchOperation):
    key_field = "sku"
    # A sku an earlier chunk wrote is found by the product's last_import mark.
    keys_in_database = True

    def key(self, item: Any) -> str:
        return item.sku

    def committed(self, rows: list[Prepared]) -> None:
        # Rows name products by sku, not id: retire every card (one cache write).
        cache.new_generation()


class ProductsOperation(BySku):
    operation = BatchProcessingLog.Operation.PRODUCTS
    # Its upsert locks the products it updates from the statement's start.
    volume_chunk_setting = "BULK_CATALOGUE_CHUNK_SIZE"

    def prepare(self, raw: Any) -> r.ProductRow:
        return r.parse_product(raw)


class ProductUpdatesOperation(BySku):
    operation = BatchProcessingLog.Operation.PRODUCT_UPDATES

    def prepare(self, raw: Any) -> r.ProductUpdateRow:
        return r.parse_product_update(raw)


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
