"""``manage.py test_bulk_performance``: naive against optimized (``bench.writeup``).

pytest never collects this ``test_`` module: ``testpaths`` is ``tests``.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench.report import add_seed_and_repeat
from bench.writeup import OPERATIONS, Comparison, markdown_report, run_benchmark, text_report

ALL = "all"
SIZE_TOO_SMALL = "--size must be at least 1, not {value}"
SIZE_NOT_UNDERSTOOD = (
    "--size takes a number or sizes per operation such as views=100,orders=10, not {value!r}"
)
SIZES_WITH_OPERATION = "--size per operation already names the operations: leave out --operation"
CHUNK_SIZE_TOO_SMALL = "--chunk-size must be at least 1, not {value}"
STATES_DIFFER = "naive and optimized runs ended in different states: {operations}"
ROWS_SKIPPED = "a run skipped rows, so the comparison is not like for like: {operations}"


class Command(BaseCommand):
    help = (
        "Run each bulk operation with the naive and then the optimized service on the same "
        "deterministic workload, from the same starting state, and compare queries and time. "
        "Benchmark rows live in their own namespace (users 'bench-', skus and order references "
        "'BENCH-', categories 'Bench ') and are removed afterwards; other data is untouched. "
        "Each run leaves its BatchProcessingLog row."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add = parser.add_argument
        add(
            "--size",
            default="1000",
            help="Rows (views, scores, products) or orders per operation (default: 1000); "
            "or a size for each operation to run, such as views=100,scores=50,orders=10.",
        )
        add(
            "--operation",
            choices=[*OPERATIONS, ALL],
            default=ALL,
            help="The operation to benchmark (default: all of them).",
        )
        add(
            "--chunk-size",
            type=int,
            help="Rows per chunk for both services (default: settings.BULK_CHUNK_SIZE).",
        )
        add_seed_and_repeat(
            parser,
            "Seed of the workload generator; same seed, same workload",
            "Run each service this many times, taking turns, every run from the same starting "
            "state; the fastest run of each counts (default: 1). A few runs steady the figures "
            "of small sizes, which take milliseconds.",
        )
        add(
            "--keep-data",
            action="store_true",
            help="Leave the benchmark rows as the last optimized run made them, to inspect.",
        )
        output = parser.add_mutually_exclusive_group().add_argument
        output(
            "--json",
            action="store_true",
            help="Print the figures as JSON: a list with one object per operation.",
        )
        output(
            "--markdown",
            action="store_true",
            help="Print a Markdown table with the command line, database and date.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        size = str(options["size"])  # call_command may give it as a number
        operation: str = options["operation"]
        if "=" in size and operation != ALL:
            raise CommandError(SIZES_WITH_OPERATION)
        sizes = self.sizes(size, OPERATIONS if operation == ALL else (operation,))
        chunk_size: int | None = options["chunk_size"]
        if chunk_size is not None and chunk_size < 1:
            raise CommandError(CHUNK_SIZE_TOO_SMALL.format(value=chunk_size))
        chunk_size = chunk_size or settings.BULK_CHUNK_SIZE
        repeat, verbosity = options["repeat"], options["verbosity"]
        comparisons = run_benchmark(
            sizes,
            chunk_size=chunk_size,
            seed=options["seed"],
            keep_data=options["keep_data"],
            repeat=repeat,
            progress=self.stdout.write if verbosity >= 2 else None,
        )

        # JSON and Markdown were asked for explicitly: print them at any verbosity.
        if options["json"]:
            self.stdout.write(json.dumps([c.as_dict() for c in comparisons], indent=2))
        elif options["markdown"]:
            command_line = (
                f"python manage.py test_bulk_performance --size {size} --operation {operation} "
                f"--chunk-size {chunk_size} --seed {options['seed']} --repeat {repeat}"
            )
            self.stdout.write(markdown_report(comparisons, command_line=command_line))
        elif verbosity >= 1:
            self.stdout.write(text_report(comparisons))
        self.check_fair(comparisons)

    @staticmethod
    def sizes(value: str, operations: tuple[str, ...]) -> dict[str, int]:
        """Operation -> size, from ``--size``: one number for ``operations``, or ``name=N,...``."""
        entries = [entry.partition("=") for entry in value.split(",")] if "=" in value else []
        try:
            sizes = (
                {name.strip(): int(number) for name, _, number in entries}
                if entries
                else dict.fromkeys(operations, int(value))
            )
        except ValueError:
            raise CommandError(SIZE_NOT_UNDERSTOOD.format(value=value)) from None
        if len(sizes) < len(entries) or not sizes.keys() <= set(OPERATIONS):
            raise CommandError(SIZE_NOT_UNDERSTOOD.format(value=value))
        for number in sizes.values():
            if number < 1:
                raise CommandError(SIZE_TOO_SMALL.format(value=number))
        return sizes

    def check_fair(self, comparisons: list[Comparison]) -> None:
        """Fail (after printing) when the two variants did not do the same work."""
        for message, fair in ((STATES_DIFFER, "states_match"), (ROWS_SKIPPED, "completed")):
            if unfair := [c.operation for c in comparisons if not getattr(c, fair)]:
                raise CommandError(message.format(operations=", ".join(unfair)))
