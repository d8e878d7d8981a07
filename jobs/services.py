"""Submitting background jobs, and whether workers are there to run them (docs/jobs.md).

Partitions are enqueued once the job commits (``transaction.on_commit``): a
worker never sees an uncommitted job. A held job is staged with nothing queued.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from batching.engine import BatchResult, DryRun, dry_run, run_batch, run_log_of
from batching.registry import operation_names
from jobs.models import Job, JobPartition, Status
from jobs.staging import Records, stage, staged_input
from jobs.tasks import enqueue_partition, partition_operation, schedule_watch

UNKNOWN_OPERATION = "unknown operation {operation!r}: expected one of {choices}"
NOT_HELD = "job {job_id} is not held: it was released, run or discarded already"
NOTHING_WAITING = "no job work is waiting"
WORK_FRESH = "job work queued {seconds}s ago"
WORKERS_BUSY = "workers are busy: a running partition showed life within {limit}s"
NO_WORKER = (
    "job work has waited {seconds}s and no worker has shown life within {limit}s: "
    "start one with `python manage.py db_worker`"
)


def submit_job(*, operation: str, rows: Iterable[Any] | Records, created_by: Any = None) -> Job:
    """Stage ``rows`` (dicts, or a file's ``RecordStream``; read once, in a stream) as a
    job of the registered ``operation`` and enqueue its partitions.

    ValueError for an unknown operation; bad rows never raise: the runs report them. An
    anonymous ``created_by`` counts as none. Inside a transaction that rolls back, the
    job never runs.
    """
    with transaction.atomic():
        job = _staged_job(operation, rows, created_by, Status.QUEUED)
        _partition(job)
    return job


def hold_job(*, operation: str, rows: Iterable[Any] | Records, created_by: Any = None) -> Job:
    """Stage ``rows`` (as ``submit_job``) as a held job of ``operation``: nothing is queued."""
    with transaction.atomic():
        return _staged_job(operation, rows, created_by, Status.HELD)


def _staged_job(
    operation: str, rows: Iterable[Any] | Records, created_by: Any, status: Status
) -> Job:
    """Create the job and stage its input (two queries and the staging); saves ``rows_total``."""
    names = operation_names()
    if operation not in names:
        choices = ", ".join(names)
        raise ValueError(UNKNOWN_OPERATION.format(operation=operation, choices=choices))
    if not getattr(created_by, "is_authenticated", False):
        created_by = None
    job = Job.objects.create(
        operation=operation,
        partition_size=settings.JOB_PARTITION_ROWS,
        created_by=created_by,
        status=status,
    )
    job.rows_total = stage(job, rows)
    if job.status != Status.HELD and not job.rows_total:  # nothing to run: complete at once
        job.status, job.finished_at = Status.COMPLETED, timezone.now()
    job.save(update_fields=["rows_total", "status", "finished_at", "input_format", "columns"])
    return job


def _partition(job: Job) -> None:
    """Name the job's partitions (one INSERT) and enqueue them once committed."""
    now = timezone.now()
    size = job.partition_size
    partitions = JobPartition.objects.bulk_create(
        JobPartition(
            job=job, number=n, start=start, size=min(size, job.rows_total - start), queued_at=now
        )
        for n, start in enumerate(range(0, job.rows_total, size))
    )
    if partitions:
        ids = [partition.pk for partition in partitions]
        # robust: a queue that refuses the job cannot undo its commit (/health reports it).
        transaction.on_commit(lambda: _enqueue(job.pk, ids), robust=True)


def release_job(job: Job) -> None:
    """Queue a held job's partitions, as ``submit_job`` would have; updates ``job``.
    ValueError if it is not held (released, run or discarded already)."""
    with transaction.atomic():
        status, finished = Status.QUEUED, None
        if not job.rows_total:
            status, finished = Status.COMPLETED, timezone.now()
        released = Job.objects.filter(pk=job.pk, status=Status.HELD).update(
            status=status, finished_at=finished
        )
        if not released:
            raise ValueError(NOT_HELD.format(job_id=job.pk))
        job.status, job.finished_at = status, finished
        _partition(job)


def check_job(job: Job, *, rows: int) -> DryRun:
    """A dry run (``batching.engine.dry_run``) of the job's first ``rows`` rows, writing
    nothing; read one chunk (``BULK_CHUNK_SIZE``) at a time, one query each."""
    size = settings.BULK_CHUNK_SIZE
    stop = min(rows, job.rows_total)
    chunks = (staged_input(job, start, min(start + size, stop)) for start in range(0, stop, size))
    rows_read = (row for chunk in chunks for row in chunk)
    return dry_run(partition_operation(job.operation)(), rows_read, chunk_size=size)


def run_held_job(job: Job) -> BatchResult:
    """Run a held job's whole input now, in this process, as one run; then discard the job.

    A run that raises before committing anything leaves the job held; once
    anything is committed its input must not run twice. ValueError if not held.
    """
    if job.status != Status.HELD:
        raise ValueError(NOT_HELD.format(job_id=job.pk))
    rows = staged_input(job, 0, job.rows_total)  # a list: the read-ahead thread reads it
    try:
        result = run_batch(partition_operation(job.operation)(), rows)
    except BaseException as exc:
        log = run_log_of(exc)
        if log is not None and log.checkpoint_position:
            discard_job(job.pk)
        raise
    discard_job(job.pk)
    return result


def discard_job(job_id: Any) -> bool:
    """Delete a held job and its staged rows; False if it is not held (or gone)."""
    deleted, _ = Job.objects.filter(pk=job_id, status=Status.HELD).delete()
    return bool(deleted)


def discard_held_jobs(*, older_than: timedelta) -> int:
    """Delete the jobs held for longer than ``older_than`` and their staged rows; how many."""
    cutoff = timezone.now() - older_than
    _, deleted = Job.objects.filter(status=Status.HELD, created_at__lt=cutoff).delete()
    return deleted.get(Job._meta.label, 0)


def _enqueue(job_id: Any, partition_ids: list[int]) -> None:
    for partition_id in partition_ids:
        enqueue_partition(partition_id)
    schedule_watch(job_id)


def worker_status() -> tuple[bool, str]:
    """(ok, detail) for /health: can queued job work expect a worker? (docs/jobs.md, "Health")."""
    limit = settings.JOB_STALE_SECONDS
    now = timezone.now()
    oldest = (
        JobPartition.objects.filter(status=Status.QUEUED)
        .order_by("queued_at")
        .values_list("queued_at", flat=True)
        .first()
    )
    if oldest is None:
        return True, NOTHING_WAITING
    waited = round((now - oldest).total_seconds())
    cutoff = now - timedelta(seconds=limit)
    if oldest > cutoff:
        return True, WORK_FRESH.format(seconds=waited)
    alive = JobPartition.objects.filter(status=Status.RUNNING).filter(
        Q(claimed_at__gt=cutoff) | Q(log__heartbeat_at__gt=cutoff)
    )
    if alive.exists():
        return True, WORKERS_BUSY.format(limit=limit)
    return False, NO_WORKER.format(seconds=waited, limit=limit)
