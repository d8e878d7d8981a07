"""``manage.py bench_live``: bulk operations beside a live shop (``bench.live``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import live
from bench.report import (
    add_files,
    add_seed_and_repeat,
    parse_names,
    require_postgresql,
    write_outputs,
)

NEEDS_POSTGRESQL = (
    "bench_live measures PostgreSQL's locks and COPY; this database is {vendor}. "
    "Set DATABASE_URL=postgres://user@host:5432/name"
)
BAD_CHUNKS = (
    "--chunks must be comma-separated 'default', 'volume' or whole numbers of at least 1, "
    "not {value!r}"
)
NOT_POSITIVE = "{option} must be more than 0, not {value}"


def parse_chunks(value: str) -> list[live.Chunk]:
    chunks: list[live.Chunk] = []
    for part in map(str.strip, value.split(",")):
        if part not in live.ENTRY_POINT_DEFAULTS and not (part.isdigit() and int(part) >= 1):
            raise CommandError(BAD_CHUNKS.format(value=value))
        chunks.append(part if part in live.ENTRY_POINT_DEFAULTS else int(part))
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
        add = parser.add_argument
        sizes = ", ".join(f"{n} {cls.size_at_scale_1:,}" for n, cls in live.OPERATIONS.items())
        choices = ", ".join(live.OPERATIONS)
        add("--operations", default="all", help=f"Comma-separated, from {choices} (default: all).")
        add(
            "--scale",
            type=float,
            default=1.0,
            help=f"Multiply every operation's rows by this (default 1: {sizes}).",
        )
        add(
            "--chunks",
            default=",".join(map(str, live.DEFAULT_CHUNKS)),
            help="Comma-separated chunk settings of the service: 'default' (no chunk_size "
            "given: BULK_CHUNK_SIZE), 'volume' (the import commands' and jobs' default: "
            "BULK_VOLUME_CHUNK_SIZE) or rows per chunk (default: default,volume,50000).",
        )
        add(
            "--idle-seconds",
            type=float,
            default=live.DEFAULT_IDLE_SECONDS,
            help="How long the players run alone first, for the idle figures "
            f"(default: {live.DEFAULT_IDLE_SECONDS:g}).",
        )
        add_seed_and_repeat(
            parser,
            "Seed of the generated rows and the players' choices",
            "Run the raw limit and each setting this many times, taking turns; the fastest "
            "run's time counts and the latencies of all runs are pooled (default: 1).",
        )
        add_files(
            parser,
            "Write every run's figures as JSON here.",
            {"--chart": "live p99 and max latency"},
        )

    def handle(self, *args: Any, **options: Any) -> None:
        operations = parse_names(
            options["operations"], live.OPERATIONS, "--operations", "operation"
        )
        chunks = parse_chunks(options["chunks"])
        for option in ("scale", "idle_seconds"):
            if options[option] <= 0:
                name = "--" + option.replace("_", "-")
                raise CommandError(NOT_POSITIVE.format(option=name, value=options[option]))
        require_postgresql(NEEDS_POSTGRESQL)
        progress = self.stdout.write if options["verbosity"] >= 1 else None
        with tempfile.TemporaryDirectory(prefix="bench-live-") as work_dir:
            figures = {key: options[key] for key in ("scale", "idle_seconds", "seed", "repeat")}
            report = live.run_live_bench(
                operations, chunks=chunks, work_dir=Path(work_dir), progress=progress, **figures
            )
        command_line = (
            f"python manage.py bench_live --operations {','.join(operations)} "
            f"--scale {options['scale']:g} --chunks {','.join(map(str, chunks))} "
            f"--idle-seconds {options['idle_seconds']:g} --seed {options['seed']} "
            f"--repeat {options['repeat']}"
        )
        write_outputs(self, options, report, live.markdown_report, command_line, live.CHARTS)
