"""Purging old history: finished jobs, their partitions, batch logs and task results.

What is purged, "old" meaning finished (and started) before the cutoff:

* **jobs** that completed (or completed with rows skipped), with their
  partitions and the partitions' input records and keys;
* **batch logs** that completed (or completed with rows skipped) and that no
  partition of a kept job refers to;
* **task results** of ``django_tasks_db`` that finished (successful or
  failed), when that backend is installed. Queued and running tasks stay.

What a resume needs is kept, however old:

* a failed or cancelled job (``jobs.control.resume_job`` re-runs it), an
  unfinished one, their partitions (the input rows) and every log those
  partitions refer to: the completed ones too, which the job's result sums;
* a failed, interrupted or cancelled batch log (``--resume LOG_ID`` goes on
  from its checkpoint) and a running one.

Each kind is deleted ``batch_size`` rows at a time: one SELECT of ids, then
one DELETE of those ids in its own transaction, so no statement holds many
locks or much undo, and a purge stopped midway has deleted whole batches.
Partitions go before their jobs, and logs after the partitions that referred
to them, so no foreign key ever points at a deleted row.

The DELETE is the queryset's ``_raw_delete``: one statement for the batch.
``QuerySet.delete()`` would load each batch (a log's row errors included),
null the references to it and delete 100 rows per statement; here nothing
refers to a deleted row by construction, and the database's foreign keys
would refuse the batch if something did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.apps import apps
from django.db import models, transaction
from django.db.models import Exists, OuterRef

from batching.models import BatchProcessingLog
from jobs.models import Job, JobPartition, StagedKey, StagedRecord, Status

LogStatus = BatchProcessingLog.Status

# Ids per DELETE, each in its own transaction.
PURGE_BATCH_SIZE = 1000
# Finished and not resumable: nothing will read them again.
DONE_JOBS = (Status.COMPLETED, Status.PARTIAL)
DONE_LOGS = (LogStatus.COMPLETED, LogStatus.PARTIAL)


@dataclass(frozen=True, slots=True)
class Step:
    """One kind of history: its name, and the queryset of its purgeable rows."""

    name: str
    rows: Callable[[datetime], models.QuerySet]


def old_jobs(cutoff: datetime) -> models.QuerySet[Job]:
    # created_at narrows through the (status, -created_at) index; finished_at decides.
    return Job.objects.filter(status__in=DONE_JOBS, created_at__lt=cutoff, finished_at__lt=cutoff)


def of_old_jobs(model: type[models.Model]) -> Callable[[datetime], models.QuerySet]:
    """The rows of ``model`` that belong to old jobs: their partitions, and what is
    left of their staged records and keys (a finished partition deletes its
    records, a job that ends with nothing to resume its keys, after its end
    commits)."""
    return lambda cutoff: model._default_manager.filter(job__in=old_jobs(cutoff))


def old_logs(cutoff: datetime) -> models.QuerySet[BatchProcessingLog]:
    kept_partition = JobPartition.objects.filter(log=OuterRef("pk")).exclude(
        job__in=old_jobs(cutoff)
    )
    return BatchProcessingLog.objects.filter(
        status__in=DONE_LOGS, started_at__lt=cutoff, finished_at__lt=cutoff
    ).exclude(Exists(kept_partition))


def old_task_results(cutoff: datetime) -> models.QuerySet:
    # Imported here: the app is optional (``steps`` asks for it only when installed).
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.finished().filter(finished_at__lt=cutoff)


def steps() -> list[Step]:
    """The kinds of history in the order they are deleted (referrers first)."""
    found = [
        Step("staged input records", of_old_jobs(StagedRecord)),
        Step("staged input keys", of_old_jobs(StagedKey)),
        Step("job partitions", of_old_jobs(JobPartition)),
        Step("jobs", old_jobs),
        Step("batch logs", old_logs),
    ]
    if apps.is_installed("django_tasks_db"):
        found.append(Step("task results", old_task_results))
    return found


def count(cutoff: datetime) -> Iterator[tuple[str, int]]:
    """(kind, rows) that a purge with this cutoff would delete: one COUNT each."""
    for step in steps():
        yield step.name, step.rows(cutoff).count()


def purge(cutoff: datetime, *, batch_size: int = PURGE_BATCH_SIZE) -> Iterator[tuple[str, int]]:
    """Delete the history older than ``cutoff``; yield (kind, rows deleted) as each ends.

    Per batch: one SELECT of at most ``batch_size`` ids, then one DELETE in its
    own transaction that repeats the purge's conditions, so a row that became
    needed meanwhile stays. A short batch is the last: no empty SELECT after it.
    """
    for step in steps():
        deleted = 0
        while True:
            purgeable = step.rows(cutoff)
            ids = list(purgeable.order_by().values_list("pk", flat=True)[:batch_size])
            if ids:
                with transaction.atomic(using=purgeable.db):
                    batch = purgeable.filter(pk__in=ids)
                    deleted += batch._raw_delete(batch.db)
            if len(ids) < batch_size:
                break
        yield step.name, deleted
