"""Finding runs whose process died: "running" must not mean "running forever".

A running log is interrupted when its worker (``hostname:pid``) is on this
host and the pid is gone, or its heartbeat (stamped at the start and by every
checkpoint) is older than ``settings.BULK_STALE_RUN_SECONDS`` (another host, a
stuck process, a reused pid). It keeps its checkpoint and can be resumed; the
chunk in flight was rolled back when the connection died.

Note:
    A killed child stays a zombie, its pid "alive", until its parent reaps it.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from itertools import batched

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from batching.models import BatchProcessingLog

WORKER_GONE = "interrupted: its worker process on this host is no longer running"
NO_HEARTBEAT = "interrupted: no heartbeat for more than {seconds} seconds"

# Ids per UPDATE: well under SQLite's limit on query parameters.
UPDATE_BATCH_SIZE = 500


def parse_worker(worker: str) -> tuple[str, int | None]:
    """("host", pid) from "host:pid"; pid None when there is none to check."""
    host, _, pid = worker.rpartition(":")
    if not host or not pid.isdigit() or int(pid) <= 0:
        # os.kill(0, ...) would signal our own process group: never ask for it.
        return worker, None
    return host, int(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks only)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def mark_interrupted_runs(*, stale_after: timedelta | None = None, using: str = "default") -> int:
    """Mark running logs whose worker is dead or silent as interrupted; return how many.

    One query reads the running logs, then one UPDATE per reason and batch of
    ids, repeating its condition: a run that finished or was resumed meanwhile
    is left alone.
    """
    if stale_after is None:
        stale_after = timedelta(seconds=settings.BULK_STALE_RUN_SECONDS)
    cutoff = timezone.now() - stale_after
    host = socket.gethostname()
    running = BatchProcessingLog.objects.using(using).filter(
        status=BatchProcessingLog.Status.RUNNING
    )
    gone: list[int] = []
    dead_workers: set[str] = set()
    stale: list[int] = []
    for pk, worker, heartbeat_at, started_at in running.values_list(
        "pk", "worker", "heartbeat_at", "started_at"
    ):
        worker_host, pid = parse_worker(worker)
        if worker_host == host and pid is not None and not pid_alive(pid):
            gone.append(pk)
            dead_workers.add(worker)
        elif (heartbeat_at or started_at) < cutoff:
            stale.append(pk)

    silent = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    plans = [
        (gone, Q(worker__in=dead_workers), WORKER_GONE),
        (stale, silent, NO_HEARTBEAT.format(seconds=round(stale_after.total_seconds()))),
    ]
    marked = 0
    for ids, condition, summary in plans:
        for batch in batched(ids, UPDATE_BATCH_SIZE):
            marked += running.filter(condition, pk__in=batch).update(
                status=BatchProcessingLog.Status.INTERRUPTED, error_summary=summary
            )
    return marked
