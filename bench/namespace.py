"""The benchmarks' own rows in a shared database, and the base states they start from.

Benchmarks touch only their namespace: usernames starting ``bench-``, skus and
order references ``BENCH-``, category names ``Bench ``. Row number k of each
kind has a fixed name, so a workload written in numbers maps onto whichever
ids a fresh base state got.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.db.models import Q
from django.utils import timezone
from psycopg import sql

from batching.engine import chunked
from batching.postgres import column, copy_rows, execute, is_postgresql, model_field
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore

USER_PREFIX = "bench-"
SKU_PREFIX = ORDER_PREFIX = "BENCH-"
CATEGORY_PREFIX = "Bench "
DEFAULT_SEED = 20240601
USER_POOL = 50
PRODUCT_POOL = 100
INSERT_BATCH = 5_000  # rows per bulk_create where COPY is not available (SQLite)
PRODUCT_FIELDS = ("sku", "name", "category", "price", "stock_quantity", "is_active",
                  "view_count", "created_at", "updated_at")  # fmt: skip


def username(number: int) -> str:
    return f"{USER_PREFIX}user-{number:04d}"


def product_sku(number: int) -> str:
    return f"{SKU_PREFIX}P-{number:06d}"


def category_name(number: int) -> str:
    return f"{CATEGORY_PREFIX}category {number}"


def like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def table(model: type[models.Model]) -> sql.Identifier:
    return sql.Identifier(model._meta.db_table)


def vacuum(using: str, tables: Iterable[type[models.Model]], command: str = "VACUUM ANALYZE"):
    """Clear the previous run's dead rows, refresh statistics: PostgreSQL only, outside a
    transaction (VACUUM cannot run inside one, as in a test)."""
    if not is_postgresql(using) or connections[using].in_atomic_block:
        return
    for model in tables:
        execute(using, sql.SQL(command + " {}").format(table(model)))


@dataclass(frozen=True, slots=True)
class Kept:
    """Rows a reset keeps (``bench_live``'s): hot products (number order), the
    category they are restored to, every kept product, the kept categories' count."""

    products: list[int]
    category: int
    kept: list[int]
    categories: int
    price: Decimal
    stock: int


def reset_namespace(using: str = DEFAULT_DB_ALIAS, keep: Kept | None = None) -> None:
    """Delete the benchmark's rows in foreign-key order; nothing outside the namespace.

    With ``keep``, the users, the kept products and categories stay, and the hot
    products get back their price and stock in place (the live players hold their
    ids). On PostgreSQL orders and products go by one ``DELETE ... LIKE`` (Django's
    collector would load every row), the tables analyzed first and vacuumed between
    the deletes: just after a run the planner may still expect empty tables and check
    foreign keys by nested loops for minutes.
    """
    postgres = is_postgresql(using)
    vacuum(using, (ProductView, RecommendationScore, Product), "ANALYZE")
    bench_users = Q(user__username__startswith=USER_PREFIX)
    bench_products = Q(product__sku__startswith=SKU_PREFIX)
    delete_like = "DELETE FROM {} WHERE {} LIKE %s"
    with transaction.atomic(using=using):
        OrderItem.objects.using(using).filter(order__reference__startswith=ORDER_PREFIX).delete()
        if postgres:
            statement = sql.SQL(delete_like).format(table(Order), column(Order, "reference"))
            execute(using, statement, [like_prefix(ORDER_PREFIX)])
        # What the LIKE left (all of it elsewhere): bench users' orders, which would block
        # deleting the users (PROTECT).
        Order.objects.using(using).filter(
            Q(reference__startswith=ORDER_PREFIX) | bench_users
        ).delete()
        ProductView.objects.using(using).filter(bench_users | bench_products).delete()
        RecommendationScore.objects.using(using).filter(bench_users | bench_products).delete()
    vacuum(using, (OrderItem, Order, ProductView, RecommendationScore))
    products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
    categories = Category.objects.using(using).filter(name__startswith=CATEGORY_PREFIX)
    params: list[Any] = [like_prefix(SKU_PREFIX)]
    with transaction.atomic(using=using):
        if keep:
            products = products.exclude(pk__in=keep.kept)
            kept_names = [category_name(number) for number in range(keep.categories)]
            categories = categories.exclude(name__in=kept_names)
            delete_like += " AND NOT {} = ANY(%s)"
            params.append(keep.kept)
            Product.objects.using(using).filter(pk__in=keep.products).update(
                price=keep.price,
                stock_quantity=keep.stock,
                view_count=0,
                is_active=True,
                category_id=keep.category,
            )
        if postgres:
            names = (table(Product), column(Product, "sku"), column(Product, "id"))
            execute(using, sql.SQL(delete_like).format(*names[: len(params) + 1]), params)
        else:
            products.delete()
        categories.delete()
        if not keep:
            get_user_model().objects.using(using).filter(username__startswith=USER_PREFIX).delete()
    if keep:
        vacuum(using, (Product, Category))


def create_users(using: str, count: int) -> list[int]:
    """Bench users 0..count-1, one unusable password hash for all; their ids in that order."""
    User = get_user_model()
    password = make_password(None)
    names = [username(number) for number in range(count)]
    User.objects.using(using).bulk_create([User(username=n, password=password) for n in names])
    # Read back rather than trust bulk_create to set pks: not every backend does.
    return user_ids(using, count)


def create_categories(using: str, count: int) -> list[int]:
    categories = Category.objects.using(using)
    names = [category_name(number) for number in range(count)]
    categories.bulk_create([Category(name=name) for name in names])
    ids = dict(categories.filter(name__in=names).values_list("name", "pk"))
    return [ids[name] for name in names]


def insert_rows(
    using: str, model: type[models.Model], fields: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Base-state rows (tuples in ``fields`` order), streamed: ``batching.postgres.copy_rows``
    on PostgreSQL, ``bulk_create`` by ``INSERT_BATCH`` elsewhere."""
    if is_postgresql(using):
        copy_rows(model, fields, rows, using=using)
        return
    names = [model_field(model, name).attname for name in fields]  # "user" -> "user_id"
    for batch in chunked(iter(rows), INSERT_BATCH):
        model._default_manager.using(using).bulk_create(
            model(**dict(zip(names, row, strict=True))) for row in batch
        )


def copy_products(
    using: str,
    numbers: Iterable[int],
    category: Callable[[int], int],
    price: Decimal | str,
    stock: int,
) -> None:
    """Bench products ``numbers`` with one price and stock (``insert_rows``)."""
    now, price = timezone.now(), Decimal(price)
    rows = (
        (product_sku(n), f"Bench product {n}", category(n), price, stock, True, 0, now, now)
        for n in numbers
    )
    insert_rows(using, Product, PRODUCT_FIELDS, rows)


def user_ids(using: str, count: int = USER_POOL) -> list[int]:
    """Ids of bench users 0..count-1, in that order."""
    names = [username(number) for number in range(count)]
    users = get_user_model().objects.using(using).filter(username__in=names)
    ids = dict(users.values_list("username", "pk"))
    return [ids[name] for name in names]


def product_ids(using: str, count: int) -> list[int]:
    """Ids of bench products 0..count-1, in that order."""
    products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
    ids = dict(products.values_list("sku", "pk").iterator(chunk_size=10_000))
    return [ids[product_sku(number)] for number in range(count)]
