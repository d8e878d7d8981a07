"""``manage.py bench_live``: bulk operations while a live shop checks out and saves products.

The command parses options, checks the database and writes the outputs; the
runs, the players and the report live in ``bench.live`` and ``bench.players``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import live
from bench.namespace import DEFAULT_SEED, require_postgresql
from common.cli import positive_int

ALL = "all"
NEEDS_POSTGRESQL = (
    "bench_live measures PostgreSQL's locks and COPY; this database is {vendor}. "
    "Set DATABASE_URL=postgres://user@host:5432/name"
)
BAD_OPERATIONS = "unknown operation {name!r} in --operations: choose from {choices} or all"
BAD_CHUNKS = (
    "--chunks must be comma-separated 'default', 'volume' or whole numbers of at least 1, "
    "not {value!r}"
)
NOT_POSITIVE = "{option} must be more than 0, not {value}"
PROBLEMS = "the benchmark found problems (its figures are not trustworthy):\n{problems}"


def parse_operations(value: str) -> list[str]:
    if value == ALL:
        return list(live.OPERATIONS)
    names = [name.strip() for name in value.split(",")]
    for name in names:
        if name not in live.OPERATIONS:
            choices = ", ".join(live.OPERATIONS)
            raise CommandError(BAD_OPERATIONS.format(name=name, choices=choices))
    return list(dict.fromkeys(names))


def parse_chunks(value: str) -> list[live.Chunk]:
    chunks: list[live.Chunk] = []
    for part in value.split(","):
        part = part.strip()
        if part in live.ENTRY_POINT_DEFAULTS:
            chunks.append(part)
        elif part.isdigit() and int(part) >= 1:
            chunks.append(int(part))
        else:
            raise CommandError(BAD_CHUNKS.format(value=value))
    return list(dict.fromkeys(chunks))


class Command(BaseCommand):
    help = (
        "Run each bulk operation through the optimized service, at each chunk setting and as "
        "raw SQL, while two other processes play a live shop on the products the bulk rows "
        "reference: checkouts (one unit of stock per transaction) and admin saves (one "
        "product's price and stock per transaction). Reports bulk rows/s, its ratio to the raw "
        "SQL, and the live transactions' p50, p99 and max latency against idle (PostgreSQL "
        "only). Rows live in the benchmark namespace ('bench-' users, 'BENCH-' skus), removed "
        "after."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sizes = ", ".join(
            f"{name} {cls.size_at_scale_1:,}" for name, cls in live.OPERATIONS.items()
        )
        parser.add_argument(
            "--operations",
            type=str,
            default=ALL,
            help=f"Comma-separated, from {', '.join(live.OPERATIONS)} (default: all).",
        )
        parser.add_argument(
            "--scale",
            type=float,
            default=1.0,
            help=f"Multiply every operation's rows by this (default 1: {sizes}).",
        )
        parser.add_argument(
            "--chunks",
            type=str,
            default=",".join(map(live.setting_label, live.DEFAULT_CHUNKS)),
            help="Comma-separated chunk settings of the service: 'default' (no chunk_size "
            "given: BULK_CHUNK_SIZE), 'volume' (the import commands' and jobs' default: "
            "BULK_VOLUME_CHUNK_SIZE) or rows per chunk (default: default,volume,50000).",
        )
        parser.add_argument(
            "--idle-seconds",
            type=float,
            default=live.DEFAULT_IDLE_SECONDS,
            help="How long the players run alone first, for the idle figures "
            f"(default: {live.DEFAULT_IDLE_SECONDS:g}).",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=DEFAULT_SEED,
            help=f"Seed of the generated rows and the players' choices (default: {DEFAULT_SEED}).",
        )
        parser.add_argument(
            "--repeat",
            type=positive_int,
            default=1,
            help="Run the raw limit and each setting this many times, taking turns; the "
            "fastest run's time counts and the latencies of all runs are pooled (default: 1).",
        )
        parser.add_argument("--markdown", type=Path, help="Write the Markdown report here.")
        parser.add_argument("--json", type=Path, help="Write every run's figures as JSON here.")
        parser.add_argument(
            "--chart", type=Path, help="Write the SVG chart of live p99 and max latency here."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        operations = parse_operations(options["operations"])
        chunks = parse_chunks(options["chunks"])
        for option in ("scale", "idle_seconds"):
            if options[option] <= 0:
                name = "--" + option.replace("_", "-")
                raise CommandError(NOT_POSITIVE.format(option=name, value=options[option]))
        require_postgresql(NEEDS_POSTGRESQL)
        progress = self.stdout.write if options["verbosity"] >= 1 else None
        with tempfile.TemporaryDirectory(prefix="bench-live-") as work_dir:
            report = live.run_live_bench(
                operations,
                scale=options["scale"],
                chunks=chunks,
                idle_seconds=options["idle_seconds"],
                seed=options["seed"],
                work_dir=Path(work_dir),
                repeat=options["repeat"],
                progress=progress,
            )
        command_line = (
            f"python manage.py bench_live --operations {','.join(operations)} "
            f"--scale {options['scale']:g} --chunks {','.join(map(live.setting_label, chunks))} "
            f"--idle-seconds {options['idle_seconds']:g} --seed {options['seed']} "
            f"--repeat {options['repeat']}"
        )
        self.write_outputs(report, options, command_line)
        if report.problems:
            raise CommandError(PROBLEMS.format(problems="\n".join(report.problems)))

    def write_outputs(self, report: live.LiveReport, options: dict, command_line: str) -> None:
        for option in ("markdown", "json", "chart"):
            if options[option] is not None:
                options[option].parent.mkdir(parents=True, exist_ok=True)
        markdown_path: Path | None = options["markdown"]
        chart_path: Path | None = options["chart"]
        chart = None
        if chart_path is not None:
            chart_path.write_text(live.latency_chart(report) + "\n", encoding="utf-8")
            base = markdown_path.resolve().parent if markdown_path else Path.cwd()
            chart = os.path.relpath(chart_path.resolve(), base)
        if options["json"] is not None:
            options["json"].write_text(
                json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8"
            )
        markdown = live.markdown_report(
            report,
            command_line=command_line,
            chart=chart,
        )
        if markdown_path is not None:
            markdown_path.write_text(markdown, encoding="utf-8")
        elif options["verbosity"] >= 1:
            self.stdout.write(markdown)
