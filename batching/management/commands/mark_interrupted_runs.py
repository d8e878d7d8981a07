"""``manage.py mark_interrupted_runs``: show dead runs as interrupted, not running."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from batching.liveness import mark_interrupted_runs
from batching.models import BatchProcessingLog
from common.cli import positive_int

# How many resumable runs the listing shows at verbosity 2.
LISTED_RUNS = 20


class Command(BaseCommand):
    help = (
        "Mark running batch runs as interrupted when their process on this host is gone "
        "or their heartbeat is older than --stale-after seconds. Interrupted runs can be "
        "resumed with the import commands' --resume option."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=positive_int,
            default=None,
            metavar="SECONDS",
            help=(
                "Treat a run as interrupted when its last heartbeat is older than this "
                "(default: settings.BULK_STALE_RUN_SECONDS, now "
                f"{settings.BULK_STALE_RUN_SECONDS})."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        seconds = options["stale_after"]
        stale_after = timedelta(seconds=seconds) if seconds is not None else None
        marked = mark_interrupted_runs(stale_after=stale_after)
        verbosity = options["verbosity"]
        if verbosity >= 1:
            noun = "run" if marked == 1 else "runs"
            self.stdout.write(f"{marked} {noun} marked interrupted.")
        if verbosity >= 2:
            interrupted = BatchProcessingLog.objects.filter(
                status=BatchProcessingLog.Status.INTERRUPTED
            ).only("pk", "operation", "variant", "checkpoint_position", "error_summary")
            for log in interrupted[:LISTED_RUNS]:
                self.stdout.write(
                    f"  #{log.pk} {log.operation} ({log.variant}): committed up to row "
                    f"{log.checkpoint_position:,}; {log.error_summary}"
                )
