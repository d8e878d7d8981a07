"""The naive bulk service: the N+1 baseline, kept honest, on the optimized one's engine.

Each row reads what it references with its own query, writes with ``create()``
or ``save()``, and read-modify-writes counters and stock: its lost updates under
concurrency are deliberate (docs/architecture.md, "Why the naive service loses updates").
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from batching.engine import ChunkOutcome, Prepared, RowError, RunContext
from batching.models import BatchProcessingLog
from products.models import Category, Product, ProductView, RecommendationScore
from products.services.base import (
    BulkOperationsService,
    ProductsOperation,
    ProductUpdatesOperation,
    ScoresOperation,
    ViewsOperation,
    reference_error,
    unknown_sku,
)

VARIANT = BatchProcessingLog.Variant.NAIVE


class NaiveOperationMixin:
    using: str

    def user_or_none(self, user_id: int):
        return get_user_model().objects.using(self.using).filter(pk=user_id).first()

    def product_or_none(self, product_id: int) -> Product | None:
        return Product.objects.using(self.using).filter(pk=product_id).first()

    def referenced(self, row: Prepared) -> tuple[Any, Product | None, RowError | None]:
        """The row's user and product (a query each), and the error if either is unknown."""
        user = self.user_or_none(row.item.user_id)
        product = self.product_or_none(row.item.product_id)
        users = {user.pk} if user else set()
        products = {product.pk} if product else set()
        return user, product, reference_error(row.index, row.item, users, products)


class NaiveViews(NaiveOperationMixin, ViewsOperation):
    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        outcome = ChunkOutcome()
        for row in rows:
            item = row.item
            user, product, error = self.referenced(row)
            if error is not None:
                outcome.errors.append(error)
                continue
            assert product is not None  # reference_error found it
            ProductView.objects.using(self.using).create(
                user=user,
                product=product,
                session_id=item.session_id,
                interaction_type=item.interaction_type,
                created_at=item.created_at,
            )
            product.view_count += 1
            product.save(using=self.using, update_fields=["view_count"])
            outcome.written += 1
            outcome.created += 1
        return outcome


class NaiveScores(NaiveOperationMixin, ScoresOperation):
    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        outcome = ChunkOutcome()
        for row in rows:
            item = row.item
            user, product, error = self.referenced(row)
            if error:
                outcome.errors.append(error)
                continue
            score = (
                RecommendationScore.objects.using(self.using)
                .filter(user=user, product=product, algorithm=item.algorithm)
                .first()
            )
            created = score is None
            if score is None:
                score = RecommendationScore(user=user, product=product, algorithm=item.algorithm)
            elif (first := run.first_row_in_run(score.last_run_id, score.last_run_row)) is not None:
                outcome.errors.append(run.repeated(row.index, first))
                continue
            score.score = item.score
            score.last_run_id = run.log_id
            score.last_run_row = row.index
            score.save(using=self.using)
            outcome.written += 1
            outcome.created += created
            outcome.updated += not created
        return outcome


class NaiveProducts(NaiveOperationMixin, ProductsOperation):
    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        outcome = ChunkOutcome()
        for row in rows:
            item = row.item
            product = Product.objects.using(self.using).filter(sku=item.sku).first()
            created = product is None
            if product is None:
                product = Product(sku=item.sku)
            elif (
                first := run.first_row_in_run(product.last_import_id, product.last_import_row)
            ) is not None:
                outcome.errors.append(run.repeated(row.index, first))
                continue
            category, _ = Category.objects.using(self.using).get_or_create(name=item.category)
            product.last_import_id = run.log_id
            product.last_import_row = row.index
            product.category = category
            for field in ("name", "price", "stock_quantity", "is_active"):
                setattr(product, field, getattr(item, field))
            product.save(using=self.using)
            outcome.written += 1
            outcome.created += created
            outcome.updated += not created
        return outcome


class NaiveProductUpdates(NaiveOperationMixin, ProductUpdatesOperation):
    variant = VARIANT

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        outcome = ChunkOutcome()
        for row in rows:
            item = row.item
            product = Product.objects.using(self.using).filter(sku=item.sku).first()
            if product is None:
                outcome.errors.append(unknown_sku(row))
                continue
            first = run.first_row_in_run(product.last_import_id, product.last_import_row)
            if first is not None:
                outcome.errors.append(run.repeated(row.index, first))
                continue
            product.last_import_id = run.log_id
            product.last_import_row = row.index
            changed = ["updated_at", "last_import", "last_import_row"]
            for field in ("price", "stock_quantity"):
                if (value := getattr(item, field)) is not None:
                    setattr(product, field, value)
                    changed.append(field)
            product.save(using=self.using, update_fields=changed)
            outcome.written += 1
            outcome.updated += 1
        return outcome


class NaiveBulkOperationsService(BulkOperationsService):
    variant = VARIANT
