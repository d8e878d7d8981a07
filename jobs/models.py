"""Background jobs: a job is its input, staged, split into partitions.

Each partition is one resumable run (a ``BatchProcessingLog``) on any worker;
a job's status and progress are its partitions' summed up (``jobs.tasks``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Prefetch

from batching.models import BatchProcessingLog
from batching.readers import JSONL


class Status(models.TextChoices):
    """Shared by jobs and their partitions."""

    # A job only: its input is staged, no partition yet (``jobs.services.hold_job``).
    HELD = "held", "Held (staged, not submitted yet)"
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    PARTIAL = "partial", "Partial (rows skipped)"
    FAILED = "failed", "Failed"
    # A job only: cancelled while partitions ran; they stop at their next chunk.
    CANCELLING = "cancelling", "Cancelling"
    CANCELLED = "cancelled", "Cancelled"


FINISHED = frozenset({Status.COMPLETED, Status.PARTIAL, Status.FAILED, Status.CANCELLED})
# Finished, but with input left that ``jobs.control.resume_job`` can run.
RESUMABLE = frozenset({Status.FAILED, Status.CANCELLED})


class JobQuerySet(models.QuerySet["Job"]):
    def with_partitions(self) -> JobQuerySet:
        """Prefetch what ``as_dict`` and ``progress`` read: one query for all jobs."""
        return self.prefetch_related(Prefetch("partitions", queryset=JobPartition.progress_rows()))


class Job(models.Model):
    """One bulk operation over one input, run as partitions by background workers."""

    Status = Status

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    operation = models.CharField(max_length=32, choices=BatchProcessingLog.Operation)
    status = models.CharField(max_length=16, choices=Status, default=Status.QUEUED)
    rows_total = models.PositiveBigIntegerField(default=0)
    partition_size = models.PositiveIntegerField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # How its staged records are parsed (``batching.readers.parse_record``).
    input_format = models.CharField(max_length=8, default=JSONL)
    columns = models.JSONField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # Admin and API lists: jobs newest first, filtered by status.
            models.Index(fields=["status", "-created_at"], name="job_status_created_idx"),
            # Admin and API lists without a filter: newest first.
            models.Index(fields=["-created_at"], name="job_created_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(partition_size__gte=1), name="job_partition_size_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.operation} job {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    def progress_partitions(self) -> list[JobPartition]:
        """The partitions with their logs: prefetched, or one query."""
        cache = getattr(self, "_prefetched_objects_cache", {})
        if "partitions" in cache:
            return list(cache["partitions"])
        return list(JobPartition.progress_rows().filter(job=self))

    def as_dict(self) -> dict[str, Any]:
        """Status, progress and (once finished) the summed result of the partitions, its row
        errors indexed in the whole input (``BULK_LOG_MAX_ROW_ERRORS`` a partition at most)."""
        partitions = self.progress_partitions()
        logs = [p.log for p in partitions if p.log is not None]
        result = None
        if self.is_finished:
            counts = ("read", "written", "created", "updated", "skipped")
            result = {name: sum(getattr(log, f"rows_{name}") for log in logs) for name in counts}
            result["errors"] = [error for p in partitions for error in p.job_errors()]
            result["log_ids"] = [log.pk for log in logs]
        return {
            "id": str(self.pk),
            "operation": self.operation,
            "status": str(self.status),
            "rows_done": sum(p.rows_done for p in partitions),
            "rows_total": self.rows_total,
            "result": result,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


class JobPartition(models.Model):
    """A contiguous slice of a job's input (the ``StagedRecord`` numbers ``start`` to
    ``start + size - 1``), run as one resumable batch run."""

    Status = Status

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="partitions")
    number = models.PositiveIntegerField()
    start = models.PositiveBigIntegerField()
    size = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=Status, default=Status.QUEUED)
    # Created by the first claim, resumed by every attempt: its checkpoint is the progress.
    log = models.ForeignKey(
        BatchProcessingLog, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    attempts = models.PositiveIntegerField(default=0)
    # Its records' keys are staged (``jobs.staging.key_partitions``).
    keyed = models.BooleanField(default=False)
    worker = models.CharField(max_length=128, blank=True)
    queued_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "number"]
        indexes = [
            # Reaper and /health: running partitions, and the oldest queued one.
            models.Index(fields=["status", "queued_at"], name="jobpart_status_queued_idx"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="jobpart_job_number_uniq"),
        ]

    def __str__(self) -> str:
        return f"partition {self.number} of job {self.job_id} ({self.status})"

    @classmethod
    def progress_rows(cls) -> models.QuerySet[JobPartition]:
        return cls.objects.select_related("log")

    @property
    def rows_done(self) -> int:
        """Rows committed so far: the log's checkpoint."""
        return self.log.checkpoint_position if self.log is not None else 0

    def job_errors(self) -> list[dict[str, Any]]:
        """The log's row errors, indexed in the whole job input."""
        if self.log is None:
            return []
        return [
            error | {"index": error["index"] + self.start}
            for error in self.log.row_errors
            if isinstance(error, dict) and isinstance(error.get("index"), int)
        ]


class StagedRecord(models.Model):
    """One record of a job's input (its text, or ``refused``: a ``jobs.staging.Refused``),
    numbered by its index in the input; kept until its partition ends not to be resumed."""

    pk = models.CompositePrimaryKey("job_id", "number")
    # No foreign key constraint: its check at COMMIT would outlast the COPY.
    # Django still deletes them with their job; ``purge_history`` sweeps them.
    job = models.ForeignKey(
        Job, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    number = models.PositiveBigIntegerField()
    record = models.TextField(blank=True)
    refused = models.JSONField(null=True, blank=True)

    def __str__(self) -> str:
        return f"record {self.number} of job {self.job_id}"


class StagedKey(models.Model):
    """The operation's key (JSON text) of a staged record, staged by the workers; kept
    until the job ends with nothing left to resume."""

    pk = models.CompositePrimaryKey("job_id", "number")
    # No foreign key constraint, as for ``StagedRecord``.
    job = models.ForeignKey(
        Job, on_delete=models.CASCADE, related_name="+", db_index=False, db_constraint=False
    )
    number = models.PositiveBigIntegerField()
    key = models.TextField()

    class Meta:
        indexes = [
            # "Where did this key first come?": an index-only probe per record.
            models.Index(fields=["job", "key", "number"], name="jobkey_job_key_number_idx"),
        ]

    def __str__(self) -> str:
        return f"key of record {self.number} of job {self.job_id}"
