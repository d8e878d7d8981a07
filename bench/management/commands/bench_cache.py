"""``manage.py bench_cache``: per-key against bulk cache operations on the configured Redis.

Sets, gets and deletes ``--keys`` product-card-sized values one key at a time, then
with one ``set_many``, ``get_many`` and ``delete_many``. Keys live under their own
prefix and are deleted afterwards.
"""

from __future__ import annotations

import json
import time
from argparse import ArgumentParser
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.redis import RedisCache
from django.core.management.base import BaseCommand, CommandError

from bench.report import markdown_table, section_head
from common.cli import positive_int

TITLE = "Cache: per-key against bulk operations on Redis"
PREFIX = "bench-cache:"
SECONDS = ("per_key_seconds", "bulk_seconds")
NEEDS_REDIS = "bench_cache measures Redis round trips: set REDIS_URL (the cache is {backend})"
CARD = {
    "sku": "BENCH-000000",
    "name": "A product of typical length for the bench",
    "category": "Bench",
    "price": "1234.50",
    "stock": 100,
    "is_active": True,
    "view_count": 0,
}


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class Command(BaseCommand):
    help = (
        "Time per-key get/set/delete against get_many/set_many/delete_many on the Redis "
        "cache (REDIS_URL) and print the speedups."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        add = parser.add_argument
        add("--keys", type=positive_int, default=10_000, help="Keys per operation (10000).")
        add("--json", action="store_true", help="Print the figures as JSON instead of a table.")
        add("--markdown", action="store_true", help="Print a Markdown section for BENCHMARKS.md.")

    def handle(self, *args: Any, **options: Any) -> None:
        backend = caches["default"]
        if not isinstance(backend, RedisCache):
            raise CommandError(NEEDS_REDIS.format(backend=type(backend).__name__))
        count: int = options["keys"]
        values = {f"{PREFIX}{index}": {**CARD, "id": index} for index in range(count)}
        keys = list(values)

        def set_each() -> None:
            for key, value in values.items():
                backend.set(key, value)

        try:
            results = [("set", timed(set_each), timed(lambda: backend.set_many(values)))]
            get_each = timed(lambda: [backend.get(key) for key in keys])
            results.append(("get", get_each, timed(lambda: backend.get_many(keys))))
            delete_one = timed(lambda: [backend.delete(key) for key in keys])
            backend.set_many(values)  # delete_many must find the keys too
            results.append(("delete", delete_one, timed(lambda: backend.delete_many(keys))))
        finally:
            backend.delete_many(keys)
        rows = [
            {
                "operation": name,
                "keys": count,
                "per_key_seconds": round(per_key, 4),
                "bulk_seconds": round(bulk, 4),
                "speedup": round(per_key / bulk, 1) if bulk else None,
            }
            for name, per_key, bulk in results
        ]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
        elif options["markdown"]:
            self.stdout.write(self.markdown(rows, count))
        else:
            for row in rows:
                self.stdout.write(
                    f"{row['operation']:>6}: {row['per_key_seconds']:.3f} s per key, "
                    f"{row['bulk_seconds']:.3f} s bulk, {row['speedup']}x"
                )

    def markdown(self, rows: list[dict], count: int) -> str:
        location = settings.CACHES["default"]["LOCATION"]  # one URL, or several
        server = location if isinstance(location, str) else next(iter(location))
        version = redis.Redis.from_url(server).info("server")["redis_version"]
        table = []
        for row in rows:
            seconds = (f"{row[key]:.3f}" for key in SECONDS)
            table.append((row["operation"], f"{row['keys']:,}", *seconds, f"{row['speedup']}x"))
        header = ("operation", "keys", "per key (s)", "bulk (s)", "speedup")
        command_line = f"python manage.py bench_cache --keys {count} --markdown"
        return "\n".join(
            [
                *section_head(TITLE, command_line, f"Redis {version}"),
                f"{count:,} product-card values, one round trip per key against one per "
                "operation (`get_many` is MGET, `set_many` one pipeline, `delete_many` one DEL).",
                "",
                *markdown_table(header, "lrrrr", table),
            ]
        )
