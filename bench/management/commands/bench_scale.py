"""``manage.py bench_scale`` (``bench.scale``); with ``--one``, the child that runs one strategy."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import scale as bench
from bench.report import (
    add_files,
    add_seed,
    parse_names,
    parse_sizes,
    require_postgresql,
    write_outputs,
)
from bench.workloads import WORKLOADS, pgbulk

NEEDS_POSTGRESQL = (
    "bench_scale measures COPY and django-pgbulk, which need PostgreSQL; this database is "
    "{vendor}. Set DATABASE_URL=postgres://user@host:5432/name"
)
NEEDS_PGBULK = 'django-pgbulk is not installed: pip install -e ".[bench]"'
CHUNK_SIZE_TOO_SMALL = "--chunk-size must be at least 1, not {value}"
BUDGET_NOT_POSITIVE = "--peer-budget must be more than 0 seconds, not {value}"
REPEAT_TOO_SMALL = "--repeat must be at least 1, not {value}"
STRATEGY_WITHOUT_ONE = "--strategy is only for --one"
ONE_NEEDS = "--one runs one strategy at one size: give --strategy and a single --sizes value"
NO_WORK_DIR = "--work-dir {path} is not a directory"


class Command(BaseCommand):
    help = (
        "Benchmark the optimized service against raw COPY, django-pgbulk and Django's bulk "
        "methods on the same deterministic rows at several sizes (PostgreSQL only). Each "
        "strategy runs in a fresh child process, from the same starting state, and must leave "
        "the same end state; the figures are rows/s, the optimized service's speed relative "
        "to each peer, and peak memory growth. Writes Markdown, JSON and SVG charts on request. "
        "Rows live in the benchmark namespace ('bench-' users, 'BENCH-' skus), removed after."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add = parser.add_argument
        add(
            "--sizes",
            default=",".join(str(size) for size in bench.DEFAULT_SIZES),
            help="Comma-separated row counts (default: 10000,100000,1000000). "
            "Orders run at 10,000 at most.",
        )
        add(
            "--workloads",
            default="all",
            help=f"Comma-separated, from {', '.join(WORKLOADS)} (default: all).",
        )
        add(
            "--chunk-size",
            type=int,
            help="Rows per chunk for the service and the chunked peers "
            "(default: 50,000, and 20,000 for the import: the scale figures' chunks).",
        )
        add_seed(parser, "Seed of the generated rows")
        add_files(
            parser,
            "Write every measurement as JSON here.",
            {"--chart": "throughput (rows/s)", "--memory-chart": "peak memory growth"},
        )
        add(
            "--work-dir",
            type=Path,
            help="Directory for the generated import files (default: a temporary one).",
        )
        add(
            "--peer-budget",
            type=float,
            default=bench.DEFAULT_PEER_BUDGET,
            help="Seconds a peer (django-pgbulk, Django, naive) may be projected to take at a "
            "size, from its time at the previous size, before it is skipped there "
            f"(default: {bench.DEFAULT_PEER_BUDGET:.0f}).",
        )
        add(
            "--repeat",
            type=int,
            default=1,
            help="Run each strategy up to this many times, each from the same start, the "
            "strategies taking turns, and keep the fastest; a strategy runs again only while its "
            f"runs took under {bench.REPEAT_BUDGET:.0f} s in all (default: 1).",
        )
        add(
            "--in-process",
            action="store_true",
            help="Run every strategy in this process: faster, but no memory figures.",
        )
        add(
            "--one",
            metavar="WORKLOAD",
            help="Internal: run one strategy of WORKLOAD (set up by the parent) in this "
            "process and print its time and peak memory growth as JSON.",
        )
        add("--strategy", help="With --one: the strategy key (optimized, raw, ...).")

    def handle(self, *args: Any, **options: Any) -> None:
        sizes = parse_sizes(options["sizes"])
        chunk_size: int | None = options["chunk_size"]
        one, strategy, budget, repeat = (
            options[k] for k in ("one", "strategy", "peer_budget", "repeat")
        )
        for failed, message, value in (
            (chunk_size is not None and chunk_size < 1, CHUNK_SIZE_TOO_SMALL, chunk_size),
            (budget <= 0, BUDGET_NOT_POSITIVE, budget),
            (repeat < 1, REPEAT_TOO_SMALL, repeat),
            (strategy and not one, STRATEGY_WITHOUT_ONE, None),
            (one and (not strategy or len(sizes) != 1), ONE_NEEDS, None),
        ):
            if failed:
                raise CommandError(message.format(value=value))
        workloads = parse_names(one or options["workloads"], WORKLOADS, "--workloads", "workload")
        work_dir: Path | None = options["work_dir"]
        if work_dir is not None and not work_dir.is_dir():
            raise CommandError(NO_WORK_DIR.format(path=work_dir))
        require_postgresql(NEEDS_POSTGRESQL)
        if pgbulk is None:
            raise CommandError(NEEDS_PGBULK)
        seed: int = options["seed"]
        if one:
            cls = WORKLOADS[workloads[0]]
            try:
                cls.strategy(strategy)
            except KeyError as exc:
                raise CommandError(exc.args[0]) from None
            workload = cls(sizes[0], seed=seed, chunk_size=chunk_size, work_dir=work_dir)
            timing = bench.run_strategy(workload, strategy, measure_memory=True)
            self.stdout.write(json.dumps(asdict(timing)))
            return
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary:
            progress = self.stdout.write if options["verbosity"] >= 1 else None
            run = {"seed": seed, "chunk_size": chunk_size, "peer_budget": budget, "repeat": repeat}
            report = bench.run_scale_bench(
                workloads,
                sizes,
                work_dir=work_dir or Path(temporary),
                progress=progress,
                isolate=not options["in_process"],
                **run,
            )
        command_line = (
            f"python manage.py bench_scale --sizes {','.join(map(str, sizes))} "
            f"--workloads {','.join(workloads)} "
            + (f"--chunk-size {chunk_size} " if chunk_size else "")
            + f"--seed {seed} --peer-budget {budget:g} --repeat {repeat}"
        )
        write_outputs(self, options, report, bench.markdown_report, command_line, bench.CHARTS)
