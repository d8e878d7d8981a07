"""The optimized bulk service: a constant number of queries per chunk.

Each chunk prefetches what it references with one query per related table,
writes with one bulk statement per table, and changes counters and stock in
the database (``view_count = view_count + n``), inside the one transaction the
engine opens for it. Querysets run with ``FETCH_RAISE``: a lazy load that
slips in fails loudly instead of adding a query per row.

Locks late and short. Products are the rows the live shop writes (checkouts
take stock, staff save prices), so a chunk reads what it references without
locking, writes its own rows (views, orders and their lines), and only then
changes the products' counters, stock or prices: in one statement that locks
them in primary-key order (one global order: concurrent runs queue instead of
deadlocking) and adds to the values in the database, so no update is lost.
COMMIT follows at once. On PostgreSQL the foreign keys are checked by each
statement (``batching.postgres.begin_chunk``), not inside COMMIT. Each chunk:

- views: users and products read; COPY (or INSERT) the views; UPDATE
  view_count (locks products);
- orders (``orders.operations``, on the helpers below): products, references
  and users read; INSERT orders and lines; UPDATE stock, guarded (locks
  products);
- scores: users and products read; upsert scores (no product locked);
- catalogue import: categories read (created if missing); upsert products
  (locks the rows it updates, in sku order);
- price update: one UPDATE that locks the products by sku in primary-key
  order and updates them.

Each write has two forms with the same queries and the same outcome. On
PostgreSQL it takes the fast paths of ``batching.postgres``: views arrive by
``COPY``, upserts and updates travel as one array per column through one
statement. Elsewhere (SQLite), or with ``BULK_PG_FAST_PATHS`` off, it takes
the portable path: ``batching.portable``'s ``executemany`` inserts and upserts
(``bulk_create`` where rows come back with their ids), ``bulk_update`` and
``F()`` with ``Case``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, connections, models
from django.db.models import Case, F, Value, When
from django.utils import timezone

from batching.engine import ChunkOutcome, Prepared, RowError, RunContext
from batching.models import BatchProcessingLog
from batching.portable import insert_rows
from batching.postgres import (
    add_to,
    copy_rows,
    existing_ids,
    fast_paths,
    update,
    upsert,
)
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import rows as r
from products.services.base import (
    BulkOperationsService,
    ProductsOperation,
    ProductUpdatesOperation,
    ScoresOperation,
    ViewsOperation,
    reference_error,
    unknown_sku,
)

VARIANT = BatchProcessingLog.Variant.OPTIMIZED
SCORE_KEY = ["user", "product", "algorithm"]
# ScoreRow.key, of a Prepared row.
SCORE_ROW_ORDER = attrgetter("item.user_id", "item.product_id", "item.algorithm")
SCORE_UPDATE_FIELDS = ["score", "updated_at", "last_run", "last_run_row"]
SCORE_KEY_OF = attrgetter("item.key")  # of a Prepared score row
SKU_OF = attrgetter("item.sku")  # of a Prepared product row
VIEW_FIELDS = ["user", "product", "session_id", "interaction_type", "created_at"]
# A ViewRow as its COPY row, in VIEW_FIELDS order.
VIEW_VALUES = attrgetter("user_id", "product_id", "session_id", "interaction_type", "created_at")
# What a catalogue row sets, on insert and on update (in this order).
PRODUCT_UPDATE_FIELDS = ["name", "category", "price", "stock_quantity", "is_active", "updated_at"]
# An import also marks the products it writes with its run and input row.
IMPORT_UPDATE_FIELDS = [*PRODUCT_UPDATE_FIELDS, "last_import", "last_import_row"]
# What the portable price update reads of each product: its key, its id, the
# values a row may leave as they are, and the run's mark.
UPDATE_READ = ["sku", "pk", "price", "stock_quantity", "last_import_id", "last_import_row"]
PRODUCT_COLUMNS = ["sku", "name", "category", "price", "stock_quantity", "is_active"]


def strict(queryset: models.QuerySet) -> models.QuerySet:
    """No default ordering, and fail on any lazy load instead of a query per row."""
    return queryset.order_by().fetch_mode(models.FETCH_RAISE)


def existing_user_ids(using: str, ids: Iterable[int]) -> set[int]:
    User = get_user_model()
    return set(
        strict(User.objects.using(using).filter(pk__in=set(ids))).values_list("pk", flat=True)
    )


def existing_product_ids(using: str, ids: Iterable[int]) -> set[int]:
    return set(
        strict(Product.objects.using(using).filter(pk__in=set(ids))).values_list("pk", flat=True)
    )


def repeated_skus(using: str, rows: list[Prepared], run: RunContext) -> list[RowError]:
    """The rows whose sku an earlier row of ``run`` wrote, with that row.

    Found by the product's ``last_import`` mark, which both the catalogue
    import and the price update leave on each product they write.
    """
    first = dict(
        strict(
            Product.objects.using(using).filter(
                sku__in=[row.item.sku for row in rows], last_import_id=run.log_id
            )
        ).values_list("sku", "last_import_row")
    )
    return run.repeats_in(rows, SKU_OF, first)


def locked_products(using: str, **lookup) -> models.QuerySet:
    """Products locked for the chunk, in primary-key order (one global lock order)."""
    return (
        strict(Product.objects.using(using).filter(**lookup))
        .select_for_update(no_key=True)
        .order_by("pk")
    )


def add_to_each(using: str, field: str, amounts: dict[int, int], *, guard: bool = False) -> None:
    """``field = field + amount`` for many products in one UPDATE.

    On PostgreSQL the amounts travel as two arrays (``batching.postgres.add_to``),
    and ``guard`` refuses to take any row below zero; elsewhere one ``Case``
    with a ``When`` per product, guarded by the table's CHECK constraint.
    """
    if not amounts:
        return
    if fast_paths(using):
        add_to(Product, field, amounts, using=using, guard=guard)
        return
    if connections[using].features.has_select_for_update:
        # Row locks (PostgreSQL's portable path): take them in primary-key
        # order first, as the fast path's statement does, so concurrent runs
        # queue instead of deadlocking. SQLite locks the whole file.
        list(locked_products(using, pk__in=amounts).values_list("pk", flat=True))
    delta = Case(
        *(When(pk=pk, then=Value(amount)) for pk, amount in amounts.items()),
        default=Value(0),
        output_field=models.BigIntegerField(),
    )
    Product.objects.using(using).filter(pk__in=amounts).update(**{field: F(field) + delta})


class OptimizedViews(ViewsOperation):
    variant = VARIANT

    def referenced(self, rows: list[Prepared]) -> tuple[list[r.ViewRow], list[RowError], set[int]]:
        """The views whose user and product exist, the errors of the others, the products found.

        One query on the fast path (``existing_ids``), else one per table.
        """
        if fast_paths(self.using):
            users, products = existing_ids(
                self.using,
                [
                    (get_user_model(), (row.item.user_id for row in rows)),
                    (Product, (row.item.product_id for row in rows)),
                ],
            )
        else:
            users = existing_user_ids(self.using, (row.item.user_id for row in rows))
            products = existing_product_ids(self.using, (row.item.product_id for row in rows))
        views: list[r.ViewRow] = []
        errors: list[RowError] = []
        for row in rows:
            if error := reference_error(row.index, row.item, users, products):
                errors.append(error)
            else:
                views.append(row.item)
        return views, errors, products

    def check(self, rows: list[Prepared]) -> ChunkOutcome:
        """The reads of ``write`` (users and products), nothing written."""
        views, errors, _ = self.referenced(rows)
        return ChunkOutcome(written=len(views), created=len(views), errors=errors)

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        if fast_paths(self.using):
            return self.write_fast(rows)
        views, errors, _ = self.referenced(rows)
        insert_rows(
            ProductView, VIEW_FIELDS, [VIEW_VALUES(view) for view in views], using=self.using
        )
        # Last: the counters, locking the products in primary-key order.
        add_to_each(self.using, "view_count", Counter(view.product_id for view in views))
        return ChunkOutcome(written=len(views), created=len(views), errors=errors)

    def write_fast(self, rows: list[Prepared]) -> ChunkOutcome:
        """PostgreSQL: users and products read; COPY the views; count them (3 queries).

        The counter statement comes last: it locks the products in primary-key
        order just before the chunk commits.
        """
        views, errors, products = self.referenced(rows)
        outcome = ChunkOutcome(errors=errors)
        if views:
            copy_rows(
                ProductView,
                VIEW_FIELDS,
                map(VIEW_VALUES, views),
                using=self.using,
            )
            counted = add_to(
                Product, "view_count", Counter(view.product_id for view in views), using=self.using
            )
            if len(counted) != len(products & {view.product_id for view in views}):
                raise IntegrityError(r.UNKNOWN_REFERENCE)  # deleted meanwhile: re-run in halves
        outcome.written = outcome.created = len(views)
        return outcome


class OptimizedScores(ScoresOperation):
    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        items = [row.item for row in rows]
        if fast_paths(self.using):
            users, products = existing_ids(
                self.using,
                [
                    (get_user_model(), (item.user_id for item in items)),
                    (Product, (item.product_id for item in items)),
                ],
            )
        else:
            users = existing_user_ids(self.using, (item.user_id for item in items))
            products = existing_product_ids(self.using, (item.product_id for item in items))
        outcome = ChunkOutcome()
        valid: list[Prepared] = []
        for row in rows:
            if error := reference_error(row.index, row.item, users, products):
                outcome.errors.append(error)
            else:
                valid.append(row)
        if not valid:
            return outcome
        # Sorted by key: concurrent upserts take their row locks in one order.
        valid.sort(key=SCORE_ROW_ORDER)
        now = timezone.now()
        if fast_paths(self.using):
            created, updated = upsert(
                RecommendationScore,
                ["user", "product", "algorithm", "score", "last_run_row"],
                [
                    (i.user_id, i.product_id, i.algorithm, i.score, row.index)
                    for row in valid
                    for i in [row.item]
                ],
                unique_fields=SCORE_KEY,
                update_fields=SCORE_UPDATE_FIELDS,
                constants={"updated_at": now, "last_run": run.log_id},
                only_if_distinct=["last_run"],
                using=self.using,
            )
            # Rows left out: keys an earlier chunk of this run wrote (one more query).
            if created + updated < len(valid):
                outcome.errors.extend(self.repeats(valid, run))
            return ChunkOutcome(
                written=created + updated, created=created, updated=updated, errors=outcome.errors
            )
        # Existing keys tell created from updated, and which this run wrote.
        existing = self.marks(valid)
        fresh = run.not_written_yet(valid, SCORE_KEY_OF, existing, outcome.errors)
        RecommendationScore.objects.using(self.using).bulk_create(
            [
                RecommendationScore(
                    user_id=item.user_id,
                    product_id=item.product_id,
                    algorithm=item.algorithm,
                    score=item.score,
                    updated_at=now,
                    last_run_id=run.log_id,
                    last_run_row=row.index,
                )
                for row in fresh
                for item in [row.item]
            ],
            update_conflicts=True,
            unique_fields=SCORE_KEY,
            update_fields=SCORE_UPDATE_FIELDS,
        )
        outcome.written = len(fresh)
        outcome.updated = sum(1 for row in fresh if row.item.key in existing)
        outcome.created = outcome.written - outcome.updated
        return outcome

    def marks(
        self, rows: list[Prepared], **only
    ) -> dict[tuple[int, int, str], tuple[int | None, int]]:
        """The rows' existing scores: key -> (the run that last wrote it, its row there).

        Filtered by the rows' users, products and algorithms (a superset of
        their keys) and by ``only``.
        """
        return {
            (user_id, product_id, algorithm): (log_id, first)
            for user_id, product_id, algorithm, log_id, first in strict(
                RecommendationScore.objects.using(self.using).filter(
                    user_id__in={row.item.user_id for row in rows},
                    product_id__in={row.item.product_id for row in rows},
                    algorithm__in={row.item.algorithm for row in rows},
                    **only,
                )
            ).values_list("user_id", "product_id", "algorithm", "last_run_id", "last_run_row")
        }

    def repeats(self, rows: list[Prepared], run: RunContext) -> list[RowError]:
        """The rows whose key an earlier row of ``run`` wrote, with that row."""
        marks = self.marks(rows, last_run_id=run.log_id)
        return run.repeats_in(rows, SCORE_KEY_OF, {key: row for key, (_, row) in marks.items()})


def product_values(rows: list[Prepared], category_ids: dict[str, int]) -> list[tuple]:
    """The rows in ``PRODUCT_COLUMNS`` order, then each row's input index (its mark)."""
    return [
        (
            row.item.sku,
            row.item.name,
            category_ids[row.item.category],
            row.item.price,
            row.item.stock_quantity,
            row.item.is_active,
            row.index,
        )
        for row in rows
    ]


class OptimizedProducts(ProductsOperation):
    variant = VARIANT

    def category_ids(
        self, rows: list[Prepared], run: RunContext
    ) -> tuple[dict[str, int], list[RowError]]:
        """Ids of the rows' categories, creating the missing ones, and the rows repeated.

        One query when every category exists. Otherwise three more: the rows
        that need a new category are first checked for skus this run already
        wrote (such a row must not create anything), then the categories are
        created and their ids read back.
        """
        categories = Category.objects.using(self.using)
        ids = dict(
            strict(categories.filter(name__in={row.item.category for row in rows})).values_list(
                "name", "pk"
            )
        )
        new = [row for row in rows if row.item.category not in ids]
        if not new:
            return ids, []
        repeated = repeated_skus(self.using, new, run)
        skipped = {error.index for error in repeated}
        missing = {row.item.category for row in new if row.index not in skipped}
        if missing:
            # ignore_conflicts: a concurrent import may create the same names;
            # the ids are read back rather than trusted from bulk_create.
            categories.bulk_create(
                [Category(name=name) for name in sorted(missing)], ignore_conflicts=True
            )
            ids.update(strict(categories.filter(name__in=missing)).values_list("name", "pk"))
        return ids, repeated

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        # Sorted by sku: concurrent imports take their row locks in one order.
        rows = sorted(rows, key=lambda row: row.item.sku)
        category_ids, repeated = self.category_ids(rows, run)
        if repeated:
            skipped = {error.index for error in repeated}
            rows = [row for row in rows if row.index not in skipped]
        now = timezone.now()
        if fast_paths(self.using):
            outcome = self.write_fast(rows, category_ids, now, run)
            outcome.errors[:0] = repeated
            return outcome
        # Existing skus tell created from updated, and which this run wrote.
        existing = self.existing(rows)
        outcome = ChunkOutcome(errors=repeated)
        fresh = run.not_written_yet(rows, SKU_OF, existing, outcome.errors)
        insert_rows(
            Product,
            [*PRODUCT_COLUMNS, "last_import_row"],
            product_values(fresh, category_ids),
            constants=self.import_constants(now, run),
            unique_fields=["sku"],
            update_fields=IMPORT_UPDATE_FIELDS,
            using=self.using,
        )
        outcome.written = len(fresh)
        outcome.updated = sum(1 for row in fresh if row.item.sku in existing)
        outcome.created = outcome.written - outcome.updated
        return outcome

    def existing(self, rows: list[Prepared]) -> dict[str, tuple[int | None, int]]:
        """The rows' skus already in the catalogue: sku -> (the run that last wrote it, its row)."""
        return {
            sku: (log_id, first)
            for sku, log_id, first in strict(
                Product.objects.using(self.using).filter(sku__in=[row.item.sku for row in rows])
            ).values_list("sku", "last_import_id", "last_import_row")
        }

    def check(self, rows: list[Prepared]) -> ChunkOutcome:
        """The read of the portable ``write``: an existing sku is updated, a new one created.

        One query; the categories a run would create are not looked up.
        """
        existing = self.existing(rows)
        updated = sum(1 for row in rows if row.item.sku in existing)
        return ChunkOutcome(written=len(rows), created=len(rows) - updated, updated=updated)

    def import_constants(self, now: datetime, run: RunContext) -> dict[str, Any]:
        """What every imported product gets: the time, a zero count (new ones), the run's mark."""
        return {"created_at": now, "updated_at": now, "view_count": 0, "last_import": run.log_id}

    def write_fast(
        self, rows: list[Prepared], category_ids: dict[str, int], now, run: RunContext
    ) -> ChunkOutcome:
        """PostgreSQL: one upsert that leaves alone the skus this run already wrote."""
        created, updated = upsert(
            Product,
            [*PRODUCT_COLUMNS, "last_import_row"],
            product_values(rows, category_ids),
            unique_fields=["sku"],
            update_fields=IMPORT_UPDATE_FIELDS,
            constants=self.import_constants(now, run),
            only_if_distinct=["last_import"],
            using=self.using,
        )
        # Rows left out: skus an earlier chunk of this run wrote (one more query).
        errors = repeated_skus(self.using, rows, run) if created + updated < len(rows) else []
        return ChunkOutcome(
            written=created + updated, created=created, updated=updated, errors=errors
        )


class OptimizedProductUpdates(ProductUpdatesOperation):
    """Prices and stock by sku: the products are locked in primary-key order, then updated."""

    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        if fast_paths(self.using):
            return self.write_fast(rows, run)
        # The portable path writes every field of every row, so it reads the
        # current values of the fields a row leaves as they are.
        found = {
            sku: values
            for sku, *values in locked_products(
                self.using, sku__in={row.item.sku for row in rows}
            ).values_list(*UPDATE_READ)
        }
        outcome = ChunkOutcome()
        valid: list[tuple[int, Decimal, int, Prepared]] = []
        for row in rows:
            if row.item.sku not in found:
                outcome.errors.append(unknown_sku(row))
                continue
            pk, price, stock, log_id, row_there = found[row.item.sku]
            if (first := run.first_row_in_run(log_id, row_there)) is not None:
                outcome.errors.append(run.repeated(row.index, first))
            else:
                valid.append((pk, price, stock, row))
        if not valid:
            return outcome
        now = timezone.now()
        Product.objects.using(self.using).bulk_update(
            [
                Product(
                    pk=pk,
                    price=price if item.price is None else item.price,
                    stock_quantity=stock if item.stock_quantity is None else item.stock_quantity,
                    updated_at=now,
                    last_import_id=run.log_id,
                    last_import_row=row.index,
                )
                for pk, price, stock, row in valid
                for item in [row.item]
            ],
            ["price", "stock_quantity", "updated_at", "last_import", "last_import_row"],
        )
        outcome.written = outcome.updated = len(valid)
        return outcome

    def write_fast(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        """PostgreSQL: one statement locks the products by sku, updates them, lists the rest.

        A product this run already updated (its mark is this run's) is left
        alone; one more query, only then, tells those rows from unknown skus.
        """
        left = update(
            Product,
            "sku",
            ["price", "stock_quantity", "last_import_row"],
            [(row.item.sku, row.item.price, row.item.stock_quantity, row.index) for row in rows],
            constants={"updated_at": timezone.now(), "last_import": run.log_id},
            only_if_distinct=["last_import"],
            using=self.using,
        )
        errors: list[RowError] = []
        if left:
            rest = [row for row in rows if row.item.sku in left]
            errors = repeated_skus(self.using, rest, run)
            repeated = {error.index for error in errors}
            errors += [unknown_sku(row) for row in rest if row.index not in repeated]
            errors.sort(key=attrgetter("index"))
        written = len(rows) - len(errors)
        return ChunkOutcome(written=written, updated=written, errors=errors)


class OptimizedBulkOperationsService(BulkOperationsService):
    """The optimized service: a constant number of queries per chunk (see the module)."""

    variant = VARIANT
