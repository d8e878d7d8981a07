"""The engine's run lifecycle: resuming, interruption, cumulative figures."""

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from batching.engine import ResumeError, is_unique_violation, worker_name
from batching.models import BatchProcessingLog
from products.models import Product
from products.services.optimized import OptimizedProducts
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db


def catalogue(count: int) -> list[dict]:
    return [
        {"sku": f"E-{i}", "name": "n", "category": "c", "price": "1.00", "stock_quantity": 1}
        for i in range(count)
    ]


def log_of(status: str, **fields) -> BatchProcessingLog:
    return BatchProcessingLog.objects.create(
        operation=BatchProcessingLog.Operation.PRODUCTS,
        variant=BatchProcessingLog.Variant.OPTIMIZED,
        status=status,
        chunk_size=2,
        started_at=timezone.now(),
        database_vendor="x",
        worker=worker_name(),
        **fields,
    )


def test_a_running_run_cannot_be_resumed(optimized):
    running = log_of(BatchProcessingLog.Status.RUNNING)
    with pytest.raises(ResumeError, match="still running"):
        optimized.import_products(catalogue(3), resume=running.pk)


@pytest.mark.parametrize("status", ["completed", "partial"])
def test_a_finished_run_cannot_be_resumed(optimized, status):
    with pytest.raises(ResumeError, match="already finished"):
        optimized.import_products(catalogue(3), resume=log_of(status).pk)


def test_another_operations_run_cannot_be_resumed(naive):
    interrupted = log_of(BatchProcessingLog.Status.INTERRUPTED)
    with pytest.raises(ResumeError, match="not naive products"):
        naive.import_products(catalogue(3), resume=interrupted.pk)


def test_resume_continues_after_the_checkpoint_and_adds_up_the_figures(optimized):
    # An earlier attempt committed 2 rows (one skipped) in 7 queries and 1.5 s.
    earlier = log_of(
        BatchProcessingLog.Status.INTERRUPTED,
        checkpoint_position=3,
        rows_written=2,
        rows_created=2,
        rows_skipped=1,
        query_count=7,
        duration_seconds=1.5,
        chunks_committed=2,
    )
    rows = catalogue(6)
    result = optimized.import_products(rows, resume=earlier.pk)
    earlier.refresh_from_db()
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["E-3", "E-4", "E-5"]
    assert (earlier.status, earlier.resume_count) == ("partial", 1)
    assert (earlier.rows_read, earlier.rows_written, earlier.rows_created) == (6, 5, 5)
    assert earlier.rows_skipped == result.skipped == 1
    assert earlier.query_count == 7 + result.query_count
    assert earlier.duration_seconds > 1.5
    assert earlier.chunks_committed == 4


def test_keyboard_interrupt_marks_the_run_interrupted(optimized, monkeypatch):
    def interrupted(self, rows, run):
        raise KeyboardInterrupt

    monkeypatch.setattr(OptimizedProducts, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimized.import_products(catalogue(2))
    log = BatchProcessingLog.objects.get()
    assert log.status == BatchProcessingLog.Status.INTERRUPTED
    assert "KeyboardInterrupt" in log.error_summary


def test_a_unique_violation_is_told_from_other_refusals_on_every_database():
    """Orders retry a chunk only for a reference another run took (a unique index)."""
    product = ProductFactory(stock_quantity=0)
    duplicate_sku = Product(sku=product.sku, name="Again", category=product.category, price=1)
    below_zero = Product.objects.filter(pk=product.pk)

    with pytest.raises(IntegrityError) as unique, transaction.atomic():
        duplicate_sku.save()
    with pytest.raises(IntegrityError) as check, transaction.atomic():
        below_zero.update(stock_quantity=-1)

    assert is_unique_violation(unique.value)
    assert not is_unique_violation(check.value)
