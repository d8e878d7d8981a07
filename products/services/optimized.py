"""The optimized bulk service: a constant number of queries per chunk (docs/architecture.md).

Reads are one query per table (``FETCH_RAISE``: a stray lazy load fails), writes
one bulk statement per table; counters and stock change in the database, products
locked last, in primary-key order. Each write has a PostgreSQL fast path and a
portable one with the same outcome (``BULK_PG_FAST_PATHS`` off forces it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

from django.contrib.auth import get_user_model
from django.db import IntegrityError, connections, models
from django.db.models import Case, F, Value, When
from django.utils import timezone

from batching.engine import ChunkOutcome, Prepared, RowError, RunContext
from batching.models import BatchProcessingLog
from batching.portable import insert_rows
from batching.postgres import add_to, copy_rows, existing_ids, fast_paths, update, upsert
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
SCORE_UPDATE_FIELDS = ["score", "updated_at", "last_run", "last_run_row"]
SCORE_KEY_OF = attrgetter("item.key")  # of a Prepared score row; also its lock order
SKU_OF = attrgetter("item.sku")  # of a Prepared product row
VIEW_FIELDS = ["user", "product", "session_id", "interaction_type", "created_at"]
VIEW_VALUES = attrgetter("user_id", "product_id", "session_id", "interaction_type", "created_at")
PRODUCT_COLUMNS = ["sku", "name", "category", "price", "stock_quantity", "is_active"]
# What a catalogue row sets, on insert and on update, and the run's mark.
IMPORT_UPDATE_FIELDS = [*PRODUCT_COLUMNS[1:], "updated_at", "last_import", "last_import_row"]


def strict(queryset: models.QuerySet) -> models.QuerySet:
    """No default ordering, and fail on any lazy load instead of a query per row."""
    return queryset.order_by().fetch_mode(models.FETCH_RAISE)


def existing_pks(model: type[models.Model], using: str, ids: Iterable[int]) -> set[int]:
    queryset = model._default_manager.using(using).filter(pk__in=set(ids))
    return set(strict(queryset).values_list("pk", flat=True))


def referenced(using: str, rows: list[Prepared]) -> tuple[list[Prepared], list[RowError]]:
    """The rows (views, scores) whose user and product exist, and the others' errors.

    One query on the fast path (``existing_ids``), else one per table.
    """
    user_ids = (row.item.user_id for row in rows)
    product_ids = (row.item.product_id for row in rows)
    if fast_paths(using):
        users, products = existing_ids(
            using, [(get_user_model(), user_ids), (Product, product_ids)]
        )
    else:
        users = existing_pks(get_user_model(), using, user_ids)
        products = existing_pks(Product, using, product_ids)
    valid: list[Prepared] = []
    errors: list[RowError] = []
    for row in rows:
        if error := reference_error(row.index, row.item, users, products):
            errors.append(error)
        else:
            valid.append(row)
    return valid, errors


def repeated_skus(using: str, rows: list[Prepared], run: RunContext) -> list[RowError]:
    """The rows whose sku an earlier row of ``run`` wrote (the product's ``last_import`` mark)."""
    skus = [row.item.sku for row in rows]
    products = Product.objects.using(using).filter(sku__in=skus, last_import_id=run.log_id)
    return run.repeats_in(
        rows, SKU_OF, dict(strict(products).values_list("sku", "last_import_row"))
    )


def locked_products(using: str, **lookup) -> models.QuerySet:
    """Products locked for the chunk, in primary-key order (one global lock order)."""
    return (
        strict(Product.objects.using(using).filter(**lookup))
        .select_for_update(no_key=True)
        .order_by("pk")
    )


def add_to_each(using: str, field: str, amounts: dict[int, int], *, guard: bool = False) -> None:
    """``field = field + amount`` for many products in one UPDATE.

    On PostgreSQL the amounts travel as two arrays and ``guard`` refuses to take
    any row below zero; elsewhere one ``Case``, guarded by the CHECK constraint.
    """
    if not amounts:
        return
    if fast_paths(using):
        add_to(Product, field, amounts, using=using, guard=guard)
        return
    if connections[using].features.has_select_for_update:
        # PostgreSQL's portable path locks in primary-key order first, as the
        # fast path's statement does; SQLite locks the whole file.
        list(locked_products(using, pk__in=amounts).values_list("pk", flat=True))
    delta = Case(
        *(When(pk=pk, then=Value(amount)) for pk, amount in amounts.items()),
        default=Value(0),
        output_field=models.BigIntegerField(),
    )
    Product.objects.using(using).filter(pk__in=amounts).update(**{field: F(field) + delta})


class OptimizedViews(ViewsOperation):
    """Chunk: read users and products; COPY (or INSERT) the views; UPDATE view_count last,
    locking the products viewed in primary-key order."""

    variant = VARIANT

    def check(self, rows: list[Prepared]) -> ChunkOutcome:
        """The reads of ``write`` (users and products), nothing written."""
        valid, errors = referenced(self.using, rows)
        return ChunkOutcome(written=len(valid), created=len(valid), errors=errors)

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        valid, errors = referenced(self.using, rows)
        views = [row.item for row in valid]
        counts = Counter(view.product_id for view in views)
        if not fast_paths(self.using):
            insert_rows(ProductView, VIEW_FIELDS, list(map(VIEW_VALUES, views)), using=self.using)
            add_to_each(self.using, "view_count", counts)
        elif views:
            copy_rows(ProductView, VIEW_FIELDS, map(VIEW_VALUES, views), using=self.using)
            if len(add_to(Product, "view_count", counts, using=self.using)) != len(counts):
                raise IntegrityError(r.UNKNOWN_REFERENCE)  # deleted meanwhile: re-run in halves
        return ChunkOutcome(written=len(views), created=len(views), errors=errors)


class OptimizedScores(ScoresOperation):
    """Chunk: read users and products; upsert the scores, sorted by key (no product locked)."""

    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        valid, errors = referenced(self.using, rows)
        if not valid:
            return ChunkOutcome(errors=errors)
        valid.sort(key=SCORE_KEY_OF)  # concurrent upserts take their locks in one order
        now = timezone.now()
        if fast_paths(self.using):
            created, updated = upsert(
                RecommendationScore,
                [*SCORE_KEY, "score", "last_run_row"],
                [(*row.item.key, row.item.score, row.index) for row in valid],
                unique_fields=SCORE_KEY,
                update_fields=SCORE_UPDATE_FIELDS,
                constants={"updated_at": now, "last_run": run.log_id},
                only_if_distinct=["last_run"],
                using=self.using,
            )
            # Rows left out: keys an earlier chunk of this run wrote (one more query).
            if created + updated < len(valid):
                errors.extend(self.repeats(valid, run))
            written = created + updated
        else:
            existing = self.marks(valid)
            fresh = run.not_written_yet(valid, SCORE_KEY_OF, existing, errors)
            RecommendationScore.objects.using(self.using).bulk_create(
                [
                    RecommendationScore(
                        user_id=row.item.user_id,
                        product_id=row.item.product_id,
                        algorithm=row.item.algorithm,
                        score=row.item.score,
                        updated_at=now,
                        last_run_id=run.log_id,
                        last_run_row=row.index,
                    )
                    for row in fresh
                ],
                update_conflicts=True,
                unique_fields=SCORE_KEY,
                update_fields=SCORE_UPDATE_FIELDS,
            )
            written = len(fresh)
            updated = sum(1 for row in fresh if row.item.key in existing)
            created = written - updated
        return ChunkOutcome(written=written, created=created, updated=updated, errors=errors)

    def marks(
        self, rows: list[Prepared], **only
    ) -> dict[tuple[int, int, str], tuple[int | None, int]]:
        """The rows' existing scores (filtered by their users, products and algorithms, and by
        ``only``): key -> (the run that last wrote it, its row there)."""
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


class OptimizedProducts(ProductsOperation):
    """Chunk: read the categories (create the missing ones); upsert the products in sku
    order, which locks those it updates."""

    variant = VARIANT

    def category_ids(
        self, rows: list[Prepared], run: RunContext
    ) -> tuple[dict[str, int], list[RowError]]:
        """Ids of the rows' categories, creating the missing ones, and the rows repeated.

        One query when every category exists; else three more: skus this run
        already wrote (such a row creates nothing), the ``ignore_conflicts`` INSERT
        (a concurrent import may create them too), and the new ids.
        """
        categories = Category.objects.using(self.using)
        names = {row.item.category for row in rows}
        ids = dict(strict(categories.filter(name__in=names)).values_list("name", "pk"))
        new = [row for row in rows if row.item.category not in ids]
        if not new:
            return ids, []
        repeated = repeated_skus(self.using, new, run)
        skipped = {error.index for error in repeated}
        if missing := {row.item.category for row in new if row.index not in skipped}:
            categories.bulk_create(
                [Category(name=name) for name in sorted(missing)], ignore_conflicts=True
            )
            ids.update(strict(categories.filter(name__in=missing)).values_list("name", "pk"))
        return ids, repeated

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        rows = sorted(rows, key=SKU_OF)  # concurrent imports take their locks in one order
        category_ids, errors = self.category_ids(rows, run)
        if errors:
            skipped = {error.index for error in errors}
            rows = [row for row in rows if row.index not in skipped]
        now = timezone.now()
        columns = [*PRODUCT_COLUMNS, "last_import_row"]
        values = []
        for row in rows:  # PRODUCT_COLUMNS, then the row's mark
            item = row.item
            category = category_ids[item.category]
            values.append(
                (
                    item.sku,
                    item.name,
                    category,
                    item.price,
                    item.stock_quantity,
                    item.is_active,
                    row.index,
                )
            )
        options: dict[str, Any] = {
            "unique_fields": ["sku"],
            "update_fields": IMPORT_UPDATE_FIELDS,
            "constants": {
                "created_at": now,
                "updated_at": now,
                "view_count": 0,
                "last_import": run.log_id,
            },
            "using": self.using,
        }
        if fast_paths(self.using):
            # One upsert that leaves alone the skus this run already wrote.
            created, updated = upsert(
                Product, columns, values, only_if_distinct=["last_import"], **options
            )
            if created + updated < len(rows):  # one more query names the repeats
                errors += repeated_skus(self.using, rows, run)
            written = created + updated
        else:
            existing = self.existing(rows)
            fresh = {row.index for row in run.not_written_yet(rows, SKU_OF, existing, errors)}
            values = [value for value in values if value[-1] in fresh]
            insert_rows(Product, columns, values, **options)
            written = len(values)
            updated = sum(1 for value in values if value[0] in existing)
            created = written - updated
        return ChunkOutcome(written=written, created=created, updated=updated, errors=errors)

    def existing(self, rows: list[Prepared]) -> dict[str, tuple[int | None, int]]:
        """The rows' skus already in the catalogue: sku -> (the run that last wrote it, its row)."""
        products = Product.objects.using(self.using).filter(sku__in=[row.item.sku for row in rows])
        marks = strict(products).values_list("sku", "last_import_id", "last_import_row")
        return {sku: (log_id, first) for sku, log_id, first in marks}

    def check(self, rows: list[Prepared]) -> ChunkOutcome:
        """The read of the portable ``write`` (one query); categories are not looked up."""
        existing = self.existing(rows)
        updated = sum(1 for row in rows if row.item.sku in existing)
        return ChunkOutcome(written=len(rows), created=len(rows) - updated, updated=updated)


class OptimizedProductUpdates(ProductUpdatesOperation):
    """Chunk: one statement locks the products by sku in primary-key order and updates them.

    A product this run already updated (its mark is this run's) is left alone;
    one more query, only then, tells those rows from unknown skus.
    """

    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        if fast_paths(self.using):
            return self.write_fast(rows, run)
        # Portable: every field is written, so those a row leaves alone are read (locked).
        products = locked_products(self.using, sku__in={row.item.sku for row in rows})
        read = ("sku", "pk", "price", "stock_quantity", "last_import_id", "last_import_row")
        found = {sku: values for sku, *values in products.values_list(*read)}
        outcome = ChunkOutcome()
        now = timezone.now()
        updated: list[Product] = []
        for row in rows:
            item = row.item
            if item.sku not in found:
                outcome.errors.append(unknown_sku(row))
                continue
            pk, price, stock, log_id, row_there = found[item.sku]
            if (first := run.first_row_in_run(log_id, row_there)) is not None:
                outcome.errors.append(run.repeated(row.index, first))
                continue
            updated.append(
                Product(
                    pk=pk,
                    price=price if item.price is None else item.price,
                    stock_quantity=stock if item.stock_quantity is None else item.stock_quantity,
                    updated_at=now,
                    last_import_id=run.log_id,
                    last_import_row=row.index,
                )
            )
        if updated:
            fields = ["price", "stock_quantity", "updated_at", "last_import", "last_import_row"]
            Product.objects.using(self.using).bulk_update(updated, fields)
        outcome.written = outcome.updated = len(updated)
        return outcome

    def write_fast(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
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
