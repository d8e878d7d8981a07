"""``manage.py bench_workers``: one catalogue job on 1, 2 and 4 workers (``bench.workers``)."""

from __future__ import annotations

import tempfile
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from bench import workers
from bench.report import parse_sizes, print_markdown, require_postgresql
from common.cli import positive_int

NEEDS_POSTGRESQL = (
    "bench_workers runs workers on other processes, which share the database: "
    "PostgreSQL only; this database is {vendor}"
)
BAD_BACKENDS = "--backends must be comma-separated, from {choices}, not {value!r}"


class Command(BaseCommand):
    help = (
        "Submit one catalogue job (import_products PATH --background) and run it on 1, 2 and "
        "4 worker processes, each in its own working directory, per task backend (db: "
        "db_worker; celery: Celery on CELERY_BROKER_URL). Reports rows/s per worker count, "
        "and the CPU seconds of the workers and of PostgreSQL, to show where the bottleneck "
        "moves (PostgreSQL only; the bench rows are removed after)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        add = parser.add_argument
        add("--size", type=positive_int, default=1_000_000, help="Catalogue rows (default: 1M).")
        add("--workers", default="1,2,4", help="Comma-separated worker counts (default: 1,2,4).")
        add("--backends", default="db,celery", help="Comma-separated, from db, celery.")
        add("--work-dir", type=Path, default=None, help="Where the CSV file is written.")
        add("--markdown", type=Path, help="Write the Markdown section here.")

    def handle(self, *args: Any, **options: Any) -> None:
        backends = [name.strip() for name in options["backends"].split(",") if name.strip()]
        if not backends or not set(backends) <= set(workers.BACKENDS):
            choices = ", ".join(workers.BACKENDS)
            raise CommandError(BAD_BACKENDS.format(choices=choices, value=options["backends"]))
        counts = parse_sizes(options["workers"])
        require_postgresql(NEEDS_POSTGRESQL)
        work_dir = options["work_dir"] or Path(tempfile.mkdtemp(prefix="bench-workers-"))
        try:
            results = workers.run_scale_out(options["size"], backends, counts, work_dir)
        except workers.BenchError as exc:
            raise CommandError(str(exc)) from exc
        command_line = (
            f"python manage.py bench_workers --size {options['size']} "
            f"--workers {options['workers']} --backends {options['backends']}"
        )
        print_markdown(self, options["markdown"], workers.markdown(results, command_line))
