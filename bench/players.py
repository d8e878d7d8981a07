"""The live shop that ``bench_live`` runs beside bulk work, one OS process per player.

Method: docs/benchmarks.md. Starts and latencies are ``time.monotonic()``: one clock
for every process of the machine.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

CHECKOUT = "checkout"
ADMIN = "admin"
# The hot products' stock at each run's start, and what an admin save sets (plus up to
# 999): no run's orders and checkouts take it all.
HOT_STOCK = 1_000_000
STATEMENTS = {
    CHECKOUT: "UPDATE {0} SET {3} = {3} - 1 WHERE {1} = %s AND {3} >= 1",
    ADMIN: "UPDATE {0} SET {2} = %s, {3} = %s, {4} = now() WHERE {1} = %s",
}


@dataclass(slots=True)
class Samples:
    """Every transaction of one player: start, latency (seconds), failed or not."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)

    def between(self, start: float, end: float) -> tuple[list[float], int]:
        """Latencies and the count of failures of the transactions started in [start, end]."""
        chosen = [i for i, t in enumerate(self.starts) if start <= t <= end]
        return [self.latencies[i] for i in chosen], sum(self.failed[i] for i in chosen)


def play(kind, dsn, names: Sequence[str], ids, interval, seed, ready, stop, results) -> None:
    """The player's process: connect, set ``ready``, play until ``stop``, send the samples.

    ``names``: the product table and its id, price, stock and updated-at columns.
    """
    rng = random.Random(f"{seed}:{kind}")  # the players' choices are seeded by --seed
    query = sql.SQL(STATEMENTS[kind]).format(*map(sql.Identifier, names))
    samples = Samples()
    with psycopg.connect(dsn, autocommit=True) as connection:
        ready.set()
        due = time.monotonic()
        while not stop.is_set():
            product = rng.choice(ids)
            params: tuple = (product,)
            if kind == ADMIN:
                price = Decimal(rng.randrange(100, 100_000)) / 100
                params = (price, HOT_STOCK + rng.randrange(1000), product)
            started = time.monotonic()
            try:
                with connection.transaction():
                    connection.execute(query, params)
                failed = False
            except psycopg.Error:
                failed = True
            samples.starts.append(started)
            samples.latencies.append(time.monotonic() - started)
            samples.failed.append(failed)
            due = max(due + interval, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
    results.send(samples)
    results.close()
