"""``manage.py bench_submit``: staging a catalogue as a job, timed (``bench.submit``)."""

from __future__ import annotations

import json
import tempfile
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand

from bench import submit
from bench.report import parse_sizes, print_markdown, require_postgresql

NEEDS_POSTGRESQL = (
    "bench_submit compares staging with a raw COPY: PostgreSQL only; this database is {vendor}"
)


class Command(BaseCommand):
    help = (
        "Submit a generated catalogue CSV with `import_products PATH --background` in a fresh "
        "process at each size, and report the submit's time, rows/s against a raw COPY of the "
        "same lines, and the process's peak memory growth (PostgreSQL only). The jobs are "
        "deleted afterwards."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        add = parser.add_argument
        add(
            "--sizes",
            default="100000,1000000",
            help="Comma-separated catalogue rows (default: 100000,1000000).",
        )
        add("--work-dir", type=Path, default=None, help="Where the CSV files are written.")
        add("--markdown", type=Path, help="Write the Markdown section here.")
        add("--child", type=Path, help="Internal: submit this file and report.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["child"]:
            self.stdout.write(json.dumps(submit.submit_here(options["child"])))
            return
        require_postgresql(NEEDS_POSTGRESQL)
        sizes = parse_sizes(options["sizes"])
        work_dir = options["work_dir"] or Path(tempfile.mkdtemp(prefix="bench-submit-"))
        results = submit.run_submit_bench(sizes, work_dir)
        command_line = f"python manage.py bench_submit --sizes {options['sizes']}"
        print_markdown(self, options["markdown"], submit.markdown(results, command_line))
