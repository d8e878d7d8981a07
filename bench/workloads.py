"""The benchmarks' workloads: each operation's rows, base state and end state, defined once.

A workload is one job at one size: the base state it starts from
(``create_base``), the deterministic rows it writes (``rows``, or the import's
CSV file, from the seed and row numbers mapped onto the current ids by
``prepare``) and its end state in logical terms (``state``: usernames and
skus, never ids). Its strategies (the services, raw SQL, django-pgbulk,
Django's bulk methods) all consume the same generator of dicts, the service's
input format. Every strategy must leave the same end state, but for the
entries in ``service_only`` that only the services keep up (``view_count``).
The raw strategies are PostgreSQL only; the rest runs on any database.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.utils import timezone
from psycopg import sql

from batching.engine import BatchResult, chunked
from batching.models import BatchProcessingLog
from batching.postgres import array_type, column, copy_rows, execute, model_field
from batching.readers import RowStream
from bench.namespace import (
    CATEGORY_PREFIX,
    DEFAULT_SEED,
    ORDER_PREFIX,
    PRODUCT_FIELDS,
    PRODUCT_POOL,
    SKU_PREFIX,
    USER_POOL,
    Kept,
    category_name,
    copy_products,
    create_categories,
    create_users,
    insert_rows,
    product_ids,
    product_sku,
    reset_namespace,
    table,
    user_ids,
    vacuum,
)
from bench.report import BenchError
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService
from products.services.base import BulkOperationsService

try:  # a benchmark-only extra: pip install -e ".[bench]"
    import pgbulk
except ImportError:  # pragma: no cover
    pgbulk = None  # type: ignore[assignment]  # bench_scale checks for None

HASH_MASK = (1 << 64) - 1
STAGING_TABLE = "scale_bench_staging"  # the raw strategies' temporary table
COPY_BLOCK = 1 << 20
# bulk_update writes a WHEN per row and field: batches run far faster than one statement.
DJANGO_UPDATE_BATCH = 1000
ITEMS_PER_ORDER = 3
ALGORITHMS = ("collaborative", "content_based", "trending")
INTERACTIONS = (  # views mostly look, some click, few buy
    (ProductView.InteractionType.VIEW, 70),
    (ProductView.InteractionType.CLICK, 20),
    (ProductView.InteractionType.ADD_TO_CART, 7),
    (ProductView.InteractionType.PURCHASE, 3),
)
BASE_TIME = datetime(2024, 6, 1, tzinfo=UTC)  # rows independent of the clock
STOCK_MARGIN = 5  # stock left on every ordered product after the orders: all fit

# Strategy keys; a key is the same kind of tool in every workload, run by ``run_<key>``.
OPTIMIZED, RAW, PGBULK, DJANGO, NAIVE = "optimized", "raw", "pgbulk", "django", "naive"
KINDS = {
    OPTIMIZED: "optimized service",
    RAW: "raw SQL",
    PGBULK: "django-pgbulk",
    DJANGO: "Django ORM",
    NAIVE: "naive service",
}
RUN_INCOMPLETE = "{workload} with {strategy} ended {status}: {errors}"
UNKNOWN_STRATEGY = "{workload} has no strategy {strategy!r}: choose one of {choices}"


def shuffled(size: int) -> Iterator[int]:
    """0..size-1 in a fixed scattered order (a prime stride), as unsorted input comes."""
    stride = 7919
    while math.gcd(stride, size) != 1:
        stride += 2
    return ((position * stride + size // 3) % size for position in range(size))


def price_of(number: int) -> str:
    """A deterministic price between 1.00 and 999.99, as text like a file holds it."""
    return str(Decimal(100 + (number * 7_919) % 99_900) / 100)


def fraction(number: int, salt: int) -> float:
    """A deterministic score in [0, 1) with six decimals."""
    return ((number * 2_654_435_761 + salt) % 1_000_000) / 1_000_000


def columns(model: type[models.Model], fields: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(column(model, f) for f in fields)


def temp_table(using: str, name: str, definitions: sql.Composable) -> None:
    statement = sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP")
    execute(using, statement.format(sql.Identifier(name), definitions))


def copy_in(
    using: str,
    statement: sql.Composable,
    rows: Iterable[Sequence[Any]] = (),
    blocks: Iterable[bytes | str] = (),
) -> None:
    """Text COPY ``rows`` (then raw ``blocks``) by ``statement``, e.g. into a temporary
    table, which ``batching.postgres.copy_rows`` (a model's table) cannot name."""
    connection = connections[using]
    connection.ensure_connection()
    with connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
        for block in blocks:
            copy.write(block)


def stage(
    using: str, model: type[models.Model], fields: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """COPY ``rows`` (the service's input, prices as text) into a new staging table with
    ``fields``' columns and types, inside a transaction."""
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(
            column(model, name), sql.SQL(array_type(model_field(model, name), connections[using]))
        )
        for name in fields
    )
    temp_table(using, STAGING_TABLE, definitions)
    statement = sql.SQL("COPY {} ({}) FROM STDIN")
    copy_in(using, statement.format(sql.Identifier(STAGING_TABLE), columns(model, fields)), rows)


@contextmanager
def raw_transaction(using: str) -> Iterator[None]:
    """The raw strategies' one transaction, its foreign keys checked by each statement.

    As the service's chunks check theirs. Left to COMMIT, the checks of a
    large raw run use plans cached while the referenced table was small, and
    beside the live players (whose updates the long transaction keeps from
    being pruned) that COMMIT could run for many minutes.
    """
    with transaction.atomic(using=using):
        execute(using, sql.SQL("SET CONSTRAINTS ALL IMMEDIATE"))
        yield


def check_completed(workload: str, strategy: str, result: BatchResult) -> None:
    if result.status != BatchProcessingLog.Status.COMPLETED:
        errors = "; ".join(f"row {e.index}: {e.field}: {e.message}" for e in result.errors[:3])
        raise BenchError(
            RUN_INCOMPLETE.format(
                workload=workload,
                strategy=strategy,
                status=result.status,
                errors=errors or result.log.error_summary or "no row errors",
            )
        )


def fingerprint(rows: Iterable[tuple]) -> tuple[int, int]:
    """(count, order-independent hash): equal multisets of rows give equal results.

    String hashes are salted per process: fingerprints compare within one process.
    """
    count = total = 0
    for row in rows:
        count += 1
        total = (total + hash(row)) & HASH_MASK
    return count, total


@dataclass(frozen=True, slots=True)
class Strategy:
    """One way to do a workload's job, run by the workload's ``run_<key>``."""

    key: str
    label: str
    description: str

    @property
    def kind(self) -> str:
        return KINDS[self.key]


class Workload(ABC):
    """One job done by several strategies on the same input from the same start.

    Before each run ``setup`` (reset, base state, ``VACUUM ANALYZE``); then
    ``prepare`` (read the ids the input refers to, not timed) and ``run`` one
    strategy, or ``run_service`` with either service; after it ``snapshot`` or
    ``fingerprints``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str] = "rows"
    method: ClassVar[str]  # the service method that does the job, naive or optimized
    strategies: ClassVar[tuple[Strategy, ...]]
    tables: ClassVar[tuple[type[models.Model], ...]]
    service_only: ClassVar[frozenset[str]] = frozenset()
    max_size: ClassVar[int | None] = None
    cap_reason: ClassVar[str] = ""
    # bench_scale's chunk: throughput in isolation, where large chunks pay off.
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
        self.size, self.seed, self.using = size, seed, using
        self.chunk_size = chunk_size or self.chunk
        self.work_dir = work_dir or Path(settings.BASE_DIR)

    @classmethod
    def strategy(cls, key: str) -> Strategy:
        for strategy in cls.strategies:
            if strategy.key == key:
                return strategy
        choices = ", ".join(s.key for s in cls.strategies)
        raise KeyError(UNKNOWN_STRATEGY.format(workload=cls.name, strategy=key, choices=choices))

    def setup(self, keep: Kept | None = None) -> None:
        reset_namespace(self.using, keep)
        with transaction.atomic(using=self.using):
            self.create_base()
        vacuum(self.using, self.tables)

    @abstractmethod
    def create_base(self) -> None: ...

    def prepare(self) -> None:  # noqa: B027 (an optional hook)
        """Read what the input refers to (ids), before the clock starts."""

    def rows(self) -> Iterator[dict[str, Any]]:
        """The service's input, generated as it is consumed (after ``prepare``)."""
        raise NotImplementedError(f"{self.name} reads its input from a file")

    def service_input(self) -> Iterable[Any]:
        return self.rows()

    def run_service(self, service: BulkOperationsService, chunk_size: int | None) -> BatchResult:
        return getattr(service, self.method)(self.service_input(), chunk_size=chunk_size)

    def run(self, key: str) -> None:
        getattr(self, f"run_{self.strategy(key).key}")()

    def run_optimized(self) -> None:
        result = self.run_service(OptimizedBulkOperationsService(using=self.using), self.chunk_size)
        check_completed(self.name, OPTIMIZED, result)

    def run_naive(self) -> None:
        result = self.run_service(NaiveBulkOperationsService(using=self.using), self.chunk_size)
        check_completed(self.name, NAIVE, result)

    def bulk(self, model: type[models.Model], rows: Iterable[Any], write) -> None:
        """``write(queryset, chunk)`` per chunk of ``rows``: the chunked peers' loop."""
        queryset = model._default_manager.using(self.using)
        for chunk in chunked(iter(rows), self.chunk_size):
            write(queryset, chunk)

    @abstractmethod
    def state(self) -> dict[str, Iterable[tuple]]:
        """The end state in logical terms; the first entry has one row per input row."""

    def snapshot(self, *, shared: bool = False) -> dict[str, list[tuple]]:
        """The end state, sorted; ``shared``: without the ``service_only`` entries."""
        return {
            name: sorted(rows)
            for name, rows in self.state().items()
            if not (shared and name in self.service_only)
        }

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        """The end state every strategy must leave alike, as fingerprints."""
        return {
            name: fingerprint(rows)
            for name, rows in self.state().items()
            if name not in self.service_only
        }

    def values(self, queryset: models.QuerySet, *fields: str) -> Iterable[tuple]:
        return queryset.using(self.using).values_list(*fields).iterator(chunk_size=10_000)


def bench_products() -> models.QuerySet:
    return Product.objects.filter(sku__startswith=SKU_PREFIX)


class ViewsWorkload(Workload):
    """Append-only product views over 50 users and 100 products."""

    name = "views"
    title = "Product views, append-only"
    method = "create_product_views"
    tables = (ProductView, Product)
    service_only = frozenset({"view_counts"})
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized create_product_views",
            "validates every row, checks users and products, inserts, adds to view_count",
        ),
        Strategy(RAW, "raw COPY", "one COPY of every row, nothing checked"),
        Strategy(PGBULK, "pgbulk.copy", "one COPY per chunk of model objects"),
        Strategy(DJANGO, "bulk_create", "one bulk_create per chunk"),
    )
    fields = ("user", "product", "session_id", "interaction_type", "created_at")
    keys = ("user_id", "product_id", "session_id", "interaction_type", "created_at")
    # 100 entries: the interaction mix, as plain strings.
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

    def objects(self) -> Iterator[ProductView]:
        return (ProductView(**row) for row in self.rows())

    def run_raw(self) -> None:
        with raw_transaction(self.using):
            rows = (tuple(row[key] for key in self.keys) for row in self.rows())
            copy_rows(ProductView, self.fields, rows, using=self.using)

    def run_pgbulk(self) -> None:
        self.bulk(ProductView, self.objects(), lambda qs, c: pgbulk.copy(qs, c, list(self.fields)))

    def run_django(self) -> None:
        self.bulk(ProductView, self.objects(), lambda queryset, chunk: queryset.bulk_create(chunk))

    def state(self) -> dict[str, Iterable[tuple]]:
        views = ProductView.objects.filter(product__sku__startswith=SKU_PREFIX)
        return {
            "views": self.values(
                views,
                "user__username",
                "product__sku",
                "session_id",
                "interaction_type",
                "created_at",
            ),
            "view_counts": bench_products().using(self.using).values_list("sku", "view_count"),
        }


class ScoresWorkload(Workload):
    """Score upserts with unique keys: half update existing scores, half are new."""

    name = "scores"
    title = "Recommendation-score upsert, half new"
    method = "upsert_recommendation_scores"
    tables = (RecommendationScore, Product)
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized upsert_recommendation_scores",
            "validates every row, checks users and products, one upsert per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + upsert",
            "COPY of every row into a temporary table, then one INSERT ... ON CONFLICT",
        ),
        Strategy(PGBULK, "pgbulk.upsert", "one pgbulk.upsert per chunk"),
        Strategy(
            DJANGO,
            "bulk_create(update_conflicts=True)",
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
        rows = (
            (users[user], products[product], algorithm, fraction(number, 7), now)
            for number in range(0, self.size, 2)
            for user, product, algorithm in [self.key(number)]
        )
        insert_rows(self.using, RecommendationScore, [*self.key_fields, *self.update_fields], rows)

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

    def objects(self) -> Iterator[RecommendationScore]:
        return (RecommendationScore(**row) for row in self.rows())

    def run_raw(self) -> None:
        fields = ["user", "product", "algorithm", "score"]
        rows = ((r["user_id"], r["product_id"], r["algorithm"], r["score"]) for r in self.rows())
        with raw_transaction(self.using):
            stage(self.using, RecommendationScore, fields, rows)
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
                    score=column(RecommendationScore, "score"),
                    updated=column(RecommendationScore, "updated_at"),
                ),
            )

    def run_pgbulk(self) -> None:
        self.bulk(
            RecommendationScore,
            self.objects(),
            lambda qs, chunk: pgbulk.upsert(qs, chunk, self.key_fields, self.update_fields),
        )

    def run_django(self) -> None:
        def write(queryset: models.QuerySet, chunk: list[RecommendationScore]) -> None:
            queryset.bulk_create(
                chunk,
                update_conflicts=True,
                unique_fields=self.key_fields,
                update_fields=self.update_fields,
            )

        self.bulk(RecommendationScore, self.objects(), write)

    def state(self) -> dict[str, Iterable[tuple]]:
        scores = RecommendationScore.objects.filter(product__sku__startswith=SKU_PREFIX)
        fields = ("user__username", "product__sku", "algorithm", "score")
        return {"scores": self.values(scores, *fields)}


UPDATE_FIELDS = ["price", "stock_quantity", "updated_at"]


class UpdatesWorkload(Workload):
    """A new price and stock for every existing product, keyed by sku."""

    name = "updates"
    title = "Price and stock update of existing products"
    method = "update_products"
    tables = (Product,)
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized update_products",
            "validates every row, checks every sku exists, one UPDATE per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + UPDATE",
            "COPY of every row into a temporary table, then one UPDATE ... FROM",
        ),
        Strategy(
            PGBULK,
            "pgbulk.update",
            "per chunk: one query for the ids of the skus, one pgbulk.update",
        ),
        Strategy(
            DJANGO,
            "bulk_update",
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
        products = Product.objects.using(self.using).filter(sku__in=[row["sku"] for row in rows])
        ids, now = dict(products.values_list("sku", "pk")), timezone.now()
        return [
            Product(
                pk=ids[row["sku"]],
                price=Decimal(row["price"]),
                stock_quantity=row["stock_quantity"],
                updated_at=now,
            )
            for row in rows
        ]

    def run_raw(self) -> None:
        rows = ((r["sku"], r["price"], r["stock_quantity"]) for r in self.rows())
        with raw_transaction(self.using):
            stage(self.using, Product, ["sku", "price", "stock_quantity"], rows)
            execute(
                self.using,
                sql.SQL(
                    "UPDATE {table} AS p SET {price} = s.{price}, {stock} = s.{stock}, "
                    "{updated} = now() FROM {staging} AS s WHERE p.{sku} = s.{sku}"
                ).format(
                    table=table(Product),
                    staging=sql.Identifier(STAGING_TABLE),
                    sku=column(Product, "sku"),
                    price=column(Product, "price"),
                    stock=column(Product, "stock_quantity"),
                    updated=column(Product, "updated_at"),
                ),
            )

    def run_pgbulk(self) -> None:
        def write(queryset: models.QuerySet, chunk: list[dict[str, Any]]) -> None:
            with transaction.atomic(using=self.using):
                pgbulk.update(queryset, self.objects(chunk), UPDATE_FIELDS)

        self.bulk(Product, self.rows(), write)

    def run_django(self) -> None:
        def write(queryset: models.QuerySet, chunk: list[dict[str, Any]]) -> None:
            with transaction.atomic(using=self.using):
                queryset.bulk_update(
                    self.objects(chunk), UPDATE_FIELDS, batch_size=DJANGO_UPDATE_BATCH
                )

        self.bulk(Product, self.rows(), write)

    def state(self) -> dict[str, Iterable[tuple]]:
        return {"products": self.values(bench_products(), "sku", "price", "stock_quantity")}


class OrdersWorkload(Workload):
    """Orders of 3 distinct products each over 50 users and 100 products; the stock
    covers every order with ``STOCK_MARGIN`` to spare, so all are accepted."""

    name = "orders"
    title = "Orders of 3 items"
    unit = "orders"
    method = "process_orders"
    tables = (Order, OrderItem, Product)
    max_size = 10_000
    cap_reason = "the naive service runs about 150 orders/s"
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized process_orders",
            "locks the chunk's products, decides every order, 6 queries per chunk",
        ),
        Strategy(NAIVE, "naive process_orders", "the N+1 baseline: queries and saves row by row"),
    )

    def __init__(self, size: int, **options: Any) -> None:
        """Draw the orders, in product and user numbers, and the stock that covers them."""
        super().__init__(size, **options)
        rng = random.Random(f"{self.seed}:{self.name}")
        self.prices = [Decimal(rng.randint(99, 99_999)) / 100 for _ in range(PRODUCT_POOL)]
        self.drawn = [
            (
                f"{ORDER_PREFIX}ORDER-{number:07d}",
                rng.randrange(USER_POOL),
                [
                    (product, rng.randint(1, 3))
                    for product in rng.sample(range(PRODUCT_POOL), ITEMS_PER_ORDER)
                ],
            )
            for number in range(size)
        ]
        demand: Counter[int] = Counter()
        for _, _, lines in self.drawn:
            for product, quantity in lines:
                demand[product] += quantity
        self.stock = [demand[product] + STOCK_MARGIN for product in range(PRODUCT_POOL)]

    def create_base(self) -> None:
        (category_id,) = create_categories(self.using, 1)
        create_users(self.using, USER_POOL)
        Product.objects.using(self.using).bulk_create(
            Product(
                sku=product_sku(number),
                name=f"Bench product {number}",
                category_id=category_id,
                price=self.prices[number],
                stock_quantity=self.stock[number],
            )
            for number in range(PRODUCT_POOL)
        )

    def prepare(self) -> None:
        users, products = user_ids(self.using), product_ids(self.using, PRODUCT_POOL)
        self.orders: list[dict[str, Any]] = [
            {
                "reference": reference,
                "user_id": users[user],
                "items": [
                    {"product_id": products[product], "quantity": quantity}
                    for product, quantity in lines
                ],
            }
            for reference, user, lines in self.drawn
        ]

    def service_input(self) -> list[dict[str, Any]]:
        return self.orders

    def state(self) -> dict[str, Iterable[tuple]]:
        orders = Order.objects.using(self.using).filter(reference__startswith=ORDER_PREFIX)
        items = OrderItem.objects.using(self.using).filter(
            order__reference__startswith=ORDER_PREFIX
        )
        return {
            "orders": orders.values_list("reference", "user__username", "total"),
            "items": items.values_list(
                "order__reference", "product__sku", "quantity", "unit_price"
            ),
            "stock": bench_products().using(self.using).values_list("sku", "stock_quantity"),
        }


IMPORT_COLUMNS = ("sku", "name", "category", "price", "stock_quantity", "is_active")


class ImportWorkload(Workload):
    """A catalogue CSV file: half the skus exist, half are new, one category is new."""

    name = "import"
    title = "Product import from a CSV file"
    method = "import_products"
    tables = (Product, Category)
    base_categories = 4
    first_product = 0
    chunk = 20_000  # a catalogue row weighs more; memory stays flat and small at 20,000
    strategies = (
        Strategy(
            OPTIMIZED,
            "optimized import_products",
            "streams the file with RowStream, validates every row, one upsert per chunk",
        ),
        Strategy(
            RAW,
            "raw COPY + upsert",
            "COPY of the file into a temporary table, missing categories, one upsert",
        ),
    )

    @property
    def path(self) -> Path:
        return self.work_dir / f"scale-bench-import-{self.size}-{self.seed}.csv"

    def prepare(self) -> None:
        self.input_file()

    def input_file(self) -> Path:
        """The input file, written once per size and seed (not timed)."""
        if self.path.exists():
            return self.path
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
        return self.path

    def create_base(self) -> None:
        """The first half of the skus exist (from ``first_product``), in the base categories."""
        names = [category_name(number) for number in range(self.base_categories)]
        categories = Category.objects.using(self.using)
        categories.bulk_create([Category(name=name) for name in names], ignore_conflicts=True)
        ids = dict(categories.filter(name__in=names).values_list("name", "pk"))
        copy_products(
            self.using,
            range(self.first_product, self.size // 2),
            lambda number: ids[names[number % self.base_categories]],
            "1.00",
            1,
        )

    def run_service(self, service: BulkOperationsService, chunk_size: int | None) -> BatchResult:
        """The file read as the import command reads it, through ``RowStream``."""
        with RowStream(self.path) as stream:
            return service.import_products(stream, chunk_size=chunk_size)

    def run_raw(self) -> None:
        staging = sql.Identifier(STAGING_TABLE)
        staged = ["sku", "name", "category_name", "price", "stock_quantity", "is_active"]
        categories, name = table(Category), sql.Identifier("name")
        with raw_transaction(self.using), open(self.path, "rb") as file:
            temp_table(
                self.using,
                STAGING_TABLE,
                sql.SQL(
                    "sku varchar, name varchar, category_name varchar, "
                    "price numeric, stock_quantity integer, is_active boolean"
                ),
            )
            copy_in(
                self.using,
                sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv, HEADER true)").format(
                    staging, sql.SQL(", ").join(map(sql.Identifier, staged))
                ),
                blocks=iter(lambda: file.read(COPY_BLOCK), b""),
            )
            execute(
                self.using,
                sql.SQL(
                    "INSERT INTO {categories} ({name}) SELECT DISTINCT category_name "
                    "FROM {staging} ON CONFLICT ({name}) DO NOTHING"
                ).format(categories=categories, name=name, staging=staging),
            )
            updated = ("name", "category", "price", "stock_quantity", "is_active", "updated_at")
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
                    categories=categories,
                    name=name,
                    sku=column(Product, "sku"),
                    updates=sql.SQL(", ").join(
                        sql.SQL("{0} = EXCLUDED.{0}").format(column(Product, field))
                        for field in updated
                    ),
                ),
            )

    def state(self) -> dict[str, Iterable[tuple]]:
        categories = Category.objects.using(self.using).filter(name__startswith=CATEGORY_PREFIX)
        fields = ("sku", "name", "category__name", "price", "stock_quantity", "is_active")
        return {
            "products": self.values(bench_products(), *fields),
            "categories": categories.values_list("name"),
        }


WORKLOADS: dict[str, type[Workload]] = {
    workload.name: workload
    for workload in (ViewsWorkload, ScoresWorkload, UpdatesWorkload, OrdersWorkload, ImportWorkload)
}
