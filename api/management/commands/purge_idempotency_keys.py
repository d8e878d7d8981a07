"""``manage.py purge_idempotency_keys [--older-than DAYS]``: delete old idempotency records."""

from __future__ import annotations

from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand
from django.utils import timezone

from api.models import IdempotencyRecord
from common.cli import positive_int

DEFAULT_DAYS = 7


class Command(BaseCommand):
    help = (
        "Delete Idempotency-Key records created more than --older-than days ago: a client "
        "retrying with such a key afterwards runs its request again. One DELETE, served by "
        "the created_at index; run it from cron."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            type=positive_int,
            default=DEFAULT_DAYS,
            metavar="DAYS",
            help=f"Age in days of the records to delete (default {DEFAULT_DAYS}).",
        )

    def handle(self, *args: Any, older_than: int, **options: Any) -> None:
        cutoff = timezone.now() - timedelta(days=older_than)
        deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
        if options["verbosity"] >= 1:
            self.stdout.write(
                f"Deleted {deleted:,} idempotency records older than {older_than} days."
            )
