"""``manage.py reap_jobs``: re-queue job partitions whose worker died."""

from __future__ import annotations

from typing import Any

from batching.liveness import StaleAfterCommand
from jobs.tasks import reap_stale_partitions


class Command(StaleAfterCommand):
    help = (
        "Re-queue running job partitions whose worker process on this host is gone or "
        "which committed nothing for --stale-after seconds, and enqueue them again: "
        "another worker resumes each from its checkpoint. Workers and each job's "
        "watchdog do this too; run it from cron where the backend cannot defer tasks."
    )
    stale_setting = "JOB_STALE_SECONDS"
    stale_help = "Take a partition over when its worker is silent this long"

    def handle(self, *args: Any, **options: Any) -> None:
        requeued = reap_stale_partitions(stale_after=self.stale_after(options))
        if options["verbosity"] >= 1:
            noun = "partition" if requeued == 1 else "partitions"
            self.stdout.write(f"{requeued} {noun} re-queued.")
