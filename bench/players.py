"""The live shop that ``bench_live`` runs beside a bulk operation: one OS process per player.

A player holds one plain psycopg connection (no Django: a light process that
only talks to the database) and, until told to stop, starts one short
transaction every ``interval`` seconds on one of the hot products, chosen at
random:

* ``checkout`` takes one unit of stock, as a shop's checkout would:
  ``UPDATE product SET stock_quantity = stock_quantity - 1 WHERE id = %s AND
  stock_quantity >= 1``;
* ``admin`` saves one product's price and stock, as an admin's form would.

Each transaction's latency (BEGIN to COMMIT, ``time.monotonic()``) is kept with
its start and whether it failed; the parent assigns the samples to its
measuring windows afterwards by their start (the monotonic clock is one clock
for every process of the machine). A player that falls behind its cadence
starts the next transaction at once, so a stall shows as one long latency.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql

CHECKOUT = "checkout"
ADMIN = "admin"
# The hot products' stock at each run's start, and what an admin save sets (plus up to
# 999): no run's orders and checkouts take it all.
HOT_STOCK = 1_000_000


@dataclass(frozen=True, slots=True)
class Table:
    """Names of the product table and its columns (from the Django model, by the parent)."""

    name: str
    id: str
    price: str
    stock: str
    updated_at: str


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


def statement(kind: str, table: Table) -> sql.Composed:
    names = {
        "table": sql.Identifier(table.name),
        "id": sql.Identifier(table.id),
        "price": sql.Identifier(table.price),
        "stock": sql.Identifier(table.stock),
        "updated": sql.Identifier(table.updated_at),
    }
    if kind == CHECKOUT:
        text = "UPDATE {table} SET {stock} = {stock} - 1 WHERE {id} = %s AND {stock} >= 1"
    else:
        text = "UPDATE {table} SET {price} = %s, {stock} = %s, {updated} = now() WHERE {id} = %s"
    return sql.SQL(text).format(**names)


def play(kind, dsn, table, ids, interval, seed, ready, stop, results) -> None:
    """The player's process: connect, say ready, play until ``stop``, send the samples back.

    ``ready`` and ``stop`` are multiprocessing events, ``results`` the sending
    end of a pipe.
    """
    rng = random.Random(f"{seed}:{kind}")
    query = statement(kind, table)
    samples = Samples()
    with psycopg.connect(dsn, autocommit=True) as connection:
        ready.set()
        due = time.monotonic()
        while not stop.is_set():
            product = rng.choice(ids)
            if kind == CHECKOUT:
                params: tuple = (product,)
            else:
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
