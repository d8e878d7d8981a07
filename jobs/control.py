"""Cancelling a background job, and resuming a cancelled or failed one (docs/operations-history.md).

Rows are locked in the order the workers lock them (partitions, then the job), so
a cancel never deadlocks with a claim or a partition's end. The last running
partition's end (``jobs.tasks.finish_partition``) turns a ``cancelling`` job ``cancelled``.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from batching.models import BatchProcessingLog
from jobs.models import FINISHED, RESUMABLE, Job, JobPartition, Status
from jobs.services import _enqueue
from jobs.tasks import job_status

LogStatus = BatchProcessingLog.Status

JOB_NOT_FOUND = "no job {job_id}"
ALREADY_FINISHED = "job {job_id} has already finished ({status}): there is nothing to cancel"
NOT_RESUMABLE = "job {job_id} is {status}: only a cancelled or failed job can be resumed"
RESUMED = "resumed from its checkpoint after the job was {status}"


class JobNotFound(LookupError):
    """No job has this id."""


class JobStateError(ValueError):
    """The job's status does not allow what was asked (an HTTP 409)."""


def cancel_job(job_id: Any) -> Job:
    """Cancel a queued or running job; return it with its new status.
    ``JobNotFound``, or ``JobStateError`` when the job has finished."""
    now = timezone.now()
    with transaction.atomic():
        partitions = JobPartition.objects.filter(job_id=job_id)
        partitions.filter(status=Status.QUEUED).update(status=Status.CANCELLED, finished_at=now)
        running_logs = partitions.filter(status=Status.RUNNING).values("log")
        BatchProcessingLog.objects.filter(pk__in=running_logs).update(stop_requested=True)
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(JOB_NOT_FOUND.format(job_id=job_id))
        if job.is_finished:  # its partitions had all ended: the UPDATEs changed nothing
            raise JobStateError(ALREADY_FINISHED.format(job_id=job_id, status=job.status))
        statuses = set(partitions.order_by().values_list("status", flat=True).distinct())
        if statuses <= FINISHED:  # cancelled, unless a partition failed
            job.status, job.finished_at = job_status(statuses | {Status.CANCELLED}), now
        else:
            job.status = Status.CANCELLING
        job.save(update_fields=["status", "finished_at"])
    return job


def resume_job(job_id: Any) -> Job:
    """Queue a cancelled or failed job's unfinished partitions again; return the job.
    ``JobNotFound``, or ``JobStateError`` when the job is not cancelled or failed."""
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(JOB_NOT_FOUND.format(job_id=job_id))
        if job.status not in RESUMABLE:
            raise JobStateError(NOT_RESUMABLE.format(job_id=job_id, status=job.status))
        resumable = JobPartition.objects.filter(job=job, status__in=RESUMABLE)
        # As a take-over leaves them: interrupted runs that resume from their checkpoints.
        BatchProcessingLog.objects.filter(
            pk__in=resumable.values("log"), status__in=(LogStatus.CANCELLED, LogStatus.FAILED)
        ).update(
            status=LogStatus.INTERRUPTED,
            stop_requested=False,
            error_summary=RESUMED.format(status=job.status),
        )
        # In number order: a partition keys the earlier ones it finds unkeyed.
        ids = list(resumable.order_by("number").values_list("pk", flat=True))
        JobPartition.objects.filter(pk__in=ids).update(
            status=Status.QUEUED, queued_at=now, worker="", finished_at=None
        )
        job.status, job.finished_at = Status.QUEUED, None
        if not ids:  # nothing left to run (a job cancelled before it had partitions)
            job.status, job.finished_at = Status.COMPLETED, now
        job.save(update_fields=["status", "finished_at"])
        # robust: a queue that refuses the work cannot undo the commit (/health reports it).
        transaction.on_commit(lambda: _enqueue(job.pk, ids), robust=True)
    return job
