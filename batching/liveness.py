"""Finding runs whose process died: "running" must not mean "running forever".

The one rule for a dead or silent worker (``interruption``), for batch runs
here and job partitions in ``jobs.tasks``. An interrupted run keeps its
checkpoint and can be resumed; the chunk in flight was rolled back.

Note:
    A killed child stays a zombie, its pid "alive", until its parent reaps it.
"""

from __future__ import annotations

import os
import socket
from argparse import ArgumentParser
from datetime import timedelta
from itertools import batched
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db.models import Q
from django.utils import timezone

from batching.models import BatchProcessingLog
from common.cli import positive_int

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


def interruption(worker: str, host: str, silent: bool, stale_after: timedelta) -> str | None:
    """Why the work of ``worker`` ("host:pid") is interrupted, None if it is not: its
    pid is gone from this ``host``, or it is ``silent`` (each caller reads its own
    record's last sign of life against ``stale_after``)."""
    worker_host, pid = parse_worker(worker)
    if worker_host == host and pid is not None and not pid_alive(pid):
        return WORKER_GONE
    return NO_HEARTBEAT.format(seconds=round(stale_after.total_seconds())) if silent else None


def mark_interrupted_runs(*, stale_after: timedelta | None = None, using: str = "default") -> int:
    """Mark running logs whose worker is dead or silent (its heartbeat, else its start,
    older than ``BULK_STALE_RUN_SECONDS``) as interrupted; return how many.

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
    stale = NO_HEARTBEAT.format(seconds=round(stale_after.total_seconds()))
    ids: dict[str, list[int]] = {WORKER_GONE: [], stale: []}
    dead_workers: set[str] = set()
    for pk, worker, heartbeat_at, started_at in running.values_list(
        "pk", "worker", "heartbeat_at", "started_at"
    ):
        # Silent: the heartbeat, else the start, before the cutoff (as the UPDATE repeats).
        reason = interruption(worker, host, (heartbeat_at or started_at) < cutoff, stale_after)
        if reason is not None:
            ids[reason].append(pk)
        if reason == WORKER_GONE:
            dead_workers.add(worker)

    silent = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    conditions = {WORKER_GONE: Q(worker__in=dead_workers), stale: silent}
    marked = 0
    for reason, condition in conditions.items():
        for batch in batched(ids[reason], UPDATE_BATCH_SIZE):
            marked += running.filter(condition, pk__in=batch).update(
                status=BatchProcessingLog.Status.INTERRUPTED, error_summary=reason
            )
    return marked


class StaleAfterCommand(BaseCommand):
    """A command with ``--stale-after SECONDS``, by default the ``stale_setting``."""

    stale_setting: str
    stale_help: str

    def add_arguments(self, parser: ArgumentParser) -> None:
        default = getattr(settings, self.stale_setting)
        parser.add_argument(
            "--stale-after",
            type=positive_int,
            default=None,
            metavar="SECONDS",
            help=f"{self.stale_help} (default: settings.{self.stale_setting}, now {default}).",
        )

    @staticmethod
    def stale_after(options: dict[str, Any]) -> timedelta | None:
        seconds = options["stale_after"]
        return None if seconds is None else timedelta(seconds=seconds)
