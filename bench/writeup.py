"""The benchmark behind ``manage.py test_bulk_performance``: workloads and comparison.

Design
------
Each operation has a ``Scenario``: a workload drawn from
``random.Random(f"{seed}:{operation}")`` in *logical* terms ("user 7 views
product 42"), the base state that workload runs against, and a snapshot of the
end state in the same logical terms (usernames and skus, never ids).

For each variant, naive first, the benchmark deletes its own namespace,
recreates the base state with ``bulk_create`` and only then maps the logical
workload onto the new ids ("user number k" is the k-th bench user created).
Both variants therefore get identical input from an identical starting state,
and their end states can be compared even though their ids differ.

Setup, row generation and snapshots happen outside the service call and are
not measured: times and query counts are the ``BatchResult``'s, the same
figures each run leaves in its ``BatchProcessingLog`` row (logs are kept).

The rows live in the benchmark namespace (``bench.namespace``): a shared
database keeps everything else.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

from django.db import DEFAULT_DB_ALIAS, transaction

from batching.engine import BatchResult
from batching.models import BatchProcessingLog
from bench.namespace import (
    CATEGORY_PREFIX,
    DEFAULT_SEED,
    ORDER_PREFIX,
    PRODUCT_POOL,
    SKU_PREFIX,
    USER_POOL,
    Fixture,
    bench_products,
    category_name,
    create_categories,
    create_products,
    create_users,
    product_sku,
    reset_namespace,
)
from bench.report import format_percent, format_speedup, markdown_table
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService
from products.services.base import BulkOperationsService

ITEMS_PER_ORDER = 3
ALGORITHMS = ("collaborative", "content_based", "trending")
# Views mostly look, some click, few buy: the mix only has to be deterministic.
INTERACTIONS = (
    (ProductView.InteractionType.VIEW, 70),
    (ProductView.InteractionType.CLICK, 20),
    (ProductView.InteractionType.ADD_TO_CART, 7),
    (ProductView.InteractionType.PURCHASE, 3),
)
# Fixed, so the rows (and the snapshots that include them) do not depend on the clock.
BASE_TIME = datetime(2024, 6, 1, tzinfo=UTC)
# Stock left on every ordered product after the orders: all orders fit.
STOCK_MARGIN = 5

Progress = Callable[[str], None]


def price_in_cents(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(99, 99_999)) / 100


class Scenario(ABC):
    """One operation's workload, base state and end-state snapshot.

    The logical workload is drawn once, in ``__init__``; ``setup`` and
    ``rows`` may then be called once per variant and give the same input.
    """

    name: ClassVar[str]
    method: ClassVar[str]  # the service method both variants run

    def __init__(self, size: int, *, seed: int = DEFAULT_SEED) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.rng = random.Random(f"{seed}:{self.name}")

    def setup(self, using: str = DEFAULT_DB_ALIAS) -> Fixture:
        """Reset the namespace and create the base state, in one transaction."""
        with transaction.atomic(using=using):
            reset_namespace(using)
            return self.create_base(using)

    @abstractmethod
    def create_base(self, using: str) -> Fixture: ...

    @abstractmethod
    def rows(self, fixture: Fixture) -> list[dict[str, Any]]:
        """The service input for this base state: logical numbers mapped to ids."""

    @abstractmethod
    def snapshot(self, using: str = DEFAULT_DB_ALIAS) -> dict[str, Any]:
        """The namespace's end state in logical terms (names, never ids)."""

    def run(self, service: BulkOperationsService, rows: list[Any], chunk_size: int) -> BatchResult:
        return getattr(service, self.method)(rows, chunk_size=chunk_size)


class ViewsScenario(Scenario):
    """N views over 50 users and 100 products; each view_count grows by its views."""

    name = "views"
    method = "create_product_views"

    def __init__(self, size: int, *, seed: int = DEFAULT_SEED) -> None:
        super().__init__(size, seed=seed)
        kinds = [kind for kind, _ in INTERACTIONS]
        weights = [weight for _, weight in INTERACTIONS]
        self.views = [
            (
                self.rng.randrange(USER_POOL),
                self.rng.randrange(PRODUCT_POOL),
                str(self.rng.choices(kinds, weights)[0]),
            )
            for _ in range(size)
        ]

    def create_base(self, using: str) -> Fixture:
        products = bench_products(using, PRODUCT_POOL)
        return Fixture(create_users(using, USER_POOL), create_products(using, products))

    def rows(self, fixture: Fixture) -> list[dict[str, Any]]:
        return [
            {
                "user_id": fixture.users[user],
                "product_id": fixture.products[product],
                # A session per user, so a user's views group like real ones.
                "session_id": f"bench-session-{user:04d}",
                "interaction_type": kind,
                "created_at": BASE_TIME + timedelta(seconds=position),
            }
            for position, (user, product, kind) in enumerate(self.views)
        ]

    def snapshot(self, using: str = DEFAULT_DB_ALIAS) -> dict[str, Any]:
        products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
        views = ProductView.objects.using(using).filter(product__sku__startswith=SKU_PREFIX)
        return {
            "view_counts": dict(products.order_by("sku").values_list("sku", "view_count")),
            "views": sorted(
                (user, sku, kind, created.isoformat())
                for user, sku, kind, created in views.values_list(
                    "user__username", "product__sku", "interaction_type", "created_at"
                )
            ),
        }


class ScoresScenario(Scenario):
    """N scores with unique (user, product, algorithm) keys: half exist, half are new."""

    name = "scores"
    method = "upsert_recommendation_scores"

    def __init__(self, size: int, *, seed: int = DEFAULT_SEED) -> None:
        super().__init__(size, seed=seed)
        # Enough products that N distinct keys exist, whatever N is.
        self.product_pool = max(PRODUCT_POOL, math.ceil(size / (USER_POOL * len(ALGORITHMS))))
        space = USER_POOL * self.product_pool * len(ALGORITHMS)
        keys = [self.decode(code) for code in self.rng.sample(range(space), size)]
        half = size // 2
        self.existing = [(key, round(self.rng.random(), 6)) for key in keys[:half]]
        self.upserts = [(key, round(self.rng.random(), 6)) for key in keys]
        # Existing and new keys interleave in the input, as they would in practice.
        self.rng.shuffle(self.upserts)

    def decode(self, code: int) -> tuple[int, int, str]:
        code, algorithm = divmod(code, len(ALGORITHMS))
        user, product = divmod(code, self.product_pool)
        return user, product, ALGORITHMS[algorithm]

    def create_base(self, using: str) -> Fixture:
        products = bench_products(using, self.product_pool)
        fixture = Fixture(create_users(using, USER_POOL), create_products(using, products))
        RecommendationScore.objects.using(using).bulk_create(
            RecommendationScore(
                user_id=fixture.users[user],
                product_id=fixture.products[product],
                algorithm=algorithm,
                score=score,
            )
            for (user, product, algorithm), score in self.existing
        )
        return fixture

    def rows(self, fixture: Fixture) -> list[dict[str, Any]]:
        return [
            {
                "user_id": fixture.users[user],
                "product_id": fixture.products[product],
                "algorithm": algorithm,
                "score": score,
            }
            for (user, product, algorithm), score in self.upserts
        ]

    def snapshot(self, using: str = DEFAULT_DB_ALIAS) -> dict[str, Any]:
        scores = RecommendationScore.objects.using(using).filter(
            product__sku__startswith=SKU_PREFIX
        )
        return {
            "scores": sorted(
                scores.values_list("user__username", "product__sku", "algorithm", "score")
            )
        }


class OrdersScenario(Scenario):
    """N orders of 3 distinct products each; stock covers every order, so all are accepted."""

    name = "orders"
    method = "process_orders"

    def __init__(self, size: int, *, seed: int = DEFAULT_SEED) -> None:
        super().__init__(size, seed=seed)
        self.prices = [price_in_cents(self.rng) for _ in range(PRODUCT_POOL)]
        self.orders = [
            (
                f"{ORDER_PREFIX}ORDER-{number:07d}",
                self.rng.randrange(USER_POOL),
                [
                    (product, self.rng.randint(1, 3))
                    for product in self.rng.sample(range(PRODUCT_POOL), ITEMS_PER_ORDER)
                ],
            )
            for number in range(size)
        ]
        demand: Counter[int] = Counter()
        for _, _, lines in self.orders:
            for product, quantity in lines:
                demand[product] += quantity
        self.stock = [demand[product] + STOCK_MARGIN for product in range(PRODUCT_POOL)]

    def create_base(self, using: str) -> Fixture:
        (category_id,) = create_categories(using, 1)
        products = [
            Product(
                sku=product_sku(number),
                name=f"Bench product {number}",
                category_id=category_id,
                price=self.prices[number],
                stock_quantity=self.stock[number],
            )
            for number in range(PRODUCT_POOL)
        ]
        return Fixture(create_users(using, USER_POOL), create_products(using, products))

    def rows(self, fixture: Fixture) -> list[dict[str, Any]]:
        return [
            {
                "reference": reference,
                "user_id": fixture.users[user],
                "items": [
                    {"product_id": fixture.products[product], "quantity": quantity}
                    for product, quantity in lines
                ],
            }
            for reference, user, lines in self.orders
        ]

    def snapshot(self, using: str = DEFAULT_DB_ALIAS) -> dict[str, Any]:
        products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
        orders = Order.objects.using(using).filter(reference__startswith=ORDER_PREFIX)
        items = OrderItem.objects.using(using).filter(order__reference__startswith=ORDER_PREFIX)
        return {
            "stock": dict(products.order_by("sku").values_list("sku", "stock_quantity")),
            "orders": sorted(
                (reference, user, str(total))
                for reference, user, total in orders.values_list(
                    "reference", "user__username", "total"
                )
            ),
            "items": sorted(
                (reference, sku, quantity, str(price))
                for reference, sku, quantity, price in items.values_list(
                    "order__reference", "product__sku", "quantity", "unit_price"
                )
            ),
        }


class ProductsScenario(Scenario):
    """N catalogue rows over a few categories: half update existing skus, half are new.

    The rows also name one category the base state lacks, so creating
    categories is part of the measured work, as in a real import.
    """

    name = "products"
    method = "import_products"
    base_categories = 4

    def __init__(self, size: int, *, seed: int = DEFAULT_SEED) -> None:
        super().__init__(size, seed=seed)
        self.existing = list(range(size // 2))
        self.imports = [
            {
                "sku": product_sku(number),
                "name": f"Bench product {number} (imported)",
                "category": category_name(self.rng.randrange(self.base_categories + 1)),
                "price": str(price_in_cents(self.rng)),
                "stock_quantity": self.rng.randint(0, 500),
                "is_active": self.rng.random() >= 0.1,
            }
            for number in range(size)
        ]
        self.rng.shuffle(self.imports)

    def create_base(self, using: str) -> Fixture:
        category_ids = create_categories(using, self.base_categories)
        products = [
            Product(
                sku=product_sku(number),
                name=f"Bench product {number}",
                category_id=category_ids[number % self.base_categories],
                price=Decimal("1.00"),
                stock_quantity=1,
            )
            for number in self.existing
        ]
        return Fixture(users=[], products=create_products(using, products))

    def rows(self, fixture: Fixture) -> list[dict[str, Any]]:
        return [dict(row) for row in self.imports]  # no ids: products are keyed by sku

    def snapshot(self, using: str = DEFAULT_DB_ALIAS) -> dict[str, Any]:
        products = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
        return {
            "products": [
                (sku, name, category, str(price), stock, active)
                for sku, name, category, price, stock, active in products.order_by(
                    "sku"
                ).values_list(
                    "sku", "name", "category__name", "price", "stock_quantity", "is_active"
                )
            ],
            "categories": sorted(
                Category.objects.using(using)
                .filter(name__startswith=CATEGORY_PREFIX)
                .values_list("name", flat=True)
            ),
        }


SCENARIOS: dict[str, type[Scenario]] = {
    scenario.name: scenario
    for scenario in (ViewsScenario, ScoresScenario, OrdersScenario, ProductsScenario)
}
OPERATIONS: tuple[str, ...] = tuple(SCENARIOS)


def percent_less(naive: float, optimized: float) -> float | None:
    """``(1 - optimized / naive) * 100``; None when there is nothing to compare against."""
    if naive <= 0:
        return None
    return (1 - optimized / naive) * 100


@dataclass(frozen=True, slots=True)
class Comparison:
    """One operation run naive then optimized on the same workload."""

    operation: str
    records: int
    naive: BatchResult
    optimized: BatchResult
    naive_state: dict[str, Any]
    optimized_state: dict[str, Any]

    @property
    def query_reduction(self) -> float | None:
        return percent_less(self.naive.query_count, self.optimized.query_count)

    @property
    def time_improvement(self) -> float | None:
        return percent_less(self.naive.duration, self.optimized.duration)

    @property
    def speedup(self) -> float | None:
        if self.optimized.duration <= 0:
            return None
        return self.naive.duration / self.optimized.duration

    @property
    def states_match(self) -> bool:
        return self.naive_state == self.optimized_state

    @property
    def completed(self) -> bool:
        """Both runs took every row: a skipped row would make the comparison unfair."""
        done = BatchProcessingLog.Status.COMPLETED
        return self.naive.status == done and self.optimized.status == done

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "records": self.records,
            "queries_naive": self.naive.query_count,
            "queries_optimized": self.optimized.query_count,
            "query_reduction_percent": self.query_reduction,
            "time_naive_seconds": self.naive.duration,
            "time_optimized_seconds": self.optimized.duration,
            "time_improvement_percent": self.time_improvement,
            "speedup": self.speedup,
            "naive_log_id": self.naive.log_id,
            "optimized_log_id": self.optimized.log_id,
            "naive_status": self.naive.status,
            "optimized_status": self.optimized.status,
            "states_match": self.states_match,
        }


def compare(
    operation: str,
    *,
    size: int,
    chunk_size: int,
    seed: int = DEFAULT_SEED,
    using: str = DEFAULT_DB_ALIAS,
    progress: Progress | None = None,
) -> Comparison:
    """Run ``operation`` naive, then optimized, each from the same base state."""
    scenario = SCENARIOS[operation](size, seed=seed)
    outcomes: list[tuple[BatchResult, dict[str, Any]]] = []
    for service in (
        NaiveBulkOperationsService(using=using),
        OptimizedBulkOperationsService(using=using),
    ):
        rows = scenario.rows(scenario.setup(using))
        result = scenario.run(service, rows, chunk_size)
        if progress is not None:
            progress(
                f"{operation} ({service.variant}): {result.written} written, "
                f"{result.query_count} queries, {result.duration:.3f}s (log #{result.log_id})"
            )
        outcomes.append((result, scenario.snapshot(using)))
    (naive, naive_state), (optimized, optimized_state) = outcomes
    return Comparison(operation, size, naive, optimized, naive_state, optimized_state)


def run_benchmark(
    operations: Sequence[str],
    *,
    size: int,
    chunk_size: int,
    seed: int = DEFAULT_SEED,
    using: str = DEFAULT_DB_ALIAS,
    keep_data: bool = False,
    progress: Progress | None = None,
) -> list[Comparison]:
    """Compare each operation; afterwards remove the namespace unless ``keep_data``.

    With ``keep_data`` the database is left as the last optimized run made
    it, to inspect; otherwise the demo shop shows no benchmark rows.
    """
    comparisons = [
        compare(
            operation, size=size, chunk_size=chunk_size, seed=seed, using=using, progress=progress
        )
        for operation in operations
    ]
    if not keep_data:
        with transaction.atomic(using=using):
            reset_namespace(using)
    return comparisons


# -- reports -------------------------------------------------------------------

COLUMNS = (
    "Operation",
    "Records",
    "Queries (naive)",
    "Queries (optimized)",
    "Query reduction",
    "Time (naive)",
    "Time (optimized)",
    "Time improvement",
    "Speedup",
)


def table_rows(comparisons: Sequence[Comparison]) -> list[tuple[str, ...]]:
    return [
        (
            comparison.operation,
            str(comparison.records),
            str(comparison.naive.query_count),
            str(comparison.optimized.query_count),
            format_percent(comparison.query_reduction),
            f"{comparison.naive.duration:.3f}s",
            f"{comparison.optimized.duration:.3f}s",
            format_percent(comparison.time_improvement),
            format_speedup(comparison.speedup),
        )
        for comparison in comparisons
    ]


def text_table(comparisons: Sequence[Comparison]) -> str:
    """A plain table: operation left-aligned, figures right-aligned."""
    rows = [COLUMNS, *table_rows(comparisons)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells.extend(cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join(cells).rstrip()

    return "\n".join(
        [line(rows[0]), "  ".join("-" * width for width in widths)]
        + [line(row) for row in rows[1:]]
    )


def markdown_report(
    comparisons: Sequence[Comparison], *, command_line: str, database: str, date: str
) -> str:
    """A Markdown table for BENCHMARKS.md, headed by how it was produced."""
    return "\n".join(
        [
            f"Command: `{command_line}`",
            "",
            f"Database: {database}  ",
            f"Date: {date}",
            "",
            *markdown_table(COLUMNS, "l" + "r" * (len(COLUMNS) - 1), table_rows(comparisons)),
        ]
    )
