"""Cancelling a background job, and resuming a cancelled or failed one.

``cancel_job``, in one transaction:

* queued partitions become ``cancelled``: a worker that picks up one of their
  tasks finds the partition not queued and does nothing, so they never start;
* running partitions' runs are asked to stop (``stop_requested`` on their log
  rows): each commits the chunk it is writing and ends as ``cancelled`` (see
  ``batching.engine``), and its worker records the partition as cancelled;
* the job becomes ``cancelled`` at once when no partition is running, and
  ``cancelling`` otherwise, until ``jobs.tasks.finish_partition`` records the
  last running partition's end. A partition that completed before it saw the
  request stays completed.

Rows are locked in the order the workers lock them (partitions, then the
job), so a cancel never deadlocks with a claim or a partition's end. A
partition whose worker dies while the job is cancelling is taken over as
usual, and its run, resumed with the stop still requested, ends at once.

``resume_job`` queues a cancelled or failed job's cancelled and failed
partitions again with their runs marked interrupted and the stop request
cleared: what a take-over does for a dead worker's partition
(``jobs.tasks.requeue``). Each worker then resumes its partition's run from
its checkpoint, so every row lands exactly once; completed partitions stay
as they are.
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

    Raises:
        JobNotFound: no such job.
        JobStateError: the job has finished (cancelled included).

    Cancelling a job that is already ``cancelling`` asks again and changes nothing.
    """
    now = timezone.now()
    with transaction.atomic():
        partitions = JobPartition.objects.filter(job_id=job_id)
        partitions.filter(status=Status.QUEUED).update(status=Status.CANCELLED, finished_at=now)
        running_logs = partitions.filter(status=Status.RUNNING).values("log")
        BatchProcessingLog.objects.filter(pk__in=running_logs).update(stop_requested=True)
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(JOB_NOT_FOUND.format(job_id=job_id))
        if job.is_finished:
            # Its partitions had all ended: the UPDATEs above changed nothing.
            raise JobStateError(ALREADY_FINISHED.format(job_id=job_id, status=job.status))
        statuses = set(partitions.order_by().values_list("status", flat=True).distinct())
        if statuses <= FINISHED:
            # Cancelled, unless a partition failed (resumable as well).
            job.status = job_status(statuses | {Status.CANCELLED})
            job.finished_at = now
        else:
            job.status = Status.CANCELLING
        job.save(update_fields=["status", "finished_at"])
    return job


def resume_job(job_id: Any) -> Job:
    """Queue a cancelled or failed job's unfinished partitions again; return the job.

    Raises:
        JobNotFound: no such job.
        JobStateError: the job is not cancelled or failed.
    """
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise JobNotFound(JOB_NOT_FOUND.format(job_id=job_id))
        if job.status not in RESUMABLE:
            raise JobStateError(NOT_RESUMABLE.format(job_id=job_id, status=job.status))
        resumable = JobPartition.objects.filter(job=job, status__in=RESUMABLE)
        # As a take-over leaves them: interrupted runs that resume from their checkpoint.
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
        # robust: a queue that refuses the work cannot undo the commit; the
        # partitions wait queued, and /health reports them.
        transaction.on_commit(lambda: _enqueue(job.pk, ids), robust=True)
    return job
