"""The background tasks of a job: one per partition, and a watchdog per job.

Design
------
A partition is owned by whoever claimed it last: claiming locks the partition
row, requires it to be ``queued``, and sets it ``running`` with this worker's
``hostname:pid`` and one more ``attempts``. Every later write about the
partition (finished, re-queued) repeats ``status=running, attempts=N`` in its
WHERE clause, so a worker that lost its partition to a take-over cannot
record anything for it any more.

The first claim creates the partition's ``BatchProcessingLog`` row (as an
interrupted run at checkpoint 0) and every attempt, the first included,
*resumes* it: the engine skips the rows up to the checkpoint, which it commits
in the same transaction as the chunk it describes, so a partition's rows land
exactly once however often it is taken over. Its log's ``resume_count``
therefore counts attempts.

Before each attempt's run, the worker stages the keys its partition's
repeats are found by (``jobs.staging.key_partitions``); a partition keyed
once is not keyed again.

Take-over does not depend on the task backend's own bookkeeping (a
``db_worker`` killed with SIGKILL leaves its task row "RUNNING" forever). A
running partition is stale when its worker is on this host and its pid is gone,
or when neither its claim nor its log's heartbeat (stamped after every chunk) is
newer than ``settings.JOB_STALE_SECONDS``. Stale partitions are re-queued and
enqueued again by ``reap_stale_partitions``, which runs

* at the start of every partition task (on whichever worker picks it up),
* in each job's watchdog task, re-deferred every ``settings.JOB_WATCH_SECONDS``
  until the job finishes (on backends that support ``run_after``),
* and from ``manage.py reap_jobs`` (cron, or by hand).

Cancelling and resuming a job is ``jobs.control``'s: a partition asked to stop
ends as ``cancelled`` when its run does (``PARTITION_STATUS``).

Note:
    A live worker must commit a chunk at least every ``JOB_STALE_SECONDS``,
    or another worker may take its partition over while it still writes; the
    same assumption as ``BULK_STALE_RUN_SECONDS`` for ``mark_interrupted_runs``.
    A dead pid on the same host is detected at once.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.tasks import task
from django.utils import timezone

from batching.engine import (
    DUPLICATE_IN_INPUT,
    BatchOperation,
    RowInvalid,
    run_batch,
    worker_name,
)
from batching.liveness import NO_HEARTBEAT, WORKER_GONE, parse_worker, pid_alive
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
PARTITION_STATUS: dict[str, Status] = {
    LogStatus.COMPLETED: Status.COMPLETED,
    LogStatus.PARTIAL: Status.PARTIAL,
    LogStatus.FAILED: Status.FAILED,
    LogStatus.CANCELLED: Status.CANCELLED,
}


# One partition class per operation name, made on first use.
_partition_operations: dict[str, type[BatchOperation]] = {}


def partition_operation(name: str) -> type[BatchOperation]:
    """The registered operation ``name`` (optimized), reporting the stand-ins of
    ``jobs.staging.staged_input`` like one run would: a ``RepeatedKey`` as a
    duplicate, a ``Refused`` as its error."""
    name = str(name)
    if name not in _partition_operations:
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

        PartitionOperation.__name__ = f"Partition{base.__name__}"
        PartitionOperation.__qualname__ = PartitionOperation.__name__
        _partition_operations[name] = PartitionOperation
    return _partition_operations[name]


# -- the tasks -------------------------------------------------------------------


@task
def run_partition(partition_id: int) -> dict[str, Any]:
    """Claim a queued partition and run (or resume) it; a no-op when it is not queued.

    A task delivered twice, or one whose partition another worker holds,
    finds the partition not queued and returns.
    """
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
            status = run_batch(
                partition_operation(partition.job.operation)(),
                partition_input(partition),
                resume=log.pk,
            ).status
        except BaseException:
            _after_abort(partition)
            raise
    finish_partition(partition, status)
    return {"partition": partition_id, "ran": True, "log_id": log.pk, "status": str(status)}


def _keyed(partition: JobPartition, log: BatchProcessingLog) -> None:
    """``key_partitions``, heartbeating the log; a failure that is not the
    database's fails the run (a requeue would only meet it again)."""
    logs = BatchProcessingLog.objects.filter(pk=log.pk)
    try:
        key_partitions(partition, alive=lambda: logs.update(heartbeat_at=timezone.now()))
    except DatabaseError:
        raise  # the database's: re-queued, as for a shut-down worker
    except Exception as exc:
        logs.update(
            status=LogStatus.FAILED,
            finished_at=timezone.now(),
            error_summary=KEYING_FAILED.format(error=repr(exc)[:500]),
        )
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


# -- claiming, finishing, re-queueing -------------------------------------------------


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
            # Created as an interrupted run at checkpoint 0: every attempt,
            # the first too, resumes it (see the module docstring).
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
        partition.status = Status.RUNNING
        partition.log = log
        partition.worker = worker
        partition.claimed_at = now
        partition.attempts += 1
        JobPartition.objects.filter(pk=partition.pk).update(
            status=Status.RUNNING,
            log=log,
            worker=worker,
            claimed_at=now,
            attempts=F("attempts") + 1,
        )
        Job.objects.filter(pk=partition.job_id, status=Status.QUEUED).update(status=Status.RUNNING)
    return partition, log


def finish_partition(partition: JobPartition, log_status: str) -> None:
    """Record the partition's end; the last partition to end finishes the job.

    The job row is locked, so of two partitions ending at once the second
    sees the first one's end and finishes the job.
    """
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
            job.status = job_status(statuses)
            job.finished_at = now
            job.save(update_fields=["status", "finished_at"])
            if job.status in (Status.COMPLETED, Status.PARTIAL):
                # Nothing will run again: its keys go (robust: the job's end stands).
                transaction.on_commit(partial(discard_keys, job.pk), robust=True)


def job_status(statuses: set[str]) -> str:
    """A finished job's status from its partitions' (in this order of precedence):

    failed if a partition failed, cancelled if one was, partial if one skipped rows.
    """
    if Status.FAILED in statuses:
        return Status.FAILED
    if Status.CANCELLED in statuses:
        return Status.CANCELLED
    if Status.PARTIAL in statuses:
        return Status.PARTIAL
    return Status.COMPLETED


def _after_abort(partition: JobPartition) -> None:
    """The run raised: a shut-down worker's partition is re-queued, a bug fails it."""
    try:
        status = (
            BatchProcessingLog.objects.filter(pk=partition.log_id)
            .values_list("status", flat=True)
            .first()
            if partition.log_id is not None
            else None  # the run ended before its log was created
        )
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

    One query reads the running partitions (never their rows); each stale
    one is re-queued by a conditional UPDATE, so two reapers never both
    take the same partition over.
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
        worker_host, pid = parse_worker(worker)
        if worker_host == host and pid is not None and not pid_alive(pid):
            reason = WORKER_GONE
        elif max(filter(None, (claimed_at, heartbeat_at)), default=cutoff) <= cutoff:
            reason = NO_HEARTBEAT.format(seconds=round(stale_after.total_seconds()))
        else:
            continue
        if requeue(pk, attempts, log_id, reason):
            logger.warning("job partition %s taken over: %s", pk, reason)
            requeued += 1
    return requeued
