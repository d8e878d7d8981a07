"""Purging old history: finished jobs, their partitions, batch logs and task results.

What goes and what stays: docs/operations-history.md. Each kind goes
``batch_size`` rows at a time, referrers first, by ``_raw_delete`` (one
statement, nothing loaded): nothing refers to a deleted row by construction,
and the database's foreign keys would refuse the batch if something did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from django.apps import apps
from django.db import models, transaction
from django.db.models import Exists, OuterRef

from batching.models import BatchProcessingLog
from jobs.models import Job, JobPartition, StagedKey, StagedRecord, Status

LogStatus = BatchProcessingLog.Status

PURGE_BATCH_SIZE = 1000
# Finished and not resumable: nothing will read them again.
DONE_JOBS = (Status.COMPLETED, Status.PARTIAL)
DONE_LOGS = (LogStatus.COMPLETED, LogStatus.PARTIAL)


def old_jobs(cutoff: datetime) -> models.QuerySet[Job]:
    # created_at narrows through the (status, -created_at) index; finished_at decides.
    return Job.objects.filter(status__in=DONE_JOBS, created_at__lt=cutoff, finished_at__lt=cutoff)


def of_old_jobs(model: type[models.Model]) -> Callable[[datetime], models.QuerySet]:
    """The rows of ``model`` (partitions, staged records and keys) that belong to old jobs."""
    return lambda cutoff: model._default_manager.filter(job__in=old_jobs(cutoff))


def old_logs(cutoff: datetime) -> models.QuerySet[BatchProcessingLog]:
    kept_partition = JobPartition.objects.filter(log=OuterRef("pk")).exclude(
        job__in=old_jobs(cutoff)
    )
    return BatchProcessingLog.objects.filter(
        status__in=DONE_LOGS, started_at__lt=cutoff, finished_at__lt=cutoff
    ).exclude(Exists(kept_partition))


def old_task_results(cutoff: datetime) -> models.QuerySet:
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.finished().filter(finished_at__lt=cutoff)


def steps() -> list[tuple[str, Callable[[datetime], models.QuerySet]]]:
    """(kind, its purgeable rows by cutoff) in the order they are deleted (referrers first)."""
    found = [
        ("staged input records", of_old_jobs(StagedRecord)),
        ("staged input keys", of_old_jobs(StagedKey)),
        ("job partitions", of_old_jobs(JobPartition)),
        ("jobs", old_jobs),
        ("batch logs", old_logs),
    ]
    if apps.is_installed("django_tasks_db"):
        found.append(("task results", old_task_results))
    return found


def count(cutoff: datetime) -> Iterator[tuple[str, int]]:
    """(kind, rows) that a purge with this cutoff would delete: one COUNT each."""
    for name, rows in steps():
        yield name, rows(cutoff).count()


def purge(cutoff: datetime, *, batch_size: int = PURGE_BATCH_SIZE) -> Iterator[tuple[str, int]]:
    """Delete the history older than ``cutoff``; yield (kind, rows deleted) as each ends.

    The DELETE repeats the purge's conditions: a row that became needed meanwhile stays.
    """
    for name, rows in steps():
        deleted = 0
        while True:
            purgeable = rows(cutoff)
            ids = list(purgeable.order_by().values_list("pk", flat=True)[:batch_size])
            if ids:
                with transaction.atomic(using=purgeable.db):
                    batch = purgeable.filter(pk__in=ids)
                    deleted += batch._raw_delete(batch.db)
            if len(ids) < batch_size:
                break
        yield name, deleted
