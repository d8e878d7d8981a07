"""``manage.py purge_history [--older-than DAYS] [--dry-run]``: delete old finished history."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from common.cli import positive_int
from jobs.history import PURGE_BATCH_SIZE, count, purge


class Command(BaseCommand):
    help = (
        "Delete what finished more than --older-than days ago: completed jobs with their "
        "partitions (and input rows), completed batch logs, and finished task results of the "
        "database queue. What a resume needs stays, however old: failed, cancelled and "
        "unfinished jobs with their partitions and logs, and failed, interrupted, cancelled "
        "or running batch logs. Rows go --batch-size at a time, each DELETE in its own "
        "transaction; run it from cron (docs/operations-history.md)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=positive_int,
            default=None,
            metavar="DAYS",
            help=(
                "Age in days of the history to delete (default: the HISTORY_RETENTION_DAYS "
                f"setting and environment variable, now {settings.HISTORY_RETENTION_DAYS})."
            ),
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=PURGE_BATCH_SIZE,
            metavar="ROWS",
            help=f"Rows per DELETE and transaction (default {PURGE_BATCH_SIZE:,}).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count what would be deleted, and delete nothing.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        days = options["older_than"] or settings.HISTORY_RETENTION_DAYS
        if days < 1:
            raise CommandError(f"HISTORY_RETENTION_DAYS must be at least 1, not {days}")
        cutoff = timezone.now() - timedelta(days=days)
        if options["dry_run"]:
            done, verb = count(cutoff), "would delete"
        else:
            done, verb = purge(cutoff, batch_size=options["batch_size"]), "deleted"
        for name, rows in done:
            if options["verbosity"] >= 1:
                self.stdout.write(f"{name}: {verb} {rows:,} older than {days} days")
