"""``manage.py mark_interrupted_runs``: show dead runs as interrupted, not running."""

from __future__ import annotations

from typing import Any

from batching.liveness import StaleAfterCommand, mark_interrupted_runs
from batching.models import BatchProcessingLog

# How many resumable runs the listing shows at verbosity 2.
LISTED_RUNS = 20


class Command(StaleAfterCommand):
    help = (
        "Mark running batch runs as interrupted when their process on this host is gone "
        "or their heartbeat is older than --stale-after seconds. Interrupted runs can be "
        "resumed with the import commands' --resume option."
    )
    stale_setting = "BULK_STALE_RUN_SECONDS"
    stale_help = "Treat a run as interrupted when its last heartbeat is older than this"

    def handle(self, *args: Any, **options: Any) -> None:
        marked = mark_interrupted_runs(stale_after=self.stale_after(options))
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
