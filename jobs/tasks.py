"""The background tasks of a job: one per partition, and a watchdog per job (docs/jobs.md).

A partition is owned by whoever claimed it last (``attempts``): every later
write about it repeats ``status=running, attempts=N`` in its WHERE clause, so a
worker that lost it to a take-over records nothing more. The first claim
creates its log as an interrupted run at checkpoint 0 and every attempt
resumes it. Take-over (``reap_stale_partitions``) ignores the task backend's
bookkeeping; docs/jobs.md ("A killed worker") says who runs it and when.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from functools import cache, partial
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.tasks import task
from django.utils import timezone

from batching.engine import DUPLICATE_IN_INPUT, BatchOperation, RowInvalid, run_batch, worker_name
from batching.liveness import interruption
from batching.models import BatchProcessingLog
from batching.registry import operation_class
from jobs.models import FINISHED, Job, JobPartition, Status
from jobs.staging import (
    Refused,
    RepeatedKey,
    discard,
    discard_keys,
    key_partitions,
    partition_input,
)

logger = logging.getLogger(__name__)

LogStatus = BatchProcessingLog.Status
CLAIMED = "job {job} partition {number}: claimed, not started yet"
SHUT_DOWN = "interrupted: its worker shut down; re-queued"
KEYING_FAILED = "failed before its run, staging the keys of its input: {error}"

# A partition's status once its run's log has finished.
ENDED = (LogStatus.COMPLETED, LogStatus.PARTIAL, LogStatus.FAILED, LogStatus.CANCELLED)
PARTITION_STATUS: dict[str, Status] = {status: Status(status) for status in ENDED}


def partition_operation(name: str) -> type[BatchOperation]:
    """The registered operation ``name``, reporting ``jobs.staging.staged_input``'s
    stand-ins as one run would: a ``RepeatedKey`` as a duplicate, a ``Refused`` as its error."""
    return _partition_operation(str(name))  # an Operation member hashes by its name


@cache
def _partition_operation(name: str) -> type[BatchOperation]:
    base = operation_class(name)

    class PartitionOperation(base):  # type: ignore[valid-type,misc]
        def prepare(self, raw: Any) -> Any:
            if isinstance(raw, RepeatedKey):
                field = self.key_field or "row"
                message = DUPLICATE_IN_INPUT.format(field=field, first=raw.first)
                raise RowInvalid(field, message, "duplicate")
            if isinstance(raw, Refused):
                raise RowInvalid(raw.field, raw.message, raw.code)
            return super().prepare(raw)

    PartitionOperation.__name__ = PartitionOperation.__qualname__ = f"Partition{base.__name__}"
    return PartitionOperation


@task
def run_partition(partition_id: int) -> dict[str, Any]:
    """Claim a queued partition and run (or resume) it; a no-op when it is not queued."""
    reap_stale_partitions()
    claimed = claim_partition(partition_id)
    if claimed is None:
        return {"partition": partition_id, "ran": False}
    partition, log = claimed
    status = log.status
    # A finished log: its worker died after the run ended, before the partition did.
    if status not in PARTITION_STATUS:
        try:
            _keyed(partition, log)
            operation = partition_operation(partition.job.operation)()
            # Every attempt resumes the log, so its resume_count counts the attempts.
            status = run_batch(operation, partition_input(partition), resume=log.pk).status
        except BaseException:
            _after_abort(partition)
            raise
    finish_partition(partition, status)
    return {"partition": partition_id, "ran": True, "log_id": log.pk, "status": str(status)}


def _keyed(partition: JobPartition, log: BatchProcessingLog) -> None:
    """``key_partitions``, heartbeating the log; a failure not the database's fails the run."""
    logs = BatchProcessingLog.objects.filter(pk=log.pk)
    try:
        key_partitions(partition, alive=lambda: logs.update(heartbeat_at=timezone.now()))
    except DatabaseError:
        raise  # re-queued, as for a shut-down worker
    except Exception as exc:
        error = KEYING_FAILED.format(error=repr(exc)[:500])
        logs.update(status=LogStatus.FAILED, finished_at=timezone.now(), error_summary=error)
        raise


@task
def watch_job(job_id: str) -> None:
    """Take over the stale partitions; again in JOB_WATCH_SECONDS while the job runs."""
    reap_stale_partitions()
    if Job.objects.filter(pk=job_id).exclude(status__in=FINISHED).exists():
        schedule_watch(job_id)


def schedule_watch(job_id: Any) -> None:
    """Defer the job's watchdog; backends without ``run_after`` rely on the other reapers."""
    if not watch_job.get_backend().supports_defer:
        return
    run_after = timezone.now() + timedelta(seconds=settings.JOB_WATCH_SECONDS)
    watch_job.using(run_after=run_after).enqueue(str(job_id))


def enqueue_partition(partition_id: int) -> None:
    run_partition.enqueue(partition_id)


def claim_partition(partition_id: int) -> tuple[JobPartition, BatchProcessingLog] | None:
    """Make this worker the partition's owner; None when it is not queued."""
    now = timezone.now()
    worker = worker_name()
    with transaction.atomic():
        partition = (
            JobPartition.objects.select_for_update(of=("self",))
            .select_related("job", "log")
            .filter(pk=partition_id)
            .first()
        )
        if partition is None or partition.status != Status.QUEUED:
            return None
        log = partition.log
        if log is None:
            log = BatchProcessingLog.objects.create(
                operation=partition.job.operation,
                variant=BatchProcessingLog.Variant.OPTIMIZED,
                status=LogStatus.INTERRUPTED,
                chunk_size=operation_class(partition.job.operation).volume_chunk_size(),
                started_at=now,
                heartbeat_at=now,
                database_vendor=connection.vendor,
                worker=worker,
                error_summary=CLAIMED.format(job=partition.job_id, number=partition.number),
            )
        claim = {"status": Status.RUNNING, "log": log, "worker": worker, "claimed_at": now}
        JobPartition.objects.filter(pk=partition.pk).update(**claim, attempts=F("attempts") + 1)
        for name, value in claim.items():
            setattr(partition, name, value)
        partition.attempts += 1
        Job.objects.filter(pk=partition.job_id, status=Status.QUEUED).update(status=Status.RUNNING)
    return partition, log


def finish_partition(partition: JobPartition, log_status: str) -> None:
    """Record the partition's end; the last partition to end (job row locked) finishes the job."""
    now = timezone.now()
    with transaction.atomic():
        ended = JobPartition.objects.filter(
            pk=partition.pk, status=Status.RUNNING, attempts=partition.attempts
        ).update(status=PARTITION_STATUS[log_status], finished_at=now)
        if not ended:
            return  # taken over meanwhile: the new owner records it
        if log_status in (LogStatus.COMPLETED, LogStatus.PARTIAL):
            discard(partition)  # never to run again; a failed or cancelled one may resume
        job = Job.objects.select_for_update().get(pk=partition.job_id)
        statuses = set(job.partitions.order_by().values_list("status", flat=True).distinct())
        if statuses <= FINISHED:
            job.status, job.finished_at = job_status(statuses), now
            job.save(update_fields=["status", "finished_at"])
            if job.status in (Status.COMPLETED, Status.PARTIAL):
                # Nothing will run again: its keys go (robust: the job's end stands).
                transaction.on_commit(partial(discard_keys, job.pk), robust=True)


def job_status(statuses: set[str]) -> str:
    """A finished job's status from its partitions': the first of failed, cancelled, partial."""
    precedence = (Status.FAILED, Status.CANCELLED, Status.PARTIAL)
    return next((status for status in precedence if status in statuses), Status.COMPLETED)


def _after_abort(partition: JobPartition) -> None:
    """The run raised: a shut-down worker's partition is re-queued, a bug fails it."""
    try:
        status = None  # unless the run ended after its log was created:
        if partition.log_id is not None:
            logs = BatchProcessingLog.objects.filter(pk=partition.log_id)
            status = logs.values_list("status", flat=True).first()
        if status == LogStatus.INTERRUPTED:
            requeue(partition.pk, partition.attempts, partition.log_id, SHUT_DOWN)
        elif status in PARTITION_STATUS:
            finish_partition(partition, status)
        # Still "running": the end could not be recorded; the reapers will see it.
    except DatabaseError:
        logger.exception("could not record the end of job partition %s", partition.pk)


def requeue(partition_id: int, attempts: int, log_id: int | None, reason: str) -> bool:
    """Queue a partition again (if its owner is still ``attempts``) and enqueue it."""
    with transaction.atomic():
        requeued = JobPartition.objects.filter(
            pk=partition_id, status=Status.RUNNING, attempts=attempts
        ).update(status=Status.QUEUED, queued_at=timezone.now(), worker="")
        if not requeued:
            return False
        if log_id is not None:
            BatchProcessingLog.objects.filter(pk=log_id, status=LogStatus.RUNNING).update(
                status=LogStatus.INTERRUPTED, error_summary=reason
            )
        transaction.on_commit(partial(enqueue_partition, partition_id), robust=True)
    return True


def reap_stale_partitions(*, stale_after: timedelta | None = None) -> int:
    """Re-queue running partitions whose worker is dead or silent; return how many.

    Each by a conditional UPDATE: two reapers never both take one over. A live
    worker must commit a chunk every ``JOB_STALE_SECONDS`` or be taken over.
    """
    if stale_after is None:
        stale_after = timedelta(seconds=settings.JOB_STALE_SECONDS)
    cutoff = timezone.now() - stale_after
    host = socket.gethostname()
    running = JobPartition.objects.filter(status=Status.RUNNING).values_list(
        "pk", "attempts", "worker", "claimed_at", "log_id", "log__heartbeat_at"
    )
    requeued = 0
    for pk, attempts, worker, claimed_at, log_id, heartbeat_at in running:
        # Silent: neither the claim nor the run's last heartbeat is after the cutoff.
        silent = max(filter(None, (claimed_at, heartbeat_at)), default=cutoff) <= cutoff
        reason = interruption(worker, host, silent, stale_after)
        if reason is not None and requeue(pk, attempts, log_id, reason):
            logger.warning("job partition %s taken over: %s", pk, reason)
            requeued += 1
    return requeued
