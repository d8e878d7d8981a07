"""The scale benchmark behind ``manage.py bench_scale``: the service against its peers.

Each workload writes the same deterministic rows with several strategies: the
optimized service, raw SQL (COPY), django-pgbulk (a benchmark-only extra) and
Django's own bulk methods, at sizes up to 1,000,000 rows, on PostgreSQL.

Fair runs
---------
* **Same input.** Every strategy consumes the same generator of dicts, the
  service's input format; turning them into model objects or COPY rows is part
  of each strategy's work. The import reads one generated CSV file.
* **Same start.** Before each strategy the namespace is deleted and the base
  state recreated (neither is timed), then the tables are ``VACUUM ANALYZE``-d,
  so no strategy inherits another's dead rows or statistics.
* **Same end.** After each strategy the namespace's end state, in logical
  terms (usernames and skus, never ids), is fingerprinted: its row count and an
  order-independent hash of its rows. Every strategy of one workload and size
  must end with the same fingerprint and with one row per input row, or the
  command fails after reporting.
* **Same commits.** Chunked strategies get the service's chunk size and
  commit each chunk, as the service does; COPY strategies stream every row in
  one statement, their best case.

The peers do less than the service: they neither validate rows nor check that
users and products exist, and the views peers do not maintain
``Product.view_count``. Their figures are therefore upper bounds for doing the
same job with them.

Memory
------
``tracemalloc`` slows a million-row run several times over and misses memory
held by C extensions. Instead each strategy runs in a fresh child process
(``bench_scale --one``). Just before the timed call the child resets its peak
resident set size to the current one (``/proc/self/clear_refs``, Linux 4.0+);
its peak memory growth is the peak (``ru_maxrss``) after the call minus that
baseline. Where the peak cannot be reset, the baseline is the current resident
size, which can overstate the growth by what Django's start-up held and freed.
``--in-process`` skips the children (faster, for tests) and reports no memory.

Slow peers
----------
A peer (django-pgbulk, Django's bulk methods, the naive service) whose time at
the previous size, scaled linearly to the next size, exceeds the peer budget is
not run at that size; the report says so with the projection. The optimized
service and raw SQL, which the targets compare, always run. Orders run at
10,000 at most: beyond, the naive service would take most of an hour.

The namespace
-------------
The rows are those of ``bench.writeup``'s namespace (users
``bench-``, skus and order references ``BENCH-``, categories ``Bench ``), so
the benchmark shares a database with the shop without touching its rows. It
deletes the namespace with one statement per table, which stays fast at a
million rows where Django's delete collector would load every product.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.utils import timezone
from psycopg import sql

from batching.engine import BatchResult, chunked
from batching.models import BatchProcessingLog
from batching.postgres import array_type, column, execute, model_field
from bench.namespace import (
    CATEGORY_PREFIX,
    DEFAULT_SEED,
    PRODUCT_FIELDS,
    PRODUCT_POOL,
    SKU_PREFIX,
    USER_POOL,
    Fixture,
    category_name,
    copy_products,
    create_categories,
    create_users,
    product_ids,
    product_sku,
    reset_namespace,
    table,
    user_ids,
    vacuum,
)
from bench.report import format_ratio, markdown_table, section_head, short_size
from bench.writeup import ALGORITHMS, BASE_TIME, INTERACTIONS, OrdersScenario
from common.charts import bar_chart
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.readers import RowStream
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService

try:  # a benchmark-only extra: pip install -e ".[bench]"
    import pgbulk
except ImportError:  # pragma: no cover
    pgbulk = None  # type: ignore[assignment]  # bench_scale checks for None

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
# A strategy is measured again (with --repeat) only while its runs took less.
REPEAT_BUDGET = 30.0
HASH_MASK = (1 << 64) - 1
# The temporary table raw strategies COPY into (dropped at commit).
STAGING_TABLE = "scale_bench_staging"
COPY_BLOCK = 1 << 20
# bulk_update's batch in the updates workload. Its statement has a WHEN per row
# and field: on the benchmark machine batches of 250 to 2,000 rows ran at about
# 1,200 to 1,700 rows/s, one 10,000-row statement at 49.
DJANGO_UPDATE_BATCH = 1000

# Strategy keys; the same key is the same kind of tool in every workload.
OPTIMIZED = "optimized"
RAW = "raw"
PGBULK = "pgbulk"
DJANGO = "django"
NAIVE = "naive"
# Peers are skipped at a size where their projected time exceeds the budget;
# the optimized service and raw SQL, which the targets need, always run.
PEERS = frozenset({PGBULK, DJANGO, NAIVE})
DEFAULT_PEER_BUDGET = 120.0
KINDS = {
    OPTIMIZED: "optimized service",
    RAW: "raw SQL",
    PGBULK: "django-pgbulk",
    DJANGO: "Django ORM",
    NAIVE: "naive service",
}

RUN_INCOMPLETE = "{workload} with {strategy} ended {status}: {errors}"
UNKNOWN_STRATEGY = "{workload} has no strategy {strategy!r}: choose one of {choices}"
STATES_DIFFER = "{workload} at {size:,} rows: {strategy} ended in a different state than {first}"
OVER_BUDGET = (
    "not run: {projected:,.0f} s projected from {seconds:.1f} s at {previous:,} "
    "(over the {budget:,.0f} s budget per peer run)"
)
ROWS_MISSING = "{workload} at {size:,} rows: {strategy} left {found:,} rows, expected {expected:,}"

Progress = Callable[[str], None]


class BenchError(RuntimeError):
    """A strategy did not do the work it was given; its figures would mislead."""


# -- small helpers -----------------------------------------------------------------


def coprime_stride(size: int) -> int:
    """A stride that visits every position of ``range(size)`` once: a cheap shuffle."""
    stride = 7919  # a prime; sizes are often powers of ten
    while math.gcd(stride, size) != 1:
        stride += 2
    return stride


def shuffled(size: int) -> Iterator[int]:
    """0..size-1 in a fixed scattered order, as unsorted input would come."""
    stride = coprime_stride(size)
    return ((position * stride + size // 3) % size for position in range(size))


def price_of(number: int) -> str:
    """A deterministic price between 1.00 and 999.99, as text like a file holds it."""
    return str(Decimal(100 + (number * 7_919) % 99_900) / 100)


def fraction(number: int, salt: int) -> float:
    """A deterministic score in [0, 1) with six decimals."""
    return ((number * 2_654_435_761 + salt) % 1_000_000) / 1_000_000


def columns(model: type[models.Model], fields: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(column(model, f) for f in fields)


def copy_rows(
    using: str,
    model: type[models.Model],
    fields: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    staging: bool = False,
) -> None:
    """COPY ``rows`` (tuples in ``fields`` order) into ``model``'s table, streaming.

    With ``staging``, into the staging table ``create_staging`` made instead.
    """
    target = sql.Identifier(STAGING_TABLE) if staging else table(model)
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(target, columns(model, fields))
    connection = connections[using]
    connection.ensure_connection()
    with connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def create_staging(using: str, model: type[models.Model], fields: Sequence[str]) -> None:
    """A temporary table with ``fields``' columns and types, dropped at commit."""
    connection = connections[using]
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(
            column(model, name),
            sql.SQL(array_type(model_field(model, name), connection)),
        )
        for name in fields
    )
    execute(
        using,
        sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP").format(
            sql.Identifier(STAGING_TABLE), definitions
        ),
    )


def stage(
    using: str, model: type[models.Model], fields: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """COPY ``rows`` into a new staging table with ``fields``' columns (inside a transaction)."""
    create_staging(using, model, fields)
    copy_rows(using, model, fields, rows, staging=True)


def check_completed(workload: str, strategy: str, result: BatchResult) -> None:
    if result.status != BatchProcessingLog.Status.COMPLETED:
        errors = "; ".join(f"row {e.index}: {e.field}: {e.message}" for e in result.errors[:3]) or (
            result.log.error_summary or "no row errors"
        )
        raise BenchError(
            RUN_INCOMPLETE.format(
                workload=workload, strategy=strategy, status=result.status, errors=errors
            )
        )


def fingerprint(rows: Iterable[tuple]) -> tuple[int, int]:
    """(count, order-independent hash): equal multisets of rows give equal results.

    Python's string hashes are salted per process, so fingerprints compare
    only within one process (the parent computes them all).
    """
    count = total = 0
    for row in rows:
        count += 1
        total = (total + hash(row)) & HASH_MASK
    return count, total


# -- workloads ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Strategy:
    """One way to do a workload's job."""

    key: str
    label: str
    method: str
    description: str

    @property
    def kind(self) -> str:
        return KINDS[self.key]


class Workload(ABC):
    """One job done by several strategies on the same input from the same start.

    The parent calls ``setup`` (reset and base state) before each strategy and
    ``state`` after it; the strategy itself runs in a child process, which
    calls ``prepare`` (read the ids the input refers to) and then ``run``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str] = "rows"
    strategies: ClassVar[tuple[Strategy, ...]]
    tables: ClassVar[tuple[type[models.Model], ...]]
    max_size: ClassVar[int | None] = None
    cap_reason: ClassVar[str] = ""
    # The chunk the scale figures are measured at (docs/benchmarks.md, "At
    # scale"): throughput in isolation, where large chunks pay off. The live
    # shop's figures are bench_live's, at the services' default of 1,000.
    chunk: ClassVar[int] = 50_000

    def __init__(
        self,
        size: int,
        *,
        seed: int = DEFAULT_SEED,
        chunk_size: int | None = None,
        using: str = DEFAULT_DB_ALIAS,
        work_dir: Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.seed = seed
        self.chunk_size = chunk_size or self.chunk
        self.using = using
        self.work_dir = work_dir or Path(settings.BASE_DIR)

    @classmethod
    def strategy(cls, key: str) -> Strategy:
        for strategy in cls.strategies:
            if strategy.key == key:
                return strategy
        choices = ", ".join(s.key for s in cls.strategies)
        raise KeyError(UNKNOWN_STRATEGY.format(workload=cls.name, strategy=key, choices=choices))

    def setup(self) -> None:
        reset_namespace(self.using)
        with transaction.atomic(using=self.using):
            self.create_base()
        vacuum(self.using, self.tables)

    @abstractmethod
    def create_base(self) -> None: ...

    def prepare(self) -> None:  # noqa: B027 (an optional hook)
        """Read what the input refers to (ids), before the clock starts."""

    def run(self, key: str) -> None:
        getattr(self, self.strategy(key).method)()

    @abstractmethod
    def state(self) -> dict[str, Iterable[tuple]]:
        """The end state in logical terms; the first entry has one row per input row."""

    def snapshot(self) -> dict[str, list[tuple]]:
        return {name: sorted(rows) for name, rows in self.state().items()}

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        return {name: fingerprint(rows) for name, rows in self.state().items()}

    def service(self) -> OptimizedBulkOperationsService:
        return OptimizedBulkOperationsService(using=self.using)


class ViewsWorkload(Workload):
    """Append-only product views over 50 users and 100 products."""

    name = "views"
    title = "Product views, append-only"
    tables = (ProductView, Product)
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized create_product_views",
            "run_optimized",
            "validates every row, checks users and products, inserts, adds to view_count",
        ),
        Strategy(RAW, "raw COPY", "run_raw", "one COPY of every row, nothing checked"),
        Strategy(PGBULK, "pgbulk.copy", "run_pgbulk", "one COPY per chunk of model objects"),
        Strategy(DJANGO, "bulk_create", "run_django", "one bulk_create per chunk"),
    )
    fields = ("user", "product", "session_id", "interaction_type", "created_at")
    # 100 entries: the interaction mix of bench.writeup, as plain strings.
    kinds = tuple(str(kind.value) for kind, weight in INTERACTIONS for _ in range(weight))

    def create_base(self) -> None:
        (category_id,) = create_categories(self.using, 1)
        create_users(self.using, USER_POOL)
        copy_products(self.using, range(PRODUCT_POOL), lambda _: category_id, "10.00", 100)

    def prepare(self) -> None:
        self.users = user_ids(self.using)
        self.products = product_ids(self.using, PRODUCT_POOL)

    def rows(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}:scale:{self.name}")
        sessions = [f"bench-session-{user:04d}" for user in range(USER_POOL)]
        users, products, kinds = self.users, self.products, self.kinds
        for position in range(self.size):
            bits = rng.getrandbits(32)
            user = bits % USER_POOL
            yield {
                "user_id": users[user],
                "product_id": products[(bits >> 8) % PRODUCT_POOL],
                "session_id": sessions[user],
                "interaction_type": kinds[(bits >> 16) % len(kinds)],
                "created_at": BASE_TIME + timedelta(seconds=position),
            }

    def objects(self, rows: Iterable[dict[str, Any]]) -> Iterator[ProductView]:
        return (
            ProductView(
                user_id=row["user_id"],
                product_id=row["product_id"],
                session_id=row["session_id"],
                interaction_type=row["interaction_type"],
                created_at=row["created_at"],
            )
            for row in rows
        )

    def run_optimized(self) -> None:
        result = self.service().create_product_views(self.rows(), chunk_size=self.chunk_size)
        check_completed(self.name, OPTIMIZED, result)

    def run_raw(self) -> None:
        with transaction.atomic(using=self.using):
            copy_rows(
                self.using,
                ProductView,
                self.fields,
                (
                    (
                        r["user_id"],
                        r["product_id"],
                        r["session_id"],
                        r["interaction_type"],
                        r["created_at"],
                    )
                    for r in self.rows()
                ),
            )

    def run_pgbulk(self) -> None:
        queryset = ProductView.objects.using(self.using)
        for chunk in chunked(iter(self.objects(self.rows())), self.chunk_size):
            pgbulk.copy(queryset, chunk, list(self.fields))

    def run_django(self) -> None:
        queryset = ProductView.objects.using(self.using)
        for chunk in chunked(iter(self.objects(self.rows())), self.chunk_size):
            queryset.bulk_create(chunk)

    def state(self) -> dict[str, Iterable[tuple]]:
        views = ProductView.objects.using(self.using).filter(product__sku__startswith=SKU_PREFIX)
        return {
            "views": views.values_list(
                "user__username", "product__sku", "session_id", "interaction_type", "created_at"
            ).iterator(chunk_size=10_000)
        }


class ScoresWorkload(Workload):
    """Score upserts with unique keys: half update existing scores, half are new."""

    name = "scores"
    title = "Recommendation-score upsert, half new"
    tables = (RecommendationScore, Product)
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized upsert_recommendation_scores",
            "run_optimized",
            "validates every row, checks users and products, one upsert per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + upsert",
            "run_raw",
            "COPY of every row into a temporary table, then one INSERT ... ON CONFLICT",
        ),
        Strategy(PGBULK, "pgbulk.upsert", "run_pgbulk", "one pgbulk.upsert per chunk"),
        Strategy(
            DJANGO,
            "bulk_create(update_conflicts=True)",
            "run_django",
            "one bulk_create(update_conflicts=True) per chunk",
        ),
    )
    key_fields = ["user", "product", "algorithm"]
    update_fields = ["score", "updated_at"]

    @property
    def product_pool(self) -> int:
        return math.ceil(self.size / (USER_POOL * len(ALGORITHMS)))

    def key(self, number: int) -> tuple[int, int, str]:
        """Key number k as (user, product, algorithm) numbers: k covers them densely."""
        rest, algorithm = divmod(number, len(ALGORITHMS))
        product, user = divmod(rest, USER_POOL)
        return user, product, ALGORITHMS[algorithm]

    def create_base(self) -> None:
        (category_id,) = create_categories(self.using, 1)
        users = create_users(self.using, USER_POOL)
        copy_products(self.using, range(self.product_pool), lambda _: category_id, "10.00", 100)
        self.copy_existing_scores(users, product_ids(self.using, self.product_pool))

    def copy_existing_scores(self, users: list[int], products: list[int]) -> None:
        """Even key numbers exist with another score; the input updates them."""
        now = timezone.now()
        copy_rows(
            self.using,
            RecommendationScore,
            [*self.key_fields, *self.update_fields],
            (
                (users[user], products[product], algorithm, fraction(number, 7), now)
                for number in range(0, self.size, 2)
                for user, product, algorithm in [self.key(number)]
            ),
        )

    def prepare(self) -> None:
        self.users = user_ids(self.using)
        self.products = product_ids(self.using, self.product_pool)

    def rows(self) -> Iterator[dict[str, Any]]:
        users, products = self.users, self.products
        for number in shuffled(self.size):
            user, product, algorithm = self.key(number)
            yield {
                "user_id": users[user],
                "product_id": products[product],
                "algorithm": algorithm,
                "score": fraction(number, self.seed),
            }

    def objects(self, rows: Iterable[dict[str, Any]]) -> Iterator[RecommendationScore]:
        return (
            RecommendationScore(
                user_id=row["user_id"],
                product_id=row["product_id"],
                algorithm=row["algorithm"],
                score=row["score"],
            )
            for row in rows
        )

    def run_optimized(self) -> None:
        result = self.service().upsert_recommendation_scores(
            self.rows(), chunk_size=self.chunk_size
        )
        check_completed(self.name, OPTIMIZED, result)

    def run_raw(self) -> None:
        fields = ["user", "product", "algorithm", "score"]
        with transaction.atomic(using=self.using):
            stage(
                self.using,
                RecommendationScore,
                fields,
                ((r["user_id"], r["product_id"], r["algorithm"], r["score"]) for r in self.rows()),
            )
            execute(
                self.using,
                sql.SQL(
                    "INSERT INTO {table} ({columns}) SELECT {source}, now() FROM {staging} "
                    "ON CONFLICT ({key}) DO UPDATE SET {score} = EXCLUDED.{score}, "
                    "{updated} = EXCLUDED.{updated}"
                ).format(
                    table=table(RecommendationScore),
                    columns=columns(RecommendationScore, [*fields, "updated_at"]),
                    source=columns(RecommendationScore, fields),
                    staging=sql.Identifier(STAGING_TABLE),
                    key=columns(RecommendationScore, self.key_fields),
                    score=columns(RecommendationScore, ["score"]),
                    updated=columns(RecommendationScore, ["updated_at"]),
                ),
            )

    def run_pgbulk(self) -> None:
        queryset = RecommendationScore.objects.using(self.using)
        for chunk in chunked(iter(self.objects(self.rows())), self.chunk_size):
            pgbulk.upsert(queryset, chunk, self.key_fields, self.update_fields)

    def run_django(self) -> None:
        queryset = RecommendationScore.objects.using(self.using)
        for chunk in chunked(iter(self.objects(self.rows())), self.chunk_size):
            queryset.bulk_create(
                chunk,
                update_conflicts=True,
                unique_fields=self.key_fields,
                update_fields=self.update_fields,
            )

    def state(self) -> dict[str, Iterable[tuple]]:
        scores = RecommendationScore.objects.using(self.using).filter(
            product__sku__startswith=SKU_PREFIX
        )
        return {
            "scores": scores.values_list(
                "user__username", "product__sku", "algorithm", "score"
            ).iterator(chunk_size=10_000)
        }


UPDATE_FIELDS = ["price", "stock_quantity", "updated_at"]


class UpdatesWorkload(Workload):
    """A new price and stock for every existing product, keyed by sku."""

    name = "updates"
    title = "Price and stock update of existing products"
    tables = (Product,)
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized update_products",
            "run_optimized",
            "validates every row, checks every sku exists, one UPDATE per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + UPDATE",
            "run_raw",
            "COPY of every row into a temporary table, then one UPDATE ... FROM",
        ),
        Strategy(
            PGBULK,
            "pgbulk.update",
            "run_pgbulk",
            "per chunk: one query for the ids of the skus, one pgbulk.update",
        ),
        Strategy(
            DJANGO,
            "bulk_update",
            "run_django",
            "per chunk: one query for the ids of the skus, bulk_update in batches of "
            f"{DJANGO_UPDATE_BATCH:,} (one 10,000-row CASE WHEN statement is far slower)",
        ),
    )

    def create_base(self) -> None:
        (category_id,) = create_categories(self.using, 1)
        copy_products(self.using, range(self.size), lambda _: category_id, "10.00", 100)

    def rows(self) -> Iterator[dict[str, Any]]:
        for number in shuffled(self.size):
            yield {
                "sku": product_sku(number),
                "price": price_of(number + self.seed),
                "stock_quantity": (number * 37 + self.seed) % 500,
            }

    def objects(self, rows: list[dict[str, Any]]) -> list[Product]:
        """Products with the rows' new values, their ids read by sku (one query)."""
        ids = dict(
            Product.objects.using(self.using)
            .filter(sku__in=[row["sku"] for row in rows])
            .values_list("sku", "pk")
        )
        now = timezone.now()
        return [
            Product(
                pk=ids[row["sku"]],
                price=Decimal(row["price"]),
                stock_quantity=row["stock_quantity"],
                updated_at=now,
            )
            for row in rows
        ]

    def run_optimized(self) -> None:
        result = self.service().update_products(self.rows(), chunk_size=self.chunk_size)
        check_completed(self.name, OPTIMIZED, result)

    def run_raw(self) -> None:
        fields = ["sku", "price", "stock_quantity"]
        with transaction.atomic(using=self.using):
            stage(
                self.using,
                Product,
                fields,
                ((r["sku"], r["price"], r["stock_quantity"]) for r in self.rows()),
            )
            sku, price, stock, updated = (
                column(Product, name) for name in ["sku", "price", "stock_quantity", "updated_at"]
            )
            execute(
                self.using,
                sql.SQL(
                    "UPDATE {table} AS p SET {price} = s.{price}, {stock} = s.{stock}, "
                    "{updated} = now() FROM {staging} AS s WHERE p.{sku} = s.{sku}"
                ).format(
                    table=table(Product),
                    staging=sql.Identifier(STAGING_TABLE),
                    sku=sku,
                    price=price,
                    stock=stock,
                    updated=updated,
                ),
            )

    def run_pgbulk(self) -> None:
        queryset = Product.objects.using(self.using)
        for chunk in chunked(iter(self.rows()), self.chunk_size):
            with transaction.atomic(using=self.using):
                pgbulk.update(queryset, self.objects(chunk), UPDATE_FIELDS)

    def run_django(self) -> None:
        queryset = Product.objects.using(self.using)
        for chunk in chunked(iter(self.rows()), self.chunk_size):
            with transaction.atomic(using=self.using):
                queryset.bulk_update(
                    self.objects(chunk), UPDATE_FIELDS, batch_size=DJANGO_UPDATE_BATCH
                )

    def state(self) -> dict[str, Iterable[tuple]]:
        products = Product.objects.using(self.using).filter(sku__startswith=SKU_PREFIX)
        return {
            "products": products.values_list("sku", "price", "stock_quantity").iterator(
                chunk_size=10_000
            )
        }


class OrdersWorkload(Workload):
    """Orders of 3 items over 100 products (``bench.writeup``'s scenario)."""

    name = "orders"
    title = "Orders of 3 items"
    unit = "orders"
    tables = (Order, OrderItem, Product)
    max_size = 10_000
    cap_reason = "the naive service runs about 150 orders/s"
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized process_orders",
            "run_optimized",
            "locks the chunk's products, decides every order, 6 queries per chunk",
        ),
        Strategy(
            NAIVE,
            "naive process_orders",
            "run_naive",
            "the N+1 baseline: queries and saves row by row",
        ),
    )

    def __init__(self, size: int, **options: Any) -> None:
        super().__init__(size, **options)
        self.scenario = OrdersScenario(size, seed=self.seed)

    def create_base(self) -> None:
        self.scenario.create_base(self.using)

    def prepare(self) -> None:
        self.orders = self.scenario.rows(
            Fixture(user_ids(self.using), product_ids(self.using, PRODUCT_POOL))
        )

    def run_optimized(self) -> None:
        result = self.service().process_orders(self.orders, chunk_size=self.chunk_size)
        check_completed(self.name, OPTIMIZED, result)

    def run_naive(self) -> None:
        service = NaiveBulkOperationsService(using=self.using)
        result = service.process_orders(self.orders, chunk_size=self.chunk_size)
        check_completed(self.name, NAIVE, result)

    def state(self) -> dict[str, Iterable[tuple]]:
        snapshot = self.scenario.snapshot(self.using)
        return {
            "orders": snapshot["orders"],
            "items": snapshot["items"],
            "stock": list(snapshot["stock"].items()),
        }


IMPORT_COLUMNS = ("sku", "name", "category", "price", "stock_quantity", "is_active")


class ImportWorkload(Workload):
    """A catalogue CSV file: half the skus exist, half are new, one category is new."""

    name = "import"
    title = "Product import from a CSV file"
    tables = (Product, Category)
    base_categories = 4
    # A catalogue row weighs more; at 20,000 rows a chunk memory stays flat and small.
    chunk = 20_000
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized import_products",
            "run_optimized",
            "streams the file with RowStream, validates every row, one upsert per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + upsert",
            "run_raw",
            "COPY of the file into a temporary table, missing categories, one upsert",
        ),
    )

    @property
    def path(self) -> Path:
        return self.work_dir / f"scale-bench-import-{self.size}-{self.seed}.csv"

    def setup(self) -> None:
        if not self.path.exists():
            self.write_file()
        super().setup()

    def write_file(self) -> None:
        """The input file, written once per size and seed (not timed)."""
        partial = self.path.with_suffix(".partial")
        with open(partial, "w", encoding="utf-8", newline="") as file:
            file.write(",".join(IMPORT_COLUMNS) + "\n")
            for number in shuffled(self.size):
                category = category_name(number % (self.base_categories + 1))
                active = "false" if number % 10 == 0 else "true"
                file.write(
                    f"{product_sku(number)},Bench product {number} (imported),{category},"
                    f"{price_of(number + self.seed)},{(number * 37) % 500},{active}\n"
                )
        partial.replace(self.path)

    def create_base(self) -> None:
        categories = create_categories(self.using, self.base_categories)
        copy_products(
            self.using,
            range(self.size // 2),
            lambda number: categories[number % self.base_categories],
            "1.00",
            1,
        )

    def run_optimized(self) -> None:
        with RowStream(self.path) as stream:
            result = self.service().import_products(stream, chunk_size=self.chunk_size)
        check_completed(self.name, OPTIMIZED, result)

    def run_raw(self) -> None:
        staging = sql.Identifier(STAGING_TABLE)
        staged = ["sku", "name", "category_name", "price", "stock_quantity", "is_active"]
        definitions = sql.SQL(
            "CREATE TEMPORARY TABLE {} (sku varchar, name varchar, category_name varchar, "
            "price numeric, stock_quantity integer, is_active boolean) ON COMMIT DROP"
        ).format(staging)
        category_table, category_name_column = table(Category), sql.Identifier("name")
        p = {name: column(Product, name) for name in PRODUCT_FIELDS}
        with transaction.atomic(using=self.using):
            execute(self.using, definitions)
            statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true)").format(
                staging, sql.SQL(", ").join(map(sql.Identifier, staged))
            )
            connection = connections[self.using]
            with (
                open(self.path, "rb") as file,
                connection.cursor() as cursor,
                cursor.copy(statement) as copy,
            ):
                while block := file.read(COPY_BLOCK):
                    copy.write(block)
            execute(
                self.using,
                sql.SQL(
                    "INSERT INTO {categories} ({name}) SELECT DISTINCT category_name "
                    "FROM {staging} ON CONFLICT ({name}) DO NOTHING"
                ).format(categories=category_table, name=category_name_column, staging=staging),
            )
            execute(
                self.using,
                sql.SQL(
                    "INSERT INTO {table} ({columns}) "
                    "SELECT s.sku, s.name, c.id, s.price, s.stock_quantity, s.is_active, 0, "
                    "now(), now() FROM {staging} AS s "
                    "JOIN {categories} AS c ON c.{name} = s.category_name "
                    "ON CONFLICT ({sku}) DO UPDATE SET {updates}"
                ).format(
                    table=table(Product),
                    columns=columns(Product, PRODUCT_FIELDS),
                    staging=staging,
                    categories=category_table,
                    name=category_name_column,
                    sku=p["sku"],
                    updates=sql.SQL(", ").join(
                        sql.SQL("{0} = EXCLUDED.{0}").format(p[name])
                        for name in (
                            "name",
                            "category",
                            "price",
                            "stock_quantity",
                            "is_active",
                            "updated_at",
                        )
                    ),
                ),
            )

    def state(self) -> dict[str, Iterable[tuple]]:
        products = Product.objects.using(self.using).filter(sku__startswith=SKU_PREFIX)
        categories = Category.objects.using(self.using).filter(name__startswith=CATEGORY_PREFIX)
        return {
            "products": products.values_list(
                "sku", "name", "category__name", "price", "stock_quantity", "is_active"
            ).iterator(chunk_size=10_000),
            "categories": categories.values_list("name"),
        }


WORKLOADS: dict[str, type[Workload]] = {
    workload.name: workload
    for workload in (ViewsWorkload, ScoresWorkload, UpdatesWorkload, OrdersWorkload, ImportWorkload)
}


# -- measuring -----------------------------------------------------------------------


def resident_kib() -> int | None:
    """The process's current resident set size in KiB (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak() -> bool:
    """Make the peak resident size the current one (Linux 4.0+); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def peak_kib() -> int:
    """The process's peak resident set size so far, in KiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS


@dataclass(frozen=True, slots=True)
class Timing:
    seconds: float
    peak_growth_mb: float | None = None


def run_strategy(workload: Workload, key: str, *, measure_memory: bool) -> Timing:
    """Run one strategy in this process: prepare, then time the call alone."""
    workload.strategy(key)  # an unknown key fails before any work
    workload.prepare()
    gc.collect()
    before = 0
    if measure_memory:
        before = peak_kib() if reset_peak() else (resident_kib() or peak_kib())
    started = time.perf_counter()
    workload.run(key)
    seconds = time.perf_counter() - started
    if not measure_memory:
        return Timing(seconds)
    return Timing(seconds, max(0, peak_kib() - before) / 1024)


def database_url(using: str) -> str:
    """A DATABASE_URL naming the connection's database (the test database in tests)."""
    config = connections[using].settings_dict
    auth = quote(config["USER"] or "", safe="")
    if config.get("PASSWORD"):
        auth += ":" + quote(config["PASSWORD"], safe="")
    host = quote(config["HOST"] or "localhost", safe="")
    port = config["PORT"] or 5432
    return f"postgres://{auth}@{host}:{port}/{quote(config['NAME'], safe='')}"


def run_in_child(workload: Workload, key: str) -> Timing:
    """Run one strategy in a fresh ``manage.py bench_scale --one`` process."""
    command = [
        sys.executable,
        str(Path(settings.BASE_DIR) / "manage.py"),
        "bench_scale",
        "--one",
        workload.name,
        "--strategy",
        key,
        "--sizes",
        str(workload.size),
        "--seed",
        str(workload.seed),
        "--chunk-size",
        str(workload.chunk_size),
        "--work-dir",
        str(workload.work_dir),
    ]
    environment = dict(os.environ, DATABASE_URL=database_url(workload.using))
    child = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        cause = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{workload.name} with {key}: the child process failed: {cause}")
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    return Timing(figures["seconds"], figures["peak_growth_mb"])


@dataclass(frozen=True, slots=True)
class Measurement:
    """One strategy at one size; without ``seconds`` it did not run and ``note`` says why."""

    workload: str
    strategy: str
    label: str
    size: int
    seconds: float | None = None
    peak_growth_mb: float | None = None
    note: str = ""
    runs: int = 1

    @property
    def rows_per_second(self) -> float | None:
        return self.size / self.seconds if self.seconds else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_second": self.rows_per_second}


@dataclass(slots=True)
class ScaleReport:
    sizes: list[int]
    workloads: list[str]
    measurements: list[Measurement]
    problems: list[str]
    # Rows per chunk of each workload's service and chunked peers.
    chunk_sizes: dict[str, int] = field(default_factory=dict)

    def find(self, workload: str, strategy: str, size: int) -> Measurement | None:
        for measurement in self.measurements:
            if (measurement.workload, measurement.strategy, measurement.size) == (
                workload,
                strategy,
                size,
            ):
                return measurement
        return None

    def ratio(self, workload: str, strategy: str, size: int) -> float | None:
        """The optimized service's rows/s divided by ``strategy``'s, at ``size``."""
        optimized = self.find(workload, OPTIMIZED, size)
        other = self.find(workload, strategy, size)
        if optimized is None or other is None:
            return None
        if optimized.rows_per_second is None or not other.rows_per_second:
            return None
        return optimized.rows_per_second / other.rows_per_second

    def as_dict(self) -> dict[str, Any]:
        return {
            "sizes": self.sizes,
            "workloads": self.workloads,
            "measurements": [m.as_dict() for m in self.measurements],
            "problems": self.problems,
            "chunk_sizes": self.chunk_sizes,
        }


def run_scale_bench(
    workloads: Sequence[str],
    sizes: Sequence[int],
    *,
    seed: int = DEFAULT_SEED,
    chunk_size: int | None = None,
    using: str = DEFAULT_DB_ALIAS,
    work_dir: Path,
    isolate: bool = True,
    peer_budget: float = DEFAULT_PEER_BUDGET,
    repeat: int = 1,
    progress: Progress | None = None,
) -> ScaleReport:
    """Every strategy of every workload at every size, each from the same start.

    A strategy that fails or ends in another state than the first one is
    reported in ``problems``; the others still run. A peer whose time at the
    previous size, scaled to this size, exceeds ``peer_budget`` seconds is not
    run (the table says so). With ``repeat``, each strategy runs up to that
    many times (see ``measure``). The namespace is deleted at the end.
    """
    report = ScaleReport(list(sizes), list(workloads), [], [])
    for name in workloads:
        cls = WORKLOADS[name]
        last: dict[str, Measurement] = {}
        for size in sizes:
            if cls.max_size is not None and size > cls.max_size:
                note = f"not run above {cls.max_size:,}: {cls.cap_reason}"
                report.measurements.extend(
                    Measurement(name, s.key, s.label, size, note=note) for s in cls.strategies
                )
                continue
            workload = cls(size, seed=seed, chunk_size=chunk_size, using=using, work_dir=work_dir)
            report.chunk_sizes[name] = workload.chunk_size
            skipped: dict[str, Measurement] = {}
            for strategy in cls.strategies:
                previous = last.get(strategy.key)
                if strategy.key in PEERS and (note := over_budget(previous, size, peer_budget)):
                    skipped[strategy.key] = Measurement(
                        name, strategy.key, strategy.label, size, note=note
                    )
            measured = measure(
                workload,
                [s for s in cls.strategies if s.key not in skipped],
                isolate=isolate,
                report=report,
                repeat=repeat,
                after_first_run=EndStates(workload, report),
            )
            for strategy in cls.strategies:
                measurement = skipped.get(strategy.key) or measured[strategy.key]
                report.measurements.append(measurement)
                if measurement.seconds is None:
                    if progress is not None:
                        progress(f"{name} {size:,} {strategy.label}: {measurement.note}")
                    continue
                last[strategy.key] = measurement
                if progress is not None:
                    best = f" (best of {measurement.runs})" if measurement.runs > 1 else ""
                    progress(
                        f"{name} {size:,} {strategy.label}: {measurement.seconds:.2f}s{best}, "
                        f"{measurement.rows_per_second:,.0f} {cls.unit}/s"
                        + (
                            f", peak memory +{measurement.peak_growth_mb:.1f} MB"
                            if measurement.peak_growth_mb is not None
                            else ""
                        )
                    )
    reset_namespace(using)
    return report


class EndStates:
    """Checks each strategy's end state after its first run: every row there, all alike."""

    def __init__(self, workload: Workload, report: ScaleReport) -> None:
        self.workload = workload
        self.report = report
        self.first: tuple[str, dict[str, tuple[int, int]]] | None = None

    def __call__(self, strategy: Strategy) -> None:
        workload, problems = self.workload, self.report.problems
        prints = workload.fingerprints()
        found = next(iter(prints.values()))[0]
        if found != workload.size:
            problems.append(
                ROWS_MISSING.format(
                    workload=workload.name,
                    size=workload.size,
                    strategy=strategy.label,
                    found=found,
                    expected=workload.size,
                )
            )
        if self.first is None:
            self.first = (strategy.label, prints)
        elif prints != self.first[1]:
            problems.append(
                STATES_DIFFER.format(
                    workload=workload.name,
                    size=workload.size,
                    strategy=strategy.label,
                    first=self.first[0],
                )
            )


def over_budget(previous: Measurement | None, size: int, budget: float) -> str:
    """Why a peer is not run at ``size``, or "" when its projected time fits the budget."""
    if previous is None or previous.seconds is None:
        return ""
    projected = previous.seconds * size / previous.size
    if projected <= budget:
        return ""
    return OVER_BUDGET.format(
        projected=projected, seconds=previous.seconds, previous=previous.size, budget=budget
    )


def measure(
    workload: Workload,
    strategies: Sequence[Strategy],
    *,
    isolate: bool,
    report: ScaleReport,
    repeat: int = 1,
    after_first_run: Callable[[Strategy], None] | None = None,
) -> dict[str, Measurement]:
    """Run each strategy from a fresh start, up to ``repeat`` times; the fastest run counts.

    The runs take turns: every strategy runs once, then every strategy
    again, so a slow minute on a shared machine falls on all of them
    rather than on one strategy's every run. A strategy is run again only
    while its runs so far took less than ``REPEAT_BUDGET`` seconds in all, so
    repeats steady the short runs, which a busy machine sways most, without
    multiplying the long ones. Every strategy follows the same rule. Memory
    is the largest growth of any run. ``after_first_run`` is called after
    each strategy's first run, before the next setup (to check its state).
    """
    name, size = workload.name, workload.size
    timings: dict[str, list[Timing]] = {s.key: [] for s in strategies}
    failed: dict[str, Measurement] = {}
    for _ in range(repeat):
        for strategy in strategies:
            runs = timings[strategy.key]
            if strategy.key in failed or sum(t.seconds for t in runs) >= REPEAT_BUDGET:
                continue
            workload.setup()
            try:
                if isolate:
                    runs.append(run_in_child(workload, strategy.key))
                else:
                    runs.append(run_strategy(workload, strategy.key, measure_memory=False))
            except BenchError as exc:
                report.problems.append(str(exc))
                failed[strategy.key] = Measurement(
                    name, strategy.key, strategy.label, size, note=f"failed: {exc}"
                )
                continue
            if len(runs) == 1 and after_first_run is not None:
                after_first_run(strategy)
    measurements = dict(failed)
    for strategy in strategies:
        if strategy.key in failed:
            continue
        runs = timings[strategy.key]
        growths = [t.peak_growth_mb for t in runs if t.peak_growth_mb is not None]
        measurements[strategy.key] = Measurement(
            name,
            strategy.key,
            strategy.label,
            size,
            min(t.seconds for t in runs),
            max(growths) if growths else None,
            runs=len(runs),
        )
    return measurements


# -- reports -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The optimized service at ``size`` must run ``minimum`` times ``strategy``'s rows/s."""

    workload: str
    size: int
    strategy: str
    minimum: float


TARGETS = (
    Target("views", 100_000, RAW, 0.8),
    Target("scores", 100_000, PGBULK, 2.5),
    Target("scores", 100_000, DJANGO, 2.0),
    Target("updates", 100_000, DJANGO, 10.0),
    Target("updates", 100_000, PGBULK, 2.0),
    Target("orders", 10_000, NAIVE, 20.0),
    Target("import", 1_000_000, RAW, 0.6),
)
MEMORY_LIMIT_MB = 100.0
MEMORY_GROWTH_LIMIT = 1.2  # peak growth at 1,000,000 rows against 100,000


def target_rows(report: ScaleReport) -> list[tuple[str, str, str, str]]:
    rows = []
    for target in TARGETS:
        if target.workload not in report.workloads or target.size not in report.sizes:
            continue
        label = WORKLOADS[target.workload].strategy(target.strategy).label
        ratio = report.ratio(target.workload, target.strategy, target.size)
        rows.append(
            (
                f"{target.workload} at {target.size:,}: optimized ÷ {label}",
                f"≥ {target.minimum:.2f}x",
                format_ratio(ratio) if ratio is not None else "not measured",
                "n/a" if ratio is None else ("yes" if ratio >= target.minimum else "**no**"),
            )
        )
    for name in report.workloads:
        peaks = {
            m.size: m.peak_growth_mb
            for m in report.measurements
            if m.workload == name and m.strategy == OPTIMIZED and m.peak_growth_mb is not None
        }
        if not peaks:
            continue
        largest = max(peaks)
        rows.append(
            (
                f"{name} at {largest:,}: optimized peak memory growth",
                f"< {MEMORY_LIMIT_MB:.0f} MB",
                f"{peaks[largest]:.1f} MB",
                "yes" if peaks[largest] < MEMORY_LIMIT_MB else "**no**",
            )
        )
        if 100_000 in peaks and 1_000_000 in peaks and peaks[100_000] > 0:
            growth = peaks[1_000_000] / peaks[100_000]
            rows.append(
                (
                    f"{name}: optimized peak memory growth, 1,000,000 ÷ 100,000",
                    f"≤ {MEMORY_GROWTH_LIMIT:.1f}x",
                    f"{growth:.2f}x",
                    "yes" if growth <= MEMORY_GROWTH_LIMIT else "**no**",
                )
            )
    return rows


def workload_section(report: ScaleReport, name: str) -> list[str]:
    cls = WORKLOADS[name]
    lines = [f"### {cls.title} (`{name}`)", ""]
    lines += [f"- **{s.label}** ({s.kind}): {s.description}." for s in cls.strategies]
    if name in report.chunk_sizes:
        lines.append(f"- Chunks of {report.chunk_sizes[name]:,} rows.")
    lines.append("")
    rows = []
    for size in report.sizes:
        for strategy in cls.strategies:
            m = report.find(name, strategy.key, size)
            if m is None:
                continue
            if m.seconds is None:
                rows.append((m.label, f"{size:,}", "—", "—", "—", "—", "—", m.note))
                continue
            peak = "n/a" if m.peak_growth_mb is None else f"{m.peak_growth_mb:.1f} MB"
            rows.append(
                (
                    m.label,
                    f"{size:,}",
                    f"{m.seconds:.2f} s",
                    str(m.runs),
                    f"{m.rows_per_second:,.0f}",
                    format_ratio(report.ratio(name, strategy.key, size)),
                    peak,
                    "",
                )
            )
    header = (
        "Strategy",
        cls.unit.capitalize(),
        "Time",
        "Runs",
        f"{cls.unit.capitalize()}/s",
        "Optimized ÷ this",
        "Peak memory growth",
        "Note",
    )
    return lines + markdown_table(header, "lrrrrrrl", rows)


def markdown_report(
    report: ScaleReport,
    *,
    command_line: str,
    database: str,
    date: str,
    charts: Sequence[tuple[str, str]] = (),
) -> str:
    """The section of BENCHMARKS.md: how it was made, the targets, one table per workload.

    ``charts`` are (alt text, relative path) pairs to link.
    """
    lines = [
        *section_head(
            "At scale: the optimized service against raw COPY, django-pgbulk and Django",
            command_line,
            database,
            date,
        ),
        "Each strategy runs alone in a fresh process on the same deterministic rows, from the "
        "same starting state, and must leave the same end state. Time is the wall-clock time "
        "of the strategy's call; generating the input rows is part of it for every strategy, "
        "setup and checks are not. *Runs*: how often the strategy ran, each time from the "
        "same start, the strategies of a size taking turns; the fastest run counts (a "
        "strategy runs again only while its runs took "
        f"under {REPEAT_BUDGET:.0f} s in all). *Optimized ÷ this* is the optimized service's "
        "rows/s divided by this strategy's at the same size (above 1: the service is "
        "faster). *Peak memory growth* is the process's peak resident size during the call "
        "minus its resident size before it (the largest of its runs). The peers do not "
        "validate rows or check references, so their figures are upper bounds for the same "
        "job.",
        "",
    ]
    lines += [f"![{alt}]({path})" for alt, path in charts]
    if charts:
        lines.append("")
    targets = target_rows(report)
    if targets:
        lines += ["### Targets", ""]
        lines += markdown_table(("Figure", "Target", "Measured", "Met"), "lrrl", targets)
        lines.append("")
    if report.problems:
        lines += ["### Problems", "", *(f"- {problem}" for problem in report.problems), ""]
    for name in report.workloads:
        lines += workload_section(report, name)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def chart_series(
    report: ScaleReport, value: Callable[[Measurement], float | None]
) -> tuple[list[str], dict[str, list[float | None]]]:
    """Groups (workload and size, in run order) and one series per kind of strategy."""
    cells: list[tuple[str, int]] = []
    for name in report.workloads:
        for size in report.sizes:
            if any(
                m.workload == name and m.size == size and m.seconds is not None
                for m in report.measurements
            ):
                cells.append((name, size))
    kinds = [
        key for key in KINDS if any(m.strategy == key for m in report.measurements if m.seconds)
    ]
    series: dict[str, list[float | None]] = {}
    for key in kinds:
        values = []
        for name, size in cells:
            m = report.find(name, key, size)
            values.append(None if m is None or m.seconds is None else value(m))
        series[KINDS[key]] = values
    groups = [f"{name} {short_size(size)}" for name, size in cells]
    return groups, series


def throughput_chart(report: ScaleReport) -> str:
    groups, series = chart_series(report, lambda m: m.rows_per_second)
    return bar_chart(
        groups,
        series,
        title="Throughput by strategy, workload and size (PostgreSQL)",
        y_label="rows/s (log scale)",
        log_scale=True,
        width=max(720, 100 * len(groups) + 120),
        height=420,
    )


def memory_chart(report: ScaleReport) -> str:
    groups, series = chart_series(report, lambda m: m.peak_growth_mb)
    return bar_chart(
        groups,
        series,
        title="Peak memory growth by strategy, workload and size",
        y_label="MB",
        width=max(720, 100 * len(groups) + 120),
        height=360,
    )
