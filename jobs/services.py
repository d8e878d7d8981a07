"""Submitting background jobs, and whether workers are there to run them.

``submit_job`` stages the input (``jobs.staging``), names partitions of
``settings.JOB_PARTITION_ROWS`` rows in it and enqueues one ``django.tasks``
task per partition once the job is committed (``transaction.on_commit``): a
worker never sees a job that is not in the database yet, and a job submitted
inside a transaction that rolls back is never run.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from batching.registry import operation_class, operation_names
from jobs.models import Job, JobPartition, Status
from jobs.staging import stage
from jobs.tasks import enqueue_partition, schedule_watch

UNKNOWN_OPERATION = "unknown operation {operation!r}: expected one of {choices}"
NOTHING_WAITING = "no job work is waiting"
WORK_FRESH = "job work queued {seconds}s ago"
WORKERS_BUSY = "workers are busy: a running partition showed life within {limit}s"
NO_WORKER = (
    "job work has waited {seconds}s and no worker has shown life within {limit}s: "
    "start one with `python manage.py db_worker`"
)


def submit_job(*, operation: str, rows: Iterable[Any], created_by: Any = None) -> Job:
    """Stage ``rows`` as a job of ``operation`` and enqueue its partitions.

    Args:
        operation: the name of a registered operation (``batching.registry``).
        rows: the input, as the service's method takes it (dicts), in any
            iterable: it is read once, in a stream (``jobs.staging``).
        created_by: the user who submitted it (an anonymous user counts as none).

    Raises:
        ValueError: an unknown operation. Bad rows never raise: the partitions'
            runs report them, indexed in the whole input.

    Keys repeated in the input (sku, order reference, score key) are found
    while staging, across partitions, and reported as duplicates like a
    single run would; everything else is validated by the runs.
    """
    names = operation_names()
    if operation not in names:
        choices = ", ".join(names)
        raise ValueError(UNKNOWN_OPERATION.format(operation=operation, choices=choices))
    size = settings.JOB_PARTITION_ROWS
    if not getattr(created_by, "is_authenticated", False):
        created_by = None
    with transaction.atomic():
        job = Job.objects.create(operation=operation, partition_size=size, created_by=created_by)
        job.rows_total = stage(job, operation_class(operation)(), rows)
        now = timezone.now()
        if not job.rows_total:
            # Nothing to run: an empty job is complete at once.
            job.status, job.finished_at = Status.COMPLETED, now
        job.save(update_fields=["rows_total", "status", "finished_at"])
        partitions = JobPartition.objects.bulk_create(
            JobPartition(
                job=job,
                number=number,
                start=start,
                size=min(size, job.rows_total - start),
                queued_at=now,
            )
            for number, start in enumerate(range(0, job.rows_total, size))
        )
        if partitions:
            ids = [partition.pk for partition in partitions]
            # robust: a queue that refuses the job cannot undo its commit (logged;
            # /health then reports the queued work no worker took).
            transaction.on_commit(lambda: _enqueue(job.pk, ids), robust=True)
    return job


def _enqueue(job_id: Any, partition_ids: list[int]) -> None:
    for partition_id in partition_ids:
        enqueue_partition(partition_id)
    schedule_watch(job_id)


def worker_status() -> tuple[bool, str]:
    """(ok, detail) for /health: can queued job work expect a worker?

    Workers poll the queue and write nothing while idle, so an idle worker
    cannot be told from no worker. The check is therefore: no partition has
    been queued for longer than ``settings.JOB_STALE_SECONDS``; or, if one
    has, a running partition was claimed or heartbeated (after every chunk)
    within that time, i.e. the workers are alive and busy. Two queries at
    most, both on the partitions' (status, queued_at) index.
    """
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
