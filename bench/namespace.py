"""The benchmarks' own rows in a shared database, and the base states they start from.

Every benchmark shares the database with the demo shop, so it touches only
its own rows: usernames starting ``bench-``, skus and order references
starting ``BENCH-``, category names starting ``Bench ``. Everything else
survives a reset. Row number k of each kind has a fixed name (``username``,
``product_sku``, ``category_name``), so a workload written in numbers maps
onto whichever ids a fresh base state got.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import CommandError
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.db.models import Q
from django.utils import timezone
from psycopg import sql

from batching.engine import chunked
from batching.postgres import column, copy_rows, execute, is_postgresql, model_field
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore

USER_PREFIX = "bench-"
SKU_PREFIX = "BENCH-"
ORDER_PREFIX = "BENCH-"
CATEGORY_PREFIX = "Bench "

DEFAULT_SEED = 20240601
USER_POOL = 50
PRODUCT_POOL = 100
# Rows per bulk_create where COPY is not available (SQLite).
INSERT_BATCH = 5_000

PRODUCT_FIELDS = (
    "sku",
    "name",
    "category",
    "price",
    "stock_quantity",
    "is_active",
    "view_count",
    "created_at",
    "updated_at",
)


def username(number: int) -> str:
    return f"{USER_PREFIX}user-{number:04d}"


def product_sku(number: int) -> str:
    return f"{SKU_PREFIX}P-{number:06d}"


def category_name(number: int) -> str:
    return f"{CATEGORY_PREFIX}category {number}"


def require_postgresql(message: str, using: str = DEFAULT_DB_ALIAS) -> None:
    """Refuse a benchmark that measures PostgreSQL on any other database.

    ``message`` says why, with ``{vendor}`` for the database it found.
    """
    vendor = connections[using].vendor
    if vendor != "postgresql":
        raise CommandError(message.format(vendor=vendor))


def like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def table(model: type[models.Model]) -> sql.Identifier:
    return sql.Identifier(model._meta.db_table)


def analyze(using: str, tables: Iterable[type[models.Model]]) -> None:
    for model in tables:
        execute(using, sql.SQL("ANALYZE {}").format(table(model)))


def vacuum(using: str, tables: Iterable[type[models.Model]]) -> None:
    """VACUUM ANALYZE: dead rows of the previous run cleared, statistics fresh.

    PostgreSQL only. VACUUM cannot run inside a transaction; inside one (a
    test) this is skipped.
    """
    if not is_postgresql(using) or connections[using].in_atomic_block:
        return
    for model in tables:
        execute(using, sql.SQL("VACUUM ANALYZE {}").format(table(model)))


def reset_namespace(using: str = DEFAULT_DB_ALIAS) -> None:
    """Delete the benchmark's rows in foreign-key order; nothing outside the namespace.

    Views and scores are fast deletes (nothing references them). On
    PostgreSQL the products go through one ``DELETE ... LIKE``, because
    Django's collector would load every product to cascade (a million at
    scale), and the tables are analyzed and vacuumed around the deletes: just
    after a run the planner may still expect empty tables and delete by
    nested loops for minutes.
    """
    postgres = is_postgresql(using)
    if postgres:
        analyze(using, (ProductView, RecommendationScore, Product))
    User = get_user_model()
    bench_users = Q(user__username__startswith=USER_PREFIX)
    bench_products = Q(product__sku__startswith=SKU_PREFIX)
    with transaction.atomic(using=using):
        OrderItem.objects.using(using).filter(order__reference__startswith=ORDER_PREFIX).delete()
        Order.objects.using(using).filter(
            Q(reference__startswith=ORDER_PREFIX) | bench_users
        ).delete()
        ProductView.objects.using(using).filter(bench_users | bench_products).delete()
        RecommendationScore.objects.using(using).filter(bench_users | bench_products).delete()
    if postgres:
        # Before the products go: each one's foreign-key checks look for rows
        # pointing at it, through statistics that may still say "empty".
        vacuum(using, (OrderItem, Order, ProductView, RecommendationScore))
    with transaction.atomic(using=using):
        products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
        if postgres:
            execute(
                using,
                sql.SQL("DELETE FROM {} WHERE {} LIKE %s").format(
                    table(Product), column(Product, "sku")
                ),
                [like_prefix(SKU_PREFIX)],
            )
        else:
            products.delete()
        Category.objects.using(using).filter(name__startswith=CATEGORY_PREFIX).delete()
        User.objects.using(using).filter(username__startswith=USER_PREFIX).delete()


def create_users(using: str, count: int) -> list[int]:
    """Bench users 0..count-1 (no usable password); their ids in that order."""
    User = get_user_model()
    users = User.objects.using(using)
    # One unusable hash for all: they never log in, and hashing per user is slow.
    password = make_password(None)
    names = [username(number) for number in range(count)]
    users.bulk_create([User(username=name, password=password) for name in names])
    # Read back rather than trust bulk_create to set pks (not every backend does).
    ids = dict(users.filter(username__in=names).values_list("username", "pk"))
    return [ids[name] for name in names]


def create_categories(using: str, count: int) -> list[int]:
    categories = Category.objects.using(using)
    names = [category_name(number) for number in range(count)]
    categories.bulk_create([Category(name=name) for name in names])
    ids = dict(categories.filter(name__in=names).values_list("name", "pk"))
    return [ids[name] for name in names]


def create_products(using: str, products: list[Product]) -> list[int]:
    """bulk_create ``products``; their ids in the given order."""
    queryset = Product.objects.using(using)
    queryset.bulk_create(products)
    skus = [product.sku for product in products]
    ids = dict(queryset.filter(sku__in=skus).values_list("sku", "pk"))
    return [ids[sku] for sku in skus]


def insert_rows(
    using: str, model: type[models.Model], fields: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Base-state rows (tuples in ``fields`` order): COPY on PostgreSQL, ``bulk_create`` elsewhere.

    ``batching.postgres.copy_rows`` streams them; elsewhere they go in batches
    of ``INSERT_BATCH``, so memory stays flat either way.
    """
    if is_postgresql(using):
        copy_rows(model, fields, rows, using=using)
        return
    names = [model_field(model, name).attname for name in fields]  # "user" -> "user_id"
    queryset = model._default_manager.using(using)
    for batch in chunked(iter(rows), INSERT_BATCH):
        queryset.bulk_create(model(**dict(zip(names, row, strict=True))) for row in batch)


def copy_products(
    using: str,
    numbers: Iterable[int],
    category: Callable[[int], int],
    price: Decimal | str,
    stock: int,
) -> None:
    """Bench products ``numbers`` with one price and stock (``insert_rows``)."""
    now = timezone.now()
    price = Decimal(price)
    insert_rows(
        using,
        Product,
        PRODUCT_FIELDS,
        (
            (product_sku(n), f"Bench product {n}", category(n), price, stock, True, 0, now, now)
            for n in numbers
        ),
    )


def user_ids(using: str) -> list[int]:
    """Ids of bench users 0..USER_POOL-1, in that order."""
    names = [username(number) for number in range(USER_POOL)]
    ids = dict(
        get_user_model()
        .objects.using(using)
        .filter(username__in=names)
        .values_list("username", "pk")
    )
    return [ids[name] for name in names]


def product_ids(using: str, count: int) -> list[int]:
    """Ids of bench products 0..count-1, in that order."""
    ids = dict(
        Product.objects.using(using)
        .filter(sku__startswith=SKU_PREFIX)
        .values_list("sku", "pk")
        .iterator(chunk_size=10_000)
    )
    return [ids[product_sku(number)] for number in range(count)]
