"""``manage.py bench_scale``: the optimized service against raw COPY and its peers, at scale.

The command parses options, checks the database and writes the outputs;
measuring and the report live in ``bench.scale``, the workloads and their
strategies in ``bench.workloads``.
With ``--one`` it is the child process that runs and measures one strategy.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import scale as bench
from bench.namespace import DEFAULT_SEED, require_postgresql
from bench.workloads import WORKLOADS, pgbulk

ALL = "all"
NEEDS_POSTGRESQL = (
    "bench_scale measures COPY and django-pgbulk, which need PostgreSQL; this database is "
    "{vendor}. Set DATABASE_URL=postgres://user@host:5432/name"
)
NEEDS_PGBULK = 'django-pgbulk is not installed: pip install -e ".[bench]"'
BAD_SIZES = "--sizes must be comma-separated whole numbers of at least 1, not {value!r}"
BAD_WORKLOADS = "unknown workload {name!r} in --workloads: choose from {choices} or all"
CHUNK_SIZE_TOO_SMALL = "--chunk-size must be at least 1, not {value}"
BUDGET_NOT_POSITIVE = "--peer-budget must be more than 0 seconds, not {value}"
REPEAT_TOO_SMALL = "--repeat must be at least 1, not {value}"
STRATEGY_WITHOUT_ONE = "--strategy is only for --one"
ONE_NEEDS = "--one runs one strategy at one size: give --strategy and a single --sizes value"
NO_WORK_DIR = "--work-dir {path} is not a directory"
PROBLEMS = "the benchmark found problems (its figures are not trustworthy):\n{problems}"


def parse_sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",")]
    except ValueError:
        raise CommandError(BAD_SIZES.format(value=value)) from None
    if not sizes or min(sizes) < 1:
        raise CommandError(BAD_SIZES.format(value=value))
    return sorted(set(sizes))


def parse_workloads(value: str) -> list[str]:
    if value == ALL:
        return list(WORKLOADS)
    names = [name.strip() for name in value.split(",")]
    for name in names:
        if name not in WORKLOADS:
            choices = ", ".join(WORKLOADS)
            raise CommandError(BAD_WORKLOADS.format(name=name, choices=choices))
    return list(dict.fromkeys(names))


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
        parser.add_argument(
            "--sizes",
            type=str,
            default=",".join(str(size) for size in bench.DEFAULT_SIZES),
            help="Comma-separated row counts (default: 10000,100000,1000000). "
            "Orders run at 10,000 at most.",
        )
        parser.add_argument(
            "--workloads",
            type=str,
            default=ALL,
            help=f"Comma-separated, from {', '.join(WORKLOADS)} (default: all).",
        )
        parser.add_argument(
            "--chunk-size",
            type=int,
            default=None,
            help="Rows per chunk for the service and the chunked peers "
            "(default: 50,000, and 20,000 for the import: the scale figures' chunks).",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=DEFAULT_SEED,
            help=f"Seed of the generated rows (default: {DEFAULT_SEED}).",
        )
        parser.add_argument("--markdown", type=Path, help="Write the Markdown report here.")
        parser.add_argument("--json", type=Path, help="Write every measurement as JSON here.")
        parser.add_argument(
            "--chart", type=Path, help="Write the SVG chart of throughput (rows/s) here."
        )
        parser.add_argument(
            "--memory-chart", type=Path, help="Write the SVG chart of peak memory growth here."
        )
        parser.add_argument(
            "--work-dir",
            type=Path,
            help="Directory for the generated import files (default: a temporary one).",
        )
        parser.add_argument(
            "--peer-budget",
            type=float,
            default=bench.DEFAULT_PEER_BUDGET,
            help="Seconds a peer (django-pgbulk, Django, naive) may be projected to take at a "
            "size, from its time at the previous size, before it is skipped there "
            f"(default: {bench.DEFAULT_PEER_BUDGET:.0f}).",
        )
        parser.add_argument(
            "--repeat",
            type=int,
            default=1,
            help="Run each strategy up to this many times, each from the same start, the "
            "strategies taking turns, and keep the fastest; a strategy runs again only while "
            "its runs took under "
            f"{bench.REPEAT_BUDGET:.0f} s in all (default: 1).",
        )
        parser.add_argument(
            "--in-process",
            action="store_true",
            help="Run every strategy in this process: faster, but no memory figures.",
        )
        parser.add_argument(
            "--one",
            type=str,
            metavar="WORKLOAD",
            help="Internal: run one strategy of WORKLOAD (set up by the parent) in this "
            "process and print its time and peak memory growth as JSON.",
        )
        parser.add_argument(
            "--strategy", type=str, help="With --one: the strategy key (optimized, raw, ...)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        sizes = parse_sizes(options["sizes"])
        chunk_size: int | None = options["chunk_size"]
        if options["chunk_size"] is not None and options["chunk_size"] < 1:
            raise CommandError(CHUNK_SIZE_TOO_SMALL.format(value=options["chunk_size"]))
        if options["peer_budget"] <= 0:
            raise CommandError(BUDGET_NOT_POSITIVE.format(value=options["peer_budget"]))
        if options["repeat"] < 1:
            raise CommandError(REPEAT_TOO_SMALL.format(value=options["repeat"]))
        if options["strategy"] and not options["one"]:
            raise CommandError(STRATEGY_WITHOUT_ONE)
        if options["one"] and (not options["strategy"] or len(sizes) != 1):
            raise CommandError(ONE_NEEDS)
        workloads = parse_workloads(options["one"] or options["workloads"])
        work_dir: Path | None = options["work_dir"]
        if work_dir is not None and not work_dir.is_dir():
            raise CommandError(NO_WORK_DIR.format(path=work_dir))
        require_postgresql(NEEDS_POSTGRESQL)
        if pgbulk is None:
            raise CommandError(NEEDS_PGBULK)
        seed: int = options["seed"]

        if options["one"]:
            cls = WORKLOADS[workloads[0]]
            try:
                cls.strategy(options["strategy"])
            except KeyError as exc:
                raise CommandError(exc.args[0]) from None
            workload = cls(sizes[0], seed=seed, chunk_size=chunk_size, work_dir=work_dir)
            timing = bench.run_strategy(workload, options["strategy"], measure_memory=True)
            self.stdout.write(json.dumps(asdict(timing)))
            return

        with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary:
            report = bench.run_scale_bench(
                workloads,
                sizes,
                seed=seed,
                chunk_size=chunk_size,
                work_dir=work_dir or Path(temporary),
                isolate=not options["in_process"],
                peer_budget=options["peer_budget"],
                repeat=options["repeat"],
                progress=self.stdout.write if options["verbosity"] >= 1 else None,
            )
        command_line = (
            f"python manage.py bench_scale --sizes {','.join(map(str, sizes))} "
            f"--workloads {','.join(workloads)} "
            + (f"--chunk-size {chunk_size} " if chunk_size else "")
            + f"--seed {seed} "
            f"--peer-budget {options['peer_budget']:g} --repeat {options['repeat']}"
        )
        self.write_outputs(report, options, command_line)
        if report.problems:
            raise CommandError(PROBLEMS.format(problems="\n".join(report.problems)))

    def write_outputs(self, report: bench.ScaleReport, options: dict, command_line: str) -> None:
        for option in ("markdown", "json", "chart", "memory_chart"):
            if options[option] is not None:
                options[option].parent.mkdir(parents=True, exist_ok=True)
        charts = []
        for option, draw, alt in (
            ("chart", bench.throughput_chart, "Throughput by strategy and size"),
            ("memory_chart", bench.memory_chart, "Peak memory growth by strategy and size"),
        ):
            path: Path | None = options[option]
            if path is not None:
                path.write_text(draw(report) + "\n", encoding="utf-8")
                charts.append((alt, path))
        if options["json"] is not None:
            options["json"].write_text(
                json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8"
            )
        markdown_path: Path | None = options["markdown"]
        base = markdown_path.resolve().parent if markdown_path else Path.cwd()
        markdown = bench.markdown_report(
            report,
            command_line=command_line,
            charts=[(alt, os.path.relpath(path.resolve(), base)) for alt, path in charts],
        )
        if markdown_path is not None:
            markdown_path.write_text(markdown, encoding="utf-8")
        elif options["verbosity"] >= 1:
            self.stdout.write(markdown)
