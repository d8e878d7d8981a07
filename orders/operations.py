"""Orders' bulk operation, naive and optimized: each order applied whole or rejected whole,
in input order; ``OrdersConfig.ready()`` registers both for ``process_orders``."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from batching.engine import (
    BatchOperation,
    ChunkConflict,
    ChunkOutcome,
    Prepared,
    RowError,
    RunContext,
    is_unique_violation,
)
from batching.models import BatchProcessingLog
from batching.portable import insert_rows
from batching.postgres import fast_paths, insert_with_children, read_by_key
from orders import rows as r
from orders.models import Order, OrderItem
from products import cache
from products.models import Product
from products.services.naive import NaiveOperationMixin
from products.services.optimized import add_to_each, existing_pks, locked_products, strict
from products.services.rows import UNKNOWN_PRODUCT, UNKNOWN_USER

TAKEN = "a concurrent run committed some of these references first ({error}); retrying the chunk"
OVERTAKEN = "a checkout overtook the chunk's stock ({error}); retrying it with the products locked"


class OrdersOperation(BatchOperation):
    operation = BatchProcessingLog.Operation.ORDERS
    key_field = "reference"
    fills = (Order,)  # each item's foreign key looks up the order written before it

    def prepare(self, raw: Any) -> r.OrderRow:
        return r.parse_order(raw)

    def weight(self, raw: Any) -> int:
        return r.order_lines(raw)  # chunk_size bounds the lines a chunk writes

    def key(self, item: r.OrderRow) -> str:
        return item.reference

    def committed(self, rows: list[Prepared]) -> None:
        # Stock changed: drop the cards of every product ordered.
        cache.invalidate_products(line.product_id for row in rows for line in row.item.items)


def order_rejection(
    index: int,
    order: r.OrderRow,
    known: set[str],
    users: set[int],
    catalogue: dict[int, tuple[Decimal, int, bool]],
    remaining: dict[int, int],
) -> RowError | None:
    """Why an order cannot be applied, or None. Shared so both variants decide alike."""
    if order.reference in known:
        message = r.DUPLICATE_ORDER.format(reference=order.reference)
        return RowError(index, "reference", message, "duplicate")
    if order.user_id not in users:
        return RowError(index, "user_id", UNKNOWN_USER.format(id=order.user_id), "not_found")
    for position, line in enumerate(order.items):
        field = f"items[{position}].product_id"
        if line.product_id not in catalogue:
            return RowError(index, field, UNKNOWN_PRODUCT.format(id=line.product_id), "not_found")
        if not catalogue[line.product_id][2]:
            return RowError(index, field, r.INACTIVE_PRODUCT.format(id=line.product_id), "inactive")
    total = sum(
        (catalogue[line.product_id][0] * line.quantity for line in order.items), Decimal("0.00")
    )
    if total >= r.MAX_ORDER_TOTAL:
        message = r.TOTAL_TOO_LARGE.format(total=total, limit=r.MAX_ORDER_TOTAL)
        return RowError(index, "items", message, "invalid")
    for product_id, quantity in order.quantities().items():
        if quantity > (left := remaining[product_id]):
            message = r.INSUFFICIENT_STOCK.format(id=product_id, requested=quantity, available=left)
            return RowError(index, "items", message, "insufficient_stock")
    return None


class NaiveOrders(NaiveOperationMixin, OrdersOperation):
    variant = BatchProcessingLog.Variant.NAIVE

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        outcome = ChunkOutcome()
        for row in rows:
            order = row.item
            exists = Order.objects.using(self.using).filter(reference=order.reference).exists()
            user = self.user_or_none(order.user_id)
            found = [self.product_or_none(line.product_id) for line in order.items]
            products = {product.pk: product for product in found if product is not None}
            catalogue = {pk: (p.price, p.stock_quantity, p.is_active) for pk, p in products.items()}
            remaining = {pk: p.stock_quantity for pk, p in products.items()}
            known = {order.reference} if exists else set()
            users = {user.pk} if user else set()
            error = order_rejection(row.index, order, known, users, catalogue, remaining)
            if error is not None:
                outcome.errors.append(error)
                continue
            with transaction.atomic(using=self.using):
                total = sum(
                    (products[line.product_id].price * line.quantity for line in order.items),
                    Decimal("0.00"),
                )
                created = Order.objects.using(self.using).create(
                    reference=order.reference, user=user, total=total
                )
                for line in order.items:
                    product = products[line.product_id]
                    OrderItem.objects.using(self.using).create(
                        order=created,
                        product=product,
                        quantity=line.quantity,
                        unit_price=product.price,
                    )
                    product.stock_quantity -= line.quantity
                    product.save(using=self.using, update_fields=["stock_quantity"])
            outcome.written += 1
            outcome.created += 1
        return outcome


class OptimizedOrders(OrdersOperation):
    """Chunk: read products, references and users (no lock); INSERT the orders (sorted by
    reference) and their lines; one guarded UPDATE of stock last, locking the products in
    primary-key order and refusing to go below zero.

    Overtaken (a concurrent run committed some references first, or a checkout took
    the stock), the chunk raises ``ChunkConflict`` and the engine retries it; after a
    stock conflict the run locks the products before deciding. Only stock does: locking
    before the INSERT, beside a run holding the same references, could deadlock.
    """

    variant = BatchProcessingLog.Variant.OPTIMIZED
    lock_first = False  # set on the instance by a stock conflict

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        product_ids = {line.product_id for row in rows for line in row.item.items}
        references = {row.item.reference for row in rows}
        user_ids = {row.item.user_id for row in rows}
        if fast_paths(self.using) and not self.lock_first:
            # Products, references and users in one statement, nothing locked.
            found, taken_refs, found_users = read_by_key(
                self.using,
                [
                    (Product, "id", product_ids, ["id", "price", "stock_quantity", "is_active"]),
                    (Order, "reference", references, ["reference"]),
                    (get_user_model(), "id", user_ids, ["id"]),
                ],
            )
            known = {reference for (reference,) in taken_refs}
            users = {pk for (pk,) in found_users}
        else:
            # After a stock conflict: lock in primary-key order, then decide.
            products = (
                locked_products(self.using, pk__in=product_ids)
                if self.lock_first
                else strict(Product.objects.using(self.using).filter(pk__in=product_ids))
            )
            found = list(products.values_list("pk", "price", "stock_quantity", "is_active"))
            taken_orders = Order.objects.using(self.using).filter(reference__in=references)
            known = set(strict(taken_orders).values_list("reference", flat=True))
            users = existing_pks(get_user_model(), self.using, user_ids)
        catalogue = {pk: (price, stock, active) for pk, price, stock, active in found}
        remaining = {pk: stock for pk, (_, stock, _) in catalogue.items()}
        outcome = ChunkOutcome()
        # (reference, user, total) and (reference, product, quantity, unit price)
        accepted: list[tuple[str, int, Decimal]] = []
        lines: list[tuple[str, int, int, Decimal]] = []
        stock_change: Counter[int] = Counter()
        for row in rows:
            order = row.item
            error = order_rejection(row.index, order, known, users, catalogue, remaining)
            if error is not None:
                outcome.errors.append(error)
                continue
            for product_id, quantity in order.quantities().items():
                remaining[product_id] -= quantity
                stock_change[product_id] -= quantity
            total = Decimal("0.00")
            for line in order.items:
                price = catalogue[line.product_id][0]
                total += price * line.quantity
                lines.append((order.reference, line.product_id, line.quantity, price))
            accepted.append((order.reference, order.user_id, total))
        if not accepted:
            return outcome
        try:
            # Sorted: concurrent runs meet in the references' unique index in one order.
            self.insert(sorted(accepted), lines)
        except IntegrityError as exc:
            if not is_unique_violation(exc):
                raise  # not a race: the engine narrows it to its order
            raise ChunkConflict(TAKEN.format(error=exc)) from exc
        try:
            add_to_each(self.using, "stock_quantity", stock_change, guard=True)
        except IntegrityError as exc:
            if self.lock_first:
                raise  # decided under the lock: not a race
            self.lock_first = True
            raise ChunkConflict(OVERTAKEN.format(error=exc)) from exc
        outcome.written = outcome.created = len(accepted)
        return outcome

    def insert(
        self, orders: list[tuple[str, int, Decimal]], lines: list[tuple[str, int, int, Decimal]]
    ) -> None:
        """The orders and their lines: one statement on PostgreSQL; elsewhere ``bulk_create``
        of the orders (their ids come back) and one ``executemany`` of the lines."""
        if fast_paths(self.using):
            insert_with_children(
                Order,
                ["reference", "user", "total"],
                orders,
                key="reference",
                child=OrderItem,
                link="order",
                child_fields=["product", "quantity", "unit_price"],
                child_rows=lines,
                constants={"status": Order.Status.CONFIRMED, "created_at": timezone.now()},
                using=self.using,
            )
            return
        created = Order.objects.using(self.using).bulk_create(
            [Order(reference=ref, user_id=user, total=total) for ref, user, total in orders]
        )
        order_ids = {order.reference: order.pk for order in created}
        insert_rows(
            OrderItem,
            ["order", "product", "quantity", "unit_price"],
            [(order_ids[ref], product, n, price) for ref, product, n, price in lines],
            using=self.using,
        )
