from django.db import models
from django.db.models.functions import NullIf


class BatchProcessingLog(models.Model):
    """One row per bulk run: what ran, how it went and what it cost.

    Each chunk's transaction writes its checkpoint here, and a run that commits
    nothing still leaves its row with how it ended (``batching.engine``).
    """

    class Operation(models.TextChoices):
        PRODUCT_VIEWS = "product_views", "Product views"
        RECOMMENDATION_SCORES = "recommendation_scores", "Recommendation scores"
        ORDERS = "orders", "Orders"
        PRODUCTS = "products", "Product import"
        PRODUCT_UPDATES = "product_updates", "Price and stock update"

    class Variant(models.TextChoices):
        NAIVE = "naive", "Naive (N+1)"
        OPTIMIZED = "optimized", "Optimized"

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        PARTIAL = "partial", "Partial (rows skipped)"
        FAILED = "failed", "Failed"
        INTERRUPTED = "interrupted", "Interrupted"
        # Stopped at a chunk boundary because ``stop_requested`` was set.
        CANCELLED = "cancelled", "Cancelled"

    operation = models.CharField(max_length=32, choices=Operation)
    variant = models.CharField(max_length=16, choices=Variant)
    status = models.CharField(max_length=16, choices=Status, default=Status.RUNNING)
    chunk_size = models.PositiveIntegerField()

    rows_written = models.PositiveBigIntegerField(default=0)
    rows_created = models.PositiveBigIntegerField(default=0)
    rows_updated = models.PositiveBigIntegerField(default=0)
    rows_skipped = models.PositiveBigIntegerField(default=0)
    chunks_committed = models.PositiveIntegerField(default=0)
    chunks_rolled_back = models.PositiveIntegerField(default=0)
    # Transient failures (deadlock, serialization, lost connection) retried.
    chunks_retried = models.PositiveIntegerField(default=0)
    # Re-runs of the halves of a rolled-back chunk while isolating bad rows.
    chunks_rerun = models.PositiveIntegerField(default=0)
    query_count = models.PositiveBigIntegerField(default=0)
    # Side effects of committed chunks (cache invalidation) that failed: logged
    # and counted, never allowed to fail the run (the chunks stay committed).
    after_commit_failures = models.PositiveIntegerField(default=0)

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    database_vendor = models.CharField(max_length=32)

    error_summary = models.TextField(blank=True)
    # The first row errors, capped by settings.BULK_LOG_MAX_ROW_ERRORS:
    # [{"index": 12, "field": "product_id", "message": "..."}].
    row_errors = models.JSONField(default=list, blank=True)

    # The input position after the last committed chunk, written in its transaction.
    checkpoint_position = models.PositiveBigIntegerField(default=0)
    # How many times the run was resumed after an interruption.
    resume_count = models.PositiveIntegerField(default=0)
    # Who runs it, and when it was last seen alive (``batching.liveness``).
    worker = models.CharField(max_length=128, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Set by whoever wants the run to stop (a job's cancel); docs/operations-history.md.
    stop_requested = models.BooleanField(default=False)

    class Meta:
        ordering = ["-started_at", "-id"]
        indexes = [
            # Admin, dashboard and API: runs of one operation, newest first.
            models.Index(fields=["operation", "-started_at"], name="batchlog_op_started_idx"),
            # Admin status filter and "running/failed runs" checks, newest first.
            models.Index(fields=["status", "-started_at"], name="batchlog_status_started_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(chunk_size__gte=1), name="batchlog_chunk_size_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.operation} ({self.variant}) {self.status}"

    @property
    def rows_read(self) -> int:
        """Input rows behind the checkpoint: read, and either written or skipped."""
        return self.checkpoint_position

    @staticmethod
    def throughput() -> models.Expression:
        """``rows_per_second`` in SQL (NULL without a duration), to filter, order and average."""
        return models.ExpressionWrapper(
            models.F("checkpoint_position") / NullIf(models.F("duration_seconds"), 0.0),
            output_field=models.FloatField(),
        )

    @property
    def rows_per_second(self) -> float | None:
        """Input rows read per second of the run so far; None before it has a duration."""
        if not self.duration_seconds:
            return None
        return self.checkpoint_position / self.duration_seconds


def run_mark() -> models.ForeignKey:
    """A row's mark of the batch run that last wrote it (``keys_in_database``).

    With the input row it came from, it names a key an earlier chunk of the run
    wrote. No constraint and no index: each row written would pay for them.
    """
    return models.ForeignKey(
        BatchProcessingLog,
        null=True,
        blank=True,
        editable=False,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
