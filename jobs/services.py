"""Submitting background jobs, and whether workers are there to run them.

``submit_job`` stages the input (``jobs.staging``), names partitions of
``settings.JOB_PARTITION_ROWS`` rows in it and enqueues one ``django.tasks``
task per partition once the job is committed (``transaction.on_commit``): a
worker never sees a job that is not in the database yet, and a job submitted
inside a transaction that rolls back is never run.

A submitter that wants to look at its input before running it (the admin's
import: preview, then confirm) holds the job instead (``hold_job``): the input
is staged, once, and nothing is queued. A dry run of its first rows
(``check_job``) says what the runs would do, writing nothing; then the job is
released to the workers (``release_job``), run whole in the calling process
(``run_held_job``, for an input small enough for a request) or discarded
(``discard_job``). Held jobs nobody came back for are swept by
``discard_held_jobs``.
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
    """Stage ``rows`` as a job of ``operation`` and enqueue its partitions.

    Args:
        operation: the name of a registered operation (``batching.registry``).
        rows: the input: rows as the service's method takes them (dicts), in
            any iterable, or a file's records (``batching.readers.RecordStream``). It
            is read once, in a stream, and staged unparsed (``jobs.staging``).
        created_by: the user who submitted it (an anonymous user counts as none).

    Raises:
        ValueError: an unknown operation. Bad rows never raise: the partitions'
            runs report them, indexed in the whole input.

    Keys repeated in the input (sku, order reference, score key) are found
    by the workers, across partitions, and reported as duplicates like a
    single run would; everything else is validated by the runs.
    """
    with transaction.atomic():
        job = _staged_job(operation, rows, created_by, Status.QUEUED)
        _partition(job)
    return job


def hold_job(*, operation: str, rows: Iterable[Any] | Records, created_by: Any = None) -> Job:
    """Stage ``rows`` as a held job of ``operation``: nothing is queued yet.

    The arguments and the staging are ``submit_job``'s. The job waits for
    ``release_job``, ``run_held_job`` or ``discard_job``; one left held longer
    than its submitter cares is swept by ``discard_held_jobs``.
    """
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
    if job.status != Status.HELD and not job.rows_total:
        # Nothing to run: an empty job is complete at once.
        job.status, job.finished_at = Status.COMPLETED, timezone.now()
    job.save(update_fields=["rows_total", "status", "finished_at", "input_format", "columns"])
    return job


def _partition(job: Job) -> None:
    """Name the job's partitions (one INSERT) and enqueue them once committed."""
    now = timezone.now()
    size = job.partition_size
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


def release_job(job: Job) -> None:
    """Queue a held job's partitions, as ``submit_job`` would have; updates ``job``.

    Raises:
        ValueError: the job is not held (released, run or discarded already).
    """
    with transaction.atomic():
        # An empty job is complete at once, as submit_job makes it.
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
    """A dry run of the job's first ``rows`` rows (``batching.engine.dry_run``).

    What its runs would do with them, writing nothing: the operation's own
    ``prepare``, duplicate keys and ``check``. The staged rows are read one
    chunk (``settings.BULK_CHUNK_SIZE``) at a time, one query each.
    """
    size = settings.BULK_CHUNK_SIZE
    stop = min(rows, job.rows_total)
    chunks = (staged_input(job, start, min(start + size, stop)) for start in range(0, stop, size))
    return dry_run(
        partition_operation(job.operation)(),
        (row for chunk in chunks for row in chunk),
        chunk_size=size,
    )


def run_held_job(job: Job) -> BatchResult:
    """Run a held job's whole input now, in this process, as one run; then discard the job.

    For an input small enough for a request: its staged rows are read into a
    list first (one query), since the engine reads ahead in a helper thread.
    A run that raises before committing anything leaves the job held, to be
    run (or released) again; once anything is committed the job is discarded
    whatever happens, since its input must not run twice.

    Raises:
        ValueError: the job is not held.
    """
    if job.status != Status.HELD:
        raise ValueError(NOT_HELD.format(job_id=job.pk))
    rows = staged_input(job, 0, job.rows_total)
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
