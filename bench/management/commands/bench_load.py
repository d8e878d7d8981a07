"""``manage.py bench_load``: API clients against the production server (``bench.load``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from bench import load, server
from bench.load import Tally
from bench.report import markdown_table, section_head, text_table

TITLE = "The production server under load (`bench_load`)"
FAILED = "the load test failed:\n{problems}"
SERVER_OPTIONS = (  # option, the environment variable giving its default, else this, help
    ("--workers", "WEB_CONCURRENCY", 2, "gunicorn workers of"),
    ("--threads", "WEB_THREADS", 4, "Threads per worker of"),
)
NOT_POSITIVE = "{option} must be more than 0, not {value}"
NO_URL_ON_MEMORY = (
    "without --url the command starts the server on this database, which is in memory; "
    "set DATABASE_URL to a file or to PostgreSQL"
)


class Command(BaseCommand):
    help = (
        "Load-test the production server: --clients API clients, for --seconds, each "
        "posting batches of --batch product views to /api/product-views/bulk (bearer "
        "token, an Idempotency-Key per batch) and reading /api/batch-logs in turn. Then "
        "checks in the database that every posted row is stored exactly once (rows, "
        "distinct session ids, view counters, distinct idempotency keys) and prints "
        "requests/s and p50/p99/max latency per endpoint. Fails on any error, any 5xx or "
        "any row not stored exactly once. Without --url it starts gunicorn (DEBUG off) on "
        "a free loopback port on this command's database. Its rows ('load-' users, skus "
        "and sessions) are deleted afterwards unless --keep."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add = parser.add_argument
        add(
            "--url",
            default="",
            help="A running server (http://127.0.0.1:8000) that uses this command's database. "
            "Default: start one.",
        )
        add("--clients", type=int, default=50, help="Concurrent clients (50).")
        add("--seconds", type=float, default=60.0, help="How long they send requests (60).")
        add("--batch", type=int, default=100, help="Rows per batch POST (100).")
        add(
            "--products",
            type=int,
            default=load.PRODUCTS,
            help=f"Products the views are drawn from at random ({load.PRODUCTS:,}); fewer "
            "products, more batches updating the same view counters at once.",
        )
        for option, name, fallback, what in SERVER_OPTIONS:
            default, text = int(os.environ.get(name) or fallback), f"{what} the server it starts"
            add(option, type=int, default=default, help=f"{text} ({name}, else {fallback}).")
        add("--timeout", type=float, default=30.0, help="Seconds a client waits for an answer.")
        add("--markdown", action="store_true", help="Print the report as a BENCHMARKS.md section.")
        add("--keep", action="store_true", help="Keep the run's rows (for inspection).")

    def handle(self, *args: Any, **options: Any) -> None:
        for option in ("clients", "seconds", "batch", "products", "workers", "threads", "timeout"):
            if options[option] <= 0:
                raise CommandError(NOT_POSITIVE.format(option=f"--{option}", value=options[option]))
        if not options["url"] and not server.database_url():
            raise CommandError(NO_URL_ON_MEMORY)
        load_before = load.load_average()
        namespace = load.prepare(products=options["products"])
        clients = {key: options[key] for key in ("clients", "seconds", "batch", "timeout")}

        def run(url: str) -> Tally:
            return load.run_clients(url, namespace, **clients)

        tally = Tally()
        problems: list[str] = []
        try:
            if options["url"]:
                tally = run(options["url"].rstrip("/"))
            else:
                with (
                    tempfile.TemporaryDirectory(prefix="bench-load-") as folder,
                    server.gunicorn(
                        server.loopback_environment(server.database_url()),
                        Path(folder) / "gunicorn.log",
                        workers=options["workers"],
                        threads=options["threads"],
                    ) as running,
                ):
                    tally = run(running.url)
            problems = load.verify(namespace, tally)
        finally:
            if not options["keep"]:
                load.remove(namespace, [*tally.log_ids, *tally.failed_log_ids])
        self.report(tally, problems, options, load_before)
        failures = [*tally.errors[:20], *problems]
        if tally.errors or problems:
            raise CommandError(FAILED.format(problems="\n".join(failures)))

    def report(self, tally: Tally, problems: list[str], options: dict[str, Any], before: str):
        table = load.rows(tally)
        rows_per_second = tally.posted_rows / tally.elapsed if tally.elapsed else 0.0
        stored = "every posted row stored exactly once"
        server_errors = sum(tally.server_errors(endpoint) for endpoint in load.ENDPOINTS)
        summary = (
            f"{tally.posted_rows:,} rows in {tally.posted_batches:,} batches posted "
            f"({rows_per_second:,.0f} rows/s); {'NOT ' if problems else ''}{stored}; "
            f"{len(tally.errors)} errors, {server_errors} 5xx"
        )
        header = ("endpoint", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors", "5xx")
        if not options["markdown"]:
            self.stdout.write(f"{text_table(header, table)}\n{summary}")
        else:
            clients, requests = options["clients"], sum(map(len, tally.latencies.values()))
            total = requests / tally.elapsed if tally.elapsed else 0.0
            workers, threads = options["workers"], options["threads"]
            where = options["url"] or f"gunicorn, {workers} workers x {threads} threads, DEBUG=0"
            queued = (
                "; with more clients than server threads most of it is waiting in the server's "
                f"queue ({clients} clients / {total:,.1f} requests/s = {clients / total:,.2f} s)."
                if not options["url"] and total and clients > workers * threads
                else "."
            )
            command_line = (
                f"python manage.py bench_load --clients {clients} "
                f"--seconds {options['seconds']:g} --batch {options['batch']} "
                f"--products {options['products']} --markdown"
            )
            lines = [
                *section_head(TITLE, command_line),
                f"{clients} API clients on loopback for {tally.elapsed:.0f} s, each "
                f"posting batches of {options['batch']} views of products drawn at random from "
                f"{options['products']:,} to `POST /api/product-views/bulk` (bearer token, an "
                "`Idempotency-Key` per batch) and reading the first page of `GET "
                f"/api/batch-logs`, in turn. Server: {where}; {os.cpu_count()} cores shared with "
                f"the clients (load average before {before}, after {load.load_average()}). "
                "Latency is the client's, request sent to answer read" + queued,
                "",
                *markdown_table(header, "lrrrrrrr", [(f"`{r[0]}`", *r[1:]) for r in table]),
                f"\n{summary}.",
            ]
            self.stdout.write("\n".join(lines))
        for problem in problems:
            self.stderr.write(problem)
