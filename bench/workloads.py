"""The benchmarks' workloads: each operation's rows, base state and end state, defined once.

Every strategy of a workload (the services, raw SQL, django-pgbulk, Django's
bulk methods) consumes the same generator of dicts, the service's input, and
must leave the same end state, but for the ``service_only`` entries that only
the services keep up (``view_count``). Raw strategies are PostgreSQL only.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.utils import timezone
from psycopg import sql

from batching.engine import BatchResult, chunked
from batching.models import BatchProcessingLog
from batching.postgres import array_type, copy_rows, each, execute, model_field, quoted
from batching.readers import RowStream
from bench import namespace as ns
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
KINDS = {OPTIMIZED: "optimized service", RAW: "raw SQL", PGBULK: "django-pgbulk"}
KINDS |= {DJANGO: "Django ORM", NAIVE: "naive service"}
RUN_INCOMPLETE = "{workload} with {strategy} ended {status}: {errors}"
UNKNOWN_STRATEGY = "{workload} has no strategy {strategy!r}: choose one of {choices}"
SERVICES = {OPTIMIZED: OptimizedBulkOperationsService, NAIVE: NaiveBulkOperationsService}


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


def temp_table(using: str, name: str, definitions: str) -> None:
    statement = sql.SQL("CREATE TEMPORARY TABLE {} ({}) ON COMMIT DROP")
    execute(using, statement.format(sql.Identifier(name), sql.SQL(definitions)))


def copy_in(
    using: str, statement: str, rows: Iterable[Sequence] = (), blocks: Iterable = ()
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


def stage(using: str, model: type[models.Model], fields: Sequence[str], rows: Iterable) -> None:
    """COPY ``rows`` (the service's input, prices as text) into a new staging table with
    ``fields``' columns and types, inside a transaction."""
    connection = connections[using]
    columns = each(connection, model, fields)
    types = (array_type(model_field(model, name), connection) for name in fields)
    definitions = ", ".join(f"{c} {t}" for c, t in zip(columns, types, strict=True))
    temp_table(using, STAGING_TABLE, definitions)
    staging = connection.ops.quote_name(STAGING_TABLE)
    copy_in(using, f"COPY {staging} ({', '.join(columns)}) FROM STDIN", rows)


def excluded(connection, model: type[models.Model], *fields: str) -> str:
    """``column = EXCLUDED.column, ...``: an upsert's SET clause."""
    return ", ".join(f"{c} = EXCLUDED.{c}" for c in each(connection, model, fields))


@contextmanager
def raw_transaction(using: str) -> Iterator[None]:
    """The raw strategies' one transaction, its foreign keys checked by each statement, as
    the service's chunks check theirs: left to COMMIT, the checks of a large run use plans
    cached while the referenced table was small and, beside the live players, could run
    for many minutes."""
    with transaction.atomic(using=using):
        execute(using, "SET CONSTRAINTS ALL IMMEDIATE")
        yield


def check_completed(workload: str, strategy: str, result: BatchResult) -> None:
    if result.status != BatchProcessingLog.Status.COMPLETED:
        errors = "; ".join(f"row {e.index}: {e.field}: {e.message}" for e in result.errors[:3])
        errors = errors or result.log.error_summary or "no row errors"
        raise BenchError(
            RUN_INCOMPLETE.format(
                workload=workload, strategy=strategy, status=result.status, errors=errors
            )
        )


def fingerprint(rows: Iterable[tuple]) -> tuple[int, int]:
    """(count, order-independent hash): equal multisets of rows give equal results.
    String hashes are salted per process: fingerprints compare within one process."""
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


class Workload:
    """One job done by several strategies on the same input from the same start.

    Before each run ``setup`` (reset, base state, ``VACUUM ANALYZE``); then
    ``prepare`` (read the ids the input refers to, not timed) and ``run`` one
    strategy, or ``run_service`` with either service; after it ``snapshot`` or
    ``fingerprints``. A subclass declares ``described``: per strategy key its
    description, or (label, description); the services' labels name ``method``.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str] = "rows"
    method: ClassVar[str]  # the service method that does the job, naive or optimized
    described: ClassVar[dict[str, str | tuple[str, str]]]
    strategies: ClassVar[tuple[Strategy, ...]]
    tables: ClassVar[tuple[type[models.Model], ...]]
    service_only: ClassVar[frozenset[str]] = frozenset()
    max_size: ClassVar[int | None] = None
    cap_reason: ClassVar[str] = ""
    # bench_scale's chunk: throughput in isolation, where large chunks pay off.
    chunk: ClassVar[int] = 50_000

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "described" in cls.__dict__:
            cls.strategies = tuple(
                Strategy(key, *(text if isinstance(text, tuple) else (f"{key} {cls.method}", text)))
                for key, text in cls.described.items()
            )

    def __init__(
        self,
        size: int,
        *,
        seed: int = ns.DEFAULT_SEED,
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

    def setup(self, keep: ns.Kept | None = None) -> None:
        ns.reset_namespace(self.using, keep)
        with transaction.atomic(using=self.using):
            self.create_base()
        ns.vacuum(self.using, self.tables)

    def create_base(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Read what the input refers to (ids), before the clock starts."""
        self.users = ns.user_ids(self.using)
        self.products = ns.product_ids(self.using, ns.PRODUCT_POOL)

    def rows(self) -> Iterator[dict[str, Any]]:
        """The service's input, generated as it is consumed (after ``prepare``)."""
        raise NotImplementedError(f"{self.name} reads its input from a file")

    def service_input(self) -> Iterable[Any]:
        return self.rows()

    def run_service(self, service: BulkOperationsService, chunk_size: int | None) -> BatchResult:
        return getattr(service, self.method)(self.service_input(), chunk_size=chunk_size)

    def run(self, key: str) -> None:
        if (key := self.strategy(key).key) in SERVICES:
            self.run_checked(key, self.chunk_size)
        else:
            getattr(self, f"run_{key}")()

    def run_checked(self, key: str, chunk_size: int | None) -> None:
        result = self.run_service(SERVICES[key](using=self.using), chunk_size)
        check_completed(self.name, key, result)

    def bulk(self, model: type[models.Model], write, rows: Iterable[Any] | None = None) -> None:
        """``write(queryset, chunk)`` per chunk of ``rows`` (by default ``model`` objects made
        of the input): the chunked peers' loop."""
        queryset = model._default_manager.using(self.using)
        rows = (model(**row) for row in self.rows()) if rows is None else rows
        for chunk in chunked(iter(rows), self.chunk_size):
            write(queryset, chunk)

    def state(self) -> dict[str, Iterable[tuple]]:
        """The end state in logical terms; the first entry has one row per input row."""
        raise NotImplementedError

    def snapshot(self, *, shared: bool = False) -> dict[str, list[tuple]]:
        """The end state, sorted; ``shared``: without the ``service_only`` entries."""
        state = self.state().items()
        return {k: sorted(v) for k, v in state if not (shared and k in self.service_only)}

    def fingerprints(self) -> dict[str, tuple[int, int]]:
        """The end state every strategy must leave alike, as fingerprints."""
        state = self.state().items()
        return {k: fingerprint(v) for k, v in state if k not in self.service_only}

    def values(self, queryset: models.QuerySet, *fields: str) -> Iterable[tuple]:
        return queryset.using(self.using).values_list(*fields).iterator(chunk_size=10_000)

    def products_base(self, count: int, stock: int = 100) -> int:
        """One category, ``count`` products at 10.00; the category's id."""
        (category_id,) = ns.create_categories(self.using, 1)
        ns.copy_products(self.using, range(count), lambda _: category_id, "10.00", stock)
        return category_id


def bench_products() -> models.QuerySet:
    return Product.objects.filter(sku__startswith=ns.SKU_PREFIX)


class ViewsWorkload(Workload):
    """Append-only product views over 50 users and 100 products."""

    name, title, method = "views", "Product views, append-only", "create_product_views"
    tables = (ProductView, Product)
    service_only = frozenset({"view_counts"})
    described = {
        OPTIMIZED: "validates every row, checks users and products, inserts, adds to view_count",
        RAW: ("raw COPY", "one COPY of every row, nothing checked"),
        PGBULK: ("pgbulk.copy", "one COPY per chunk of model objects"),
        DJANGO: ("bulk_create", "one bulk_create per chunk"),
    }
    fields = ("user", "product", "session_id", "interaction_type", "created_at")
    keys = ("user_id", "product_id", "session_id", "interaction_type", "created_at")
    # 100 entries: the interaction mix, as plain strings.
    kinds = tuple(str(kind.value) for kind, weight in INTERACTIONS for _ in range(weight))

    def create_base(self) -> None:
        ns.create_users(self.using, ns.USER_POOL)
        self.products_base(ns.PRODUCT_POOL)

    def rows(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"{self.seed}:scale:{self.name}")
        sessions = [f"bench-session-{user:04d}" for user in range(ns.USER_POOL)]
        users, products, kinds = self.users, self.products, self.kinds
        for position in range(self.size):
            bits = rng.getrandbits(32)
            user = bits % ns.USER_POOL
            yield {
                "user_id": users[user],
                "product_id": products[(bits >> 8) % ns.PRODUCT_POOL],
                "session_id": sessions[user],
                "interaction_type": kinds[(bits >> 16) % len(kinds)],
                "created_at": BASE_TIME + timedelta(seconds=position),
            }

    def run_raw(self) -> None:
        with raw_transaction(self.using):
            row_of = itemgetter(*self.keys)
            rows = (row_of(row) for row in self.rows())
            copy_rows(ProductView, self.fields, rows, using=self.using)

    def run_pgbulk(self) -> None:
        self.bulk(ProductView, lambda qs, chunk: pgbulk.copy(qs, chunk, list(self.fields)))

    def run_django(self) -> None:
        self.bulk(ProductView, lambda queryset, chunk: queryset.bulk_create(chunk))

    def state(self) -> dict[str, Iterable[tuple]]:
        views = ProductView.objects.filter(product__sku__startswith=ns.SKU_PREFIX)
        fields = ("user__username", "product__sku", "session_id", "interaction_type", "created_at")
        return {
            "views": self.values(views, *fields),
            "view_counts": bench_products().using(self.using).values_list("sku", "view_count"),
        }


class ScoresWorkload(Workload):
    """Score upserts with unique keys: half update existing scores, half are new."""

    name, title = "scores", "Recommendation-score upsert, half new"
    method = "upsert_recommendation_scores"
    tables = (RecommendationScore, Product)
    described = {
        OPTIMIZED: "validates every row, checks users and products, one upsert per chunk",
        RAW: (
            "raw COPY + upsert",
            "COPY of every row into a temporary table, then one INSERT ... ON CONFLICT",
        ),
        PGBULK: ("pgbulk.upsert", "one pgbulk.upsert per chunk"),
        DJANGO: (
            "bulk_create(update_conflicts=True)",
            "one bulk_create(update_conflicts=True) per chunk",
        ),
    }
    key_fields = ["user", "product", "algorithm"]
    update_fields = ["score", "updated_at"]

    @property
    def product_pool(self) -> int:
        return math.ceil(self.size / (ns.USER_POOL * len(ALGORITHMS)))

    def key(self, number: int) -> tuple[int, int, str]:
        """Key number k as (user, product, algorithm) numbers: k covers them densely."""
        rest, algorithm = divmod(number, len(ALGORITHMS))
        product, user = divmod(rest, ns.USER_POOL)
        return user, product, ALGORITHMS[algorithm]

    def create_base(self) -> None:
        users = ns.create_users(self.using, ns.USER_POOL)
        self.products_base(self.product_pool)
        self.copy_existing_scores(users, ns.product_ids(self.using, self.product_pool))

    def copy_existing_scores(self, users: list[int], products: list[int]) -> None:
        """Even key numbers exist with another score; the input updates them."""
        now = timezone.now()
        rows = (
            (users[user], products[product], algorithm, fraction(number, 7), now)
            for number in range(0, self.size, 2)
            for user, product, algorithm in [self.key(number)]
        )
        fields = [*self.key_fields, *self.update_fields]
        ns.insert_rows(self.using, RecommendationScore, fields, rows)

    def prepare(self) -> None:
        self.users = ns.user_ids(self.using)
        self.products = ns.product_ids(self.using, self.product_pool)

    def rows(self) -> Iterator[dict[str, Any]]:
        users, products = self.users, self.products
        for number in shuffled(self.size):
            user, product, algorithm = self.key(number)
            score = fraction(number, self.seed)
            yield {
                "user_id": users[user],
                "product_id": products[product],
                "algorithm": algorithm,
                "score": score,
            }

    def run_raw(self) -> None:
        fields = ["user", "product", "algorithm", "score"]
        rows = ((r["user_id"], r["product_id"], r["algorithm"], r["score"]) for r in self.rows())
        connection = connections[self.using]
        q = partial(quoted, connection, RecommendationScore)
        updates = excluded(connection, RecommendationScore, *self.update_fields)
        staging = connection.ops.quote_name(STAGING_TABLE)
        with raw_transaction(self.using):
            stage(self.using, RecommendationScore, fields, rows)
            execute(
                self.using,
                f"INSERT INTO {q()} ({q(*fields, 'updated_at')}) SELECT {q(*fields)}, now() FROM "
                f"{staging} ON CONFLICT ({q(*self.key_fields)}) DO UPDATE SET {updates}",
            )

    def run_pgbulk(self) -> None:
        conflict = {"unique_fields": self.key_fields, "update_fields": self.update_fields}
        self.bulk(RecommendationScore, partial(pgbulk.upsert, **conflict))

    def run_django(self) -> None:
        conflict = {"unique_fields": self.key_fields, "update_fields": self.update_fields}
        self.bulk(
            RecommendationScore, lambda qs, c: qs.bulk_create(c, update_conflicts=True, **conflict)
        )

    def state(self) -> dict[str, Iterable[tuple]]:
        scores = RecommendationScore.objects.filter(product__sku__startswith=ns.SKU_PREFIX)
        fields = ("user__username", "product__sku", "algorithm", "score")
        return {"scores": self.values(scores, *fields)}


UPDATE_FIELDS = ["price", "stock_quantity", "updated_at"]


class UpdatesWorkload(Workload):
    """A new price and stock for every existing product, keyed by sku."""

    name, title = "updates", "Price and stock update of existing products"
    method = "update_products"
    tables = (Product,)
    described = {
        OPTIMIZED: "validates every row, checks every sku exists, one UPDATE per chunk",
        RAW: (
            "raw COPY + UPDATE",
            "COPY of every row into a temporary table, then one UPDATE ... FROM",
        ),
        PGBULK: (
            "pgbulk.update",
            "per chunk: one query for the ids of the skus, one pgbulk.update",
        ),
        DJANGO: (
            "bulk_update",
            "per chunk: one query for the ids of the skus, bulk_update in batches of "
            f"{DJANGO_UPDATE_BATCH:,} (one 10,000-row CASE WHEN statement is far slower)",
        ),
    }

    def create_base(self) -> None:
        self.products_base(self.size)

    def prepare(self) -> None:
        pass

    def rows(self) -> Iterator[dict[str, Any]]:
        for number in shuffled(self.size):
            yield {
                "sku": ns.product_sku(number),
                "price": price_of(number + self.seed),
                "stock_quantity": (number * 37 + self.seed) % 500,
            }

    def objects(self, rows: list[dict[str, Any]]) -> list[Product]:
        """Products with the rows' new values, their ids read by sku (one query)."""
        products = Product.objects.using(self.using).filter(sku__in=[row["sku"] for row in rows])
        ids, now = dict(products.values_list("sku", "pk")), timezone.now()
        return [
            Product(
                pk=ids[r["sku"]],
                price=Decimal(r["price"]),
                stock_quantity=r["stock_quantity"],
                updated_at=now,
            )
            for r in rows
        ]

    def run_raw(self) -> None:
        rows = ((r["sku"], r["price"], r["stock_quantity"]) for r in self.rows())
        connection = connections[self.using]
        q = partial(quoted, connection, Product)
        price, stock, sku = q("price"), q("stock_quantity"), q("sku")
        staging = connection.ops.quote_name(STAGING_TABLE)
        with raw_transaction(self.using):
            stage(self.using, Product, ["sku", "price", "stock_quantity"], rows)
            execute(
                self.using,
                f"UPDATE {q()} AS p SET {price} = s.{price}, {stock} = s.{stock}, "
                f"{q('updated_at')} = now() FROM {staging} AS s WHERE p.{sku} = s.{sku}",
            )

    def run_pgbulk(self) -> None:
        def write(queryset: models.QuerySet, chunk: list[dict[str, Any]]) -> None:
            with transaction.atomic(using=self.using):
                pgbulk.update(queryset, self.objects(chunk), UPDATE_FIELDS)

        self.bulk(Product, write, self.rows())

    def run_django(self) -> None:
        def write(queryset: models.QuerySet, chunk: list[dict[str, Any]]) -> None:
            with transaction.atomic(using=self.using):
                objects = self.objects(chunk)
                queryset.bulk_update(objects, UPDATE_FIELDS, batch_size=DJANGO_UPDATE_BATCH)

        self.bulk(Product, write, self.rows())

    def state(self) -> dict[str, Iterable[tuple]]:
        return {"products": self.values(bench_products(), "sku", "price", "stock_quantity")}


class OrdersWorkload(Workload):
    """Orders of 3 distinct products each over 50 users and 100 products; the stock
    covers every order with ``STOCK_MARGIN`` to spare, so all are accepted."""

    name, title, unit, method = "orders", "Orders of 3 items", "orders", "process_orders"
    tables = (Order, OrderItem, Product)
    max_size = 10_000
    cap_reason = "the naive service runs about 150 orders/s"
    described = {
        OPTIMIZED: "locks the chunk's products, decides every order, 6 queries per chunk",
        NAIVE: "the N+1 baseline: queries and saves row by row",
    }

    def __init__(self, size: int, **options: Any) -> None:
        """Draw the orders, in product and user numbers, and the stock that covers them."""
        super().__init__(size, **options)
        rng = random.Random(f"{self.seed}:{self.name}")
        pool = range(ns.PRODUCT_POOL)
        self.prices = [Decimal(rng.randint(99, 99_999)) / 100 for _ in pool]
        self.drawn = [
            (
                f"{ns.ORDER_PREFIX}ORDER-{number:07d}",
                rng.randrange(ns.USER_POOL),
                [(product, rng.randint(1, 3)) for product in rng.sample(pool, ITEMS_PER_ORDER)],
            )
            for number in range(size)
        ]
        demand: Counter[int] = Counter()
        for _, _, lines in self.drawn:
            for product, quantity in lines:
                demand[product] += quantity
        self.stock = [demand[product] + STOCK_MARGIN for product in pool]

    def create_base(self) -> None:
        (category_id,) = ns.create_categories(self.using, 1)
        ns.create_users(self.using, ns.USER_POOL)
        Product.objects.using(self.using).bulk_create(
            Product(
                sku=ns.product_sku(n),
                name=f"Bench product {n}",
                category_id=category_id,
                price=self.prices[n],
                stock_quantity=self.stock[n],
            )
            for n in range(ns.PRODUCT_POOL)
        )

    def prepare(self) -> None:
        super().prepare()
        users, products = self.users, self.products
        self.orders: list[dict[str, Any]] = [
            {
                "reference": reference,
                "user_id": users[user],
                "items": [{"product_id": products[p], "quantity": q} for p, q in lines],
            }
            for reference, user, lines in self.drawn
        ]

    def service_input(self) -> list[dict[str, Any]]:
        return self.orders

    def state(self) -> dict[str, Iterable[tuple]]:
        prefix, orders = ns.ORDER_PREFIX, Order.objects.using(self.using)
        items = OrderItem.objects.using(self.using).filter(order__reference__startswith=prefix)
        return {
            "orders": orders.filter(reference__startswith=prefix).values_list(
                "reference", "user__username", "total"
            ),
            "items": items.values_list(
                "order__reference", "product__sku", "quantity", "unit_price"
            ),
            "stock": bench_products().using(self.using).values_list("sku", "stock_quantity"),
        }


IMPORT_COLUMNS = ("sku", "name", "category", "price", "stock_quantity", "is_active")
# The raw import's staging table: the CSV file's columns, in its order, and their types.
STAGED_IMPORT = (
    ("sku", "varchar"),
    ("name", "varchar"),
    ("category_name", "varchar"),
    ("price", "numeric"),
    ("stock_quantity", "integer"),
    ("is_active", "boolean"),
)


class ImportWorkload(Workload):
    """A catalogue CSV file: half the skus exist, half are new, one category is new."""

    name, title, method = "import", "Product import from a CSV file", "import_products"
    tables = (Product, Category)
    base_categories = 4
    first_product = 0
    chunk = 20_000  # a catalogue row weighs more; memory stays flat and small at 20,000
    described = {
        OPTIMIZED: "streams the file with RowStream, validates every row, one upsert per chunk",
        RAW: (
            "raw COPY + upsert",
            "COPY of the file into a temporary table, missing categories, one upsert",
        ),
    }

    @property
    def path(self) -> Path:
        return self.work_dir / f"scale-bench-import-{self.size}-{self.seed}.csv"

    def prepare(self) -> None:
        self.input_file()

    def input_file(self) -> Path:
        """The input file, written once per size and seed (not timed)."""
        if self.path.exists():
            return self.path
        partial_file = self.path.with_suffix(".partial")
        with open(partial_file, "w", encoding="utf-8", newline="") as file:
            file.write(",".join(IMPORT_COLUMNS) + "\n")
            for number in shuffled(self.size):
                category = ns.category_name(number % (self.base_categories + 1))
                active = "false" if number % 10 == 0 else "true"
                file.write(
                    f"{ns.product_sku(number)},Bench product {number} (imported),{category},"
                    f"{price_of(number + self.seed)},{(number * 37) % 500},{active}\n"
                )
        partial_file.replace(self.path)
        return self.path

    def create_base(self) -> None:
        """The first half of the skus exist (from ``first_product``), in the base categories."""
        names = [ns.category_name(number) for number in range(self.base_categories)]
        categories = Category.objects.using(self.using)
        categories.bulk_create([Category(name=name) for name in names], ignore_conflicts=True)
        ids = dict(categories.filter(name__in=names).values_list("name", "pk"))
        base, numbers = [ids[name] for name in names], range(self.first_product, self.size // 2)
        ns.copy_products(self.using, numbers, lambda n: base[n % len(base)], "1.00", 1)

    def run_service(self, service: BulkOperationsService, chunk_size: int | None) -> BatchResult:
        """The file read as the import command reads it, through ``RowStream``."""
        with RowStream(self.path) as stream:
            return service.import_products(stream, chunk_size=chunk_size)

    def run_raw(self) -> None:
        connection = connections[self.using]
        quote = connection.ops.quote_name
        staging = quote(STAGING_TABLE)
        products, categories = quoted(connection, Product), quoted(connection, Category)
        staged = ", ".join(quote(column) for column, _ in STAGED_IMPORT)
        definitions = ", ".join(f"{quote(column)} {kind}" for column, kind in STAGED_IMPORT)
        name, sku = quoted(connection, Category, "name"), quoted(connection, Product, "sku")
        updates = excluded(connection, Product, *IMPORT_COLUMNS[1:], "updated_at")
        with raw_transaction(self.using), open(self.path, "rb") as file:
            temp_table(self.using, STAGING_TABLE, definitions)
            blocks = iter(lambda: file.read(COPY_BLOCK), b"")
            copy_in(
                self.using,
                f"COPY {staging} ({staged}) FROM STDIN (FORMAT csv, HEADER true)",
                blocks=blocks,
            )
            execute(
                self.using,
                f"INSERT INTO {categories} ({name}) SELECT DISTINCT category_name "
                f"FROM {staging} ON CONFLICT ({name}) DO NOTHING",
            )
            execute(
                self.using,
                f"INSERT INTO {products} ({quoted(connection, Product, *ns.PRODUCT_FIELDS)}) "
                "SELECT s.sku, s.name, c.id, s.price, s.stock_quantity, s.is_active, 0, "
                f"now(), now() FROM {staging} AS s JOIN {categories} AS c ON c.{name} = "
                f"s.category_name ON CONFLICT ({sku}) DO UPDATE SET {updates}",
            )

    def state(self) -> dict[str, Iterable[tuple]]:
        categories = Category.objects.using(self.using).filter(name__startswith=ns.CATEGORY_PREFIX)
        fields = ("sku", "name", "category__name", "price", "stock_quantity", "is_active")
        return {
            "products": self.values(bench_products(), *fields),
            "categories": categories.values_list("name"),
        }


WORKLOADS: dict[str, type[Workload]] = {
    workload.name: workload
    for workload in (ViewsWorkload, ScoresWorkload, UpdatesWorkload, OrdersWorkload, ImportWorkload)
}
