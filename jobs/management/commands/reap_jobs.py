"""``manage.py reap_jobs``: re-queue job partitions whose worker died."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from common.cli import positive_int
from jobs.tasks import reap_stale_partitions


class Command(BaseCommand):
    help = (
        "Re-queue running job partitions whose worker process on this host is gone or "
        "which committed nothing for --stale-after seconds, and enqueue them again: "
        "another worker resumes each from its checkpoint. Workers and each job's "
        "watchdog do this too; run it from cron where the backend cannot defer tasks."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=positive_int,
            default=None,
            metavar="SECONDS",
            help=(
                "Take a partition over when its worker is silent this long "
                f"(default: settings.JOB_STALE_SECONDS, now {settings.JOB_STALE_SECONDS})."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        seconds = options["stale_after"]
        requeued = reap_stale_partitions(
            stale_after=None if seconds is None else timedelta(seconds=seconds)
        )
        if options["verbosity"] >= 1:
            noun = "partition" if requeued == 1 else "partitions"
            self.stdout.write(f"{requeued} {noun} re-queued.")
