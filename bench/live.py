"""The benchmark behind ``manage.py bench_live``: bulk work while a live shop runs beside it.

One bulk operation at a time runs through ``OptimizedBulkOperationsService`` in
this process, at each chunk setting, while two other OS processes
(``bench.players``) play the live shop on the 100 hot products the bulk rows
reference: checkouts (one unit of stock per transaction) and admin saves (one
product's price and stock per transaction). Each operation's raw-SQL limit
runs the same rows the same way, beside the same players, so the throughput
ratio compares like with like. See docs/benchmarks.md for the method.

The rows and the raw limits are ``bench.workloads``'; only
the base state differs: the hot products (skus ``BENCH-P-000000`` to
``-000099``), a catalogue of 10,000 more, the 50 users and 4 categories are
created once and kept, since
the players hold the products' ids, and every run starts from a reset that
deletes the rest of the namespace and restores the hot products' stock.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.utils import timezone
from psycopg import sql

from batching.engine import BatchOperation
from batching.models import BatchProcessingLog
from batching.postgres import add_to, column, column_name, execute
from batching.postgres import copy_rows as copy_binary
from batching.registry import operation_class
from bench.namespace import (
    CATEGORY_PREFIX,
    ORDER_PREFIX,
    PRODUCT_POOL,
    SKU_PREFIX,
    USER_POOL,
    category_name,
    copy_products,
    create_categories,
    create_users,
    like_prefix,
    product_ids,
    reset_namespace,
    table,
    user_ids,
    vacuum,
)
from bench.players import ADMIN, CHECKOUT, HOT_STOCK, Samples, Table, play
from bench.report import format_ratio, markdown_table, section_head, short_size
from bench.scale import database_url
from bench.workloads import (
    OPTIMIZED,
    RAW,
    BenchError,
    ImportWorkload,
    OrdersWorkload,
    ScoresWorkload,
    UpdatesWorkload,
    ViewsWorkload,
    Workload,
    check_completed,
    raw_transaction,
)
from common.charts import bar_chart
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import OptimizedBulkOperationsService

Operation = BatchProcessingLog.Operation
DEFAULT = "default"  # no chunk_size: the service's default (BULK_CHUNK_SIZE)
VOLUME = "volume"  # the import commands' and jobs' default (the operation's volume chunk)
# A chunk setting: DEFAULT, VOLUME, or rows per chunk.
Chunk = str | int
DEFAULT_CHUNKS: tuple[Chunk, ...] = (DEFAULT, VOLUME, 50_000)
ENTRY_POINT_DEFAULTS = (DEFAULT, VOLUME)
DEFAULT_IDLE_SECONDS = 5.0
CHECKOUT_INTERVAL = 0.005
ADMIN_INTERVAL = 0.050
PLAYER_START_TIMEOUT = 60.0
BASE_CATEGORIES = 4  # the import's base state; the hot products are in the first
# Kept products numbered past any workload's up to --scale 4.5 (``create_hot``).
CATALOGUE = range(900_000, 910_000)
HOT_PRICE = Decimal("10.00")

PLAYER_FAILED = "the {kind} player stopped without its samples (see its error above)"
PLAYER_NOT_READY = "the {kind} player did not connect within {seconds:.0f} s"
RUN_FAILED = "{operation} {setting}: {error}"

# The goals: the live shop during every bulk run at the entry points' defaults,
# and throughput at the volume entry points' default.
LATENCY_P99_MS = 50.0
LATENCY_MAX_MS = 250.0
RATIO_TARGETS = {"views": 0.8, "scores": 0.7, "orders": 0.5, "import": 0.7, "updates": 0.7}


# -- summaries ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None if empty."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Summary:
    """One player's transactions in one window: count, failures, latencies in ms."""

    count: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def summarize(latencies: Sequence[float], failures: int = 0) -> Summary:
    """``latencies`` in seconds, summarized in milliseconds."""
    ms = [value * 1000 for value in latencies]
    return Summary(
        len(ms), failures, percentile(ms, 50), percentile(ms, 99), max(ms) if ms else None
    )


# -- the base state around the hot products ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Hot:
    """What every run keeps: the hot products' ids (product number order), their category,
    and the ids of every product kept (the hot ones and the catalogue around them)."""

    products: list[int]
    category: int
    kept: list[int]


def create_hot(using: str) -> Hot:
    """An empty namespace, then the kept base: users, categories, the hot products."""
    reset_namespace(using)
    with transaction.atomic(using=using):
        create_users(using, USER_POOL)
        categories = create_categories(using, BASE_CATEGORIES)
        copy_products(using, range(PRODUCT_POOL), lambda _: categories[0], HOT_PRICE, HOT_STOCK)
        # The catalogue around them. With only the hot products the table is a
        # few pages, PostgreSQL plans foreign-key checks against it as
        # sequential scans, and a long raw transaction beside the players (whose
        # updates it keeps from being pruned) makes each scan longer than the
        # last: on a fresh database the raw views COPY ran for ten minutes.
        copy_products(using, CATALOGUE, lambda _: categories[0], HOT_PRICE, HOT_STOCK)
    kept = Product.objects.using(using).filter(sku__startswith=SKU_PREFIX)
    return Hot(
        product_ids(using, PRODUCT_POOL), categories[0], list(kept.values_list("pk", flat=True))
    )


def reset(using: str, hot: Hot) -> None:
    """Delete the namespace's rows except the kept base; give the hot products back their stock.

    One statement per table (like ``namespace.reset_namespace``); the hot
    products are updated in place, so the players' ids stay valid.
    """
    bench_products = {"product__sku__startswith": SKU_PREFIX}
    # Fresh statistics first, as reset_namespace does: just after a run the planner
    # may still expect empty tables and delete by nested loops for minutes.
    for model in (ProductView, RecommendationScore, Product):
        execute(using, sql.SQL("ANALYZE {}").format(table(model)))
    with transaction.atomic(using=using):
        OrderItem.objects.using(using).filter(order__reference__startswith=ORDER_PREFIX).delete()
        execute(
            using,
            sql.SQL("DELETE FROM {} WHERE {} LIKE %s").format(
                table(Order), column(Order, "reference")
            ),
            [like_prefix(ORDER_PREFIX)],
        )
        ProductView.objects.using(using).filter(**bench_products).delete()
        RecommendationScore.objects.using(using).filter(**bench_products).delete()
    vacuum(using, (OrderItem, Order, ProductView, RecommendationScore))
    with transaction.atomic(using=using):
        Product.objects.using(using).filter(pk__in=hot.products).update(
            price=HOT_PRICE,
            stock_quantity=HOT_STOCK,
            view_count=0,
            is_active=True,
            category_id=hot.category,
        )
        execute(
            using,
            sql.SQL("DELETE FROM {} WHERE {} LIKE %s AND NOT {} = ANY(%s)").format(
                table(Product), column(Product, "sku"), column(Product, "id")
            ),
            [like_prefix(SKU_PREFIX), hot.kept],
        )
        kept = [category_name(number) for number in range(BASE_CATEGORIES)]
        Category.objects.using(using).filter(name__startswith=CATEGORY_PREFIX).exclude(
            name__in=kept
        ).delete()
    vacuum(using, (Product, Category))


# -- the operations: bench.scale's workloads on the kept base -----------------------------


class Live(Workload):
    """What ``bench_live`` adds to a workload: its size at scale 1 and its raw limit's label.

    ``create_base`` adds only what the kept base lacks.
    """

    size_at_scale_1: ClassVar[int]
    # The registered operation the service runs it with (its volume chunk).
    operation_name: ClassVar[str]

    @classmethod
    def operation(cls) -> type[BatchOperation]:
        return operation_class(cls.operation_name)

    @classmethod
    def raw_label(cls) -> str:
        return cls.strategy(RAW).label

    def copy_products_past_the_hot_ones(self, stop: int) -> None:
        """Products numbered from the hot ones' end up to ``stop``, in the hot category."""
        category = Category.objects.using(self.using).get(name=category_name(0)).pk
        copy_products(self.using, range(PRODUCT_POOL, stop), lambda _: category, "10.00", 100)

    def run_bulk(self, chunk_size: int | None) -> None:
        service = OptimizedBulkOperationsService(using=self.using)
        check_completed(self.name, OPTIMIZED, self.run_service(service, chunk_size))

    def run_limit(self) -> None:
        self.run(RAW)


class LiveViews(Live, ViewsWorkload):
    size_at_scale_1 = 200_000
    operation_name = Operation.PRODUCT_VIEWS

    def create_base(self) -> None:
        """The kept base is all: 50 users, the 100 products."""


class LiveScores(Live, ScoresWorkload):
    size_at_scale_1 = 200_000
    operation_name = Operation.RECOMMENDATION_SCORES

    def create_base(self) -> None:
        """ScoresWorkload's base: products past the hot ones, and every even key's score."""
        pool = max(PRODUCT_POOL, self.product_pool)
        self.copy_products_past_the_hot_ones(pool)
        self.copy_existing_scores(user_ids(self.using), product_ids(self.using, pool))


class LiveUpdates(Live, UpdatesWorkload):
    size_at_scale_1 = 200_000
    operation_name = Operation.PRODUCT_UPDATES

    def create_base(self) -> None:
        """Products past the hot ones, up to the size: the rows update each product once."""
        self.copy_products_past_the_hot_ones(self.size)


class LiveOrders(Live, OrdersWorkload):
    size_at_scale_1 = 30_000
    operation_name = Operation.ORDERS

    @classmethod
    def raw_label(cls) -> str:
        return "raw orders path"

    def create_base(self) -> None:
        """The kept base is all; the hot products' stock covers every order and checkout."""

    def run_limit(self) -> None:
        """COPY the orders, COPY their items, one UPDATE ... FROM unnest of stock; one transaction.

        Order ids are reserved from the sequence first, so the items can
        reference them without reading the orders back. Nothing is checked
        but the foreign keys, by each statement (``raw_transaction``).
        """
        using, orders = self.using, self.orders
        with raw_transaction(using):
            wanted = {item["product_id"] for order in orders for item in order["items"]}
            prices = dict(
                Product.objects.using(using).filter(pk__in=wanted).values_list("pk", "price")
            )
            with connections[using].cursor() as cursor:
                cursor.execute(
                    "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                    [Order._meta.db_table, Order._meta.pk.column, len(orders)],
                )
                ids = [row[0] for row in cursor.fetchall()]
            now = timezone.now()
            copy_binary(
                Order,
                ["id", "reference", "user", "status", "total", "created_at"],
                (
                    (
                        order_id,
                        order["reference"],
                        order["user_id"],
                        Order.Status.CONFIRMED.value,
                        sum(prices[i["product_id"]] * i["quantity"] for i in order["items"]),
                        now,
                    )
                    for order_id, order in zip(ids, orders, strict=True)
                ),
                using=using,
            )
            copy_binary(
                OrderItem,
                ["order", "product", "quantity", "unit_price"],
                (
                    (order_id, i["product_id"], i["quantity"], prices[i["product_id"]])
                    for order_id, order in zip(ids, orders, strict=True)
                    for i in order["items"]
                ),
                using=using,
            )
            demand: Counter[int] = Counter()
            for order in orders:
                for item in order["items"]:
                    demand[item["product_id"]] -= item["quantity"]
            add_to(Product, "stock_quantity", demand, using=using)


class LiveImport(Live, ImportWorkload):
    size_at_scale_1 = 200_000
    operation_name = Operation.PRODUCTS

    def create_base(self) -> None:
        """ImportWorkload's base: the first half of the skus exist, in the 4 base categories."""
        names = [category_name(number) for number in range(BASE_CATEGORIES)]
        ids = dict(
            Category.objects.using(self.using).filter(name__in=names).values_list("name", "pk")
        )
        categories = [ids[name] for name in names]
        copy_products(
            self.using,
            range(PRODUCT_POOL, self.size // 2),
            lambda number: categories[number % BASE_CATEGORIES],
            "1.00",
            1,
        )


OPERATIONS: dict[str, type[Live]] = {
    cls.name: cls for cls in (LiveViews, LiveScores, LiveOrders, LiveImport, LiveUpdates)
}


def sizes_at(scale: float) -> dict[str, int]:
    return {name: max(1, round(cls.size_at_scale_1 * scale)) for name, cls in OPERATIONS.items()}


# -- the players' processes ---------------------------------------------------------------


def product_table() -> Table:
    return Table(
        Product._meta.db_table,
        *(column_name(Product, name) for name in ("id", "price", "stock_quantity", "updated_at")),
    )


class Players:
    """The live players, one spawned process each (nothing of Django is inherited)."""

    def __init__(
        self, dsn: str, products: list[int], *, intervals: dict[str, float], seed: int
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.stopping = context.Event()
        self.players: dict[str, tuple[Any, Any, Any]] = {}
        for kind, interval in intervals.items():
            ready = context.Event()
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=play,
                args=(kind, dsn, product_table(), products, interval, seed, ready, self.stopping),
                kwargs={"results": sender},
                name=f"bench-live-{kind}",
                daemon=True,
            )
            process.start()
            sender.close()  # the child holds the only sending end: its death is an EOF here
            self.players[kind] = (process, ready, receiver)

    def __enter__(self) -> Players:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for process, _, _ in self.players.values():
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()

    def wait_ready(self, timeout: float = PLAYER_START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for kind, (process, ready, _) in self.players.items():
            while not ready.wait(0.1):
                if not process.is_alive():
                    raise BenchError(PLAYER_FAILED.format(kind=kind))
                if time.monotonic() > deadline:
                    raise BenchError(PLAYER_NOT_READY.format(kind=kind, seconds=timeout))

    def stop(self) -> dict[str, Samples]:
        """Stop every player; the samples of each."""
        self.stopping.set()
        samples = {}
        for kind, (_, _, receiver) in self.players.items():
            try:
                samples[kind] = receiver.recv()
            except EOFError:
                raise BenchError(PLAYER_FAILED.format(kind=kind)) from None
        return samples


# -- running ------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """An operation at one chunk setting (or its raw limit), and the live shop beside it.

    With ``--repeat`` the setting's runs are one ``Run``: the fastest one's
    time, and the live transactions of all of them (``windows``) together.
    """

    operation: str
    setting: str  # "default", a chunk size, or "raw"
    rows: int
    seconds: float | None = None
    windows: list[tuple[float, float]] = field(default_factory=list)
    live: dict[str, Summary] = field(default_factory=dict)
    ratio: float | None = None  # rows/s divided by the raw limit's
    error: str = ""
    runs: int = 1

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds else None

    def as_dict(self) -> dict[str, Any]:
        data = {**asdict(self), "rows_per_second": self.rows_per_second}
        del data["windows"]
        return data


@dataclass(slots=True)
class LiveReport:
    operations: list[str]
    sizes: dict[str, int]
    settings: list[str]
    idle: dict[str, Summary] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "sizes": self.sizes,
            "settings": self.settings,
            "idle": {kind: asdict(summary) for kind, summary in self.idle.items()},
            "runs": [run.as_dict() for run in self.runs],
            "problems": self.problems,
        }


def setting_label(chunk: Chunk) -> str:
    return str(chunk)


def chunk_size_of(setting: Chunk, operation: str) -> int | None:
    """The service's ``chunk_size`` for a setting: none, the operation's volume default, or rows."""
    if setting == DEFAULT:
        return None
    if setting == VOLUME:
        return OPERATIONS[operation].operation().volume_chunk_size()
    return int(setting)


def timed_run(
    workload: Workload, hot: Hot, setting: str, call: Callable[[], Any], report: LiveReport
) -> Run:
    """Reset, the workload's base and input (not timed), then ``call`` alone, timed.

    A failure is reported in ``problems``; the run has no time then.
    """
    run = Run(workload.name, setting, workload.size)
    reset(workload.using, hot)
    with transaction.atomic(using=workload.using):
        workload.create_base()
    vacuum(workload.using, workload.tables)
    workload.prepare()
    gc.collect()
    started = time.monotonic()
    try:
        call()
    except (BenchError, DatabaseError) as exc:
        run.error = str(exc)
        report.problems.append(
            RUN_FAILED.format(operation=run.operation, setting=setting, error=exc)
        )
    ended = time.monotonic()
    run.windows = [(started, ended)]
    if not run.error:
        run.seconds = ended - started
    return run


def fastest(tries: Sequence[Run]) -> Run:
    """A setting's runs as one: the fastest one's time, every one's window and the first error."""
    timed = [run for run in tries if run.seconds is not None]
    best = min(timed, key=lambda run: run.seconds or 0.0) if timed else tries[0]
    return replace(
        best,
        windows=[window for run in tries for window in run.windows],
        error=next((run.error for run in tries if run.error), ""),
        runs=len(tries),
    )


def live_summary(samples: Samples, windows: Sequence[tuple[float, float]]) -> Summary:
    """The transactions started in any of ``windows``, summarized together."""
    latencies: list[float] = []
    failures = 0
    for window in windows:
        found, failed = samples.between(*window)
        latencies += found
        failures += failed
    return summarize(latencies, failures)


def run_live_bench(
    operations: Sequence[str],
    *,
    scale: float = 1.0,
    chunks: Sequence[Chunk] = DEFAULT_CHUNKS,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    intervals: dict[str, float] | None = None,
    seed: int,
    work_dir: Path,
    repeat: int = 1,
    using: str = DEFAULT_DB_ALIAS,
    progress: Callable[[str], None] | None = None,
) -> LiveReport:
    """Idle first, then per operation its raw limit and each chunk setting, players running.

    With ``repeat``, the raw limit and the settings run that many times,
    taking turns (``fastest``): a machine whose speed drifts then sways every
    setting alike. The namespace is emptied before and after. A run that fails
    is reported in ``problems`` and the others still run.
    """
    sizes = {name: sizes_at(scale)[name] for name in operations}
    report = LiveReport(list(operations), sizes, [RAW, *map(setting_label, chunks)])
    intervals = intervals or {CHECKOUT: CHECKOUT_INTERVAL, ADMIN: ADMIN_INTERVAL}
    hot = create_hot(using)
    try:
        with Players(database_url(using), hot.products, intervals=intervals, seed=seed) as players:
            players.wait_ready()
            idle = time.monotonic()
            time.sleep(idle_seconds)
            idle_window = (idle, time.monotonic())
            for name in operations:
                workload = OPERATIONS[name](sizes[name], seed=seed, using=using, work_dir=work_dir)
                calls = {RAW: workload.run_limit} | {
                    setting_label(chunk): partial(workload.run_bulk, chunk_size_of(chunk, name))
                    for chunk in chunks
                }
                tries: dict[str, list[Run]] = {setting: [] for setting in calls}
                for _ in range(repeat):
                    for setting, call in calls.items():
                        tries[setting].append(timed_run(workload, hot, setting, call, report))
                runs = [fastest(found) for found in tries.values()]
                report.runs += runs
                if progress is not None:
                    for run in runs:
                        rate = run.error or f"{run.rows_per_second:,.0f} {workload.unit}/s"
                        progress(f"{name} {run.setting}: {rate}")
            samples = players.stop()
    finally:
        reset_namespace(using)
    report.idle = {kind: live_summary(found, [idle_window]) for kind, found in samples.items()}
    for run in report.runs:
        run.live = {kind: live_summary(found, run.windows) for kind, found in samples.items()}
    limits = {run.operation: run for run in report.runs if run.setting == RAW}
    for run in report.runs:
        limit = limits.get(run.operation)
        if run.setting != RAW and run.rows_per_second and limit and limit.rows_per_second:
            run.ratio = run.rows_per_second / limit.rows_per_second
    return report


# -- the report ---------------------------------------------------------------------------

PLAYERS = {CHECKOUT: "checkout", ADMIN: "admin save"}


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def latencies(summary: Summary | None) -> str:
    if summary is None or not summary.count:
        return "—"
    return f"{ms(summary.p50_ms)} / {ms(summary.p99_ms)} / {ms(summary.max_ms)}"


def run_label(run: Run) -> str:
    if run.setting == RAW:
        return f"raw: {OPERATIONS[run.operation].raw_label()}"
    if run.setting in ENTRY_POINT_DEFAULTS:
        size = chunk_size_of(run.setting, run.operation) or settings.BULK_CHUNK_SIZE
        return f"{run.setting} ({size:,})"
    return f"{int(run.setting):,}"


def target_rows(report: LiveReport) -> list[tuple[str, str, str, str]]:
    """The goals: the live shop during every bulk run at the entry points'
    defaults (the service's, the volume entry points'), and throughput at the
    volume default. The other chunk settings are in the table of runs for
    comparison (50,000 rows a chunk holds locks far longer, by design).
    """
    bulk = [run for run in report.runs if run.setting in ENTRY_POINT_DEFAULTS and run.live]
    if not bulk:
        return []
    rows = []
    for kind, label in PLAYERS.items():
        for stat, name, limit in (
            ("p99_ms", "p99", LATENCY_P99_MS),
            ("max_ms", "max", LATENCY_MAX_MS),
        ):
            worst = max(bulk, key=lambda run: getattr(run.live[kind], stat) or 0.0)
            value = getattr(worst.live[kind], stat) or 0.0
            rows.append(
                (
                    f"{label} {name} during every bulk run (default and volume chunks)",
                    f"≤ {limit:.0f} ms",
                    f"{ms(value)} ms ({worst.operation} {run_label(worst)})",
                    "yes" if value <= limit else "**no**",
                )
            )
    failures = sum(summary.failures for run in bulk for summary in run.live.values())
    rows.append(
        (
            "failed live transactions during bulk runs",
            "0",
            str(failures),
            "yes" if failures == 0 else "**no**",
        )
    )
    for run in bulk:
        minimum = RATIO_TARGETS.get(run.operation)
        if run.setting != VOLUME or minimum is None:
            continue
        rows.append(
            (
                f"{run.operation} at the volume chunk ({chunk_size_of(VOLUME, run.operation):,}) ÷ "
                f"{OPERATIONS[run.operation].raw_label()}",
                f"≥ {minimum:.2f}x",
                format_ratio(run.ratio),
                "n/a" if run.ratio is None else ("yes" if run.ratio >= minimum else "**no**"),
            )
        )
    return rows


def markdown_report(report: LiveReport, *, command_line: str, chart: str | None = None) -> str:
    """The section of BENCHMARKS.md; ``chart`` is the relative path of the SVG to link."""
    idle = report.idle
    lines = [
        *section_head(
            "Live shop during bulk work: checkout and admin-save latency",
            command_line,
        ),
        "One bulk operation at a time runs through the optimized service (chunk setting: "
        "*default* is no `chunk_size`, the service's default; *volume* is the default of the "
        "import commands and background jobs, `BULK_VOLUME_CHUNK_SIZE`) while two other "
        "processes play the live shop on the "
        "100 products the bulk rows reference: a checkout (one unit of stock) every "
        f"{CHECKOUT_INTERVAL * 1000:g} ms and an admin save (one product's price and stock) "
        f"every {ADMIN_INTERVAL * 1000:g} ms, one transaction each. *Raw* is the same rows "
        "written by raw SQL in one transaction beside the same players; *÷ raw* is the bulk "
        "rows/s divided by it. Latencies are p50 / p99 / max in ms of the live transactions "
        "started during the run; *idle* is before any bulk run. Method: docs/benchmarks.md.",
        "",
    ]
    repeat = max((run.runs for run in report.runs), default=1)
    if repeat > 1:
        lines += [
            f"Each setting ran {repeat} times, an operation's settings taking turns: *Time* "
            "and *Rows/s* are its fastest run's, the latencies those of all its runs together.",
            "",
        ]
    if chart:
        lines += [f"![Live latency during bulk runs]({chart})", ""]
    targets = target_rows(report)
    if targets:
        lines += ["### Figures to reach", ""]
        lines += markdown_table(("Figure", "Target", "Measured", "Met"), "lrrl", targets)
        lines.append("")
    if report.problems:
        lines += ["### Problems", "", *(f"- {problem}" for problem in report.problems), ""]
    rows = [
        (
            "idle",
            "—",
            "—",
            "—",
            "—",
            "—",
            latencies(idle.get(CHECKOUT)),
            latencies(idle.get(ADMIN)),
            str(sum(s.failures for s in idle.values())),
        )
    ]
    for run in report.runs:
        rows.append(
            (
                run.operation,
                run_label(run),
                f"{run.rows:,}",
                f"{run.seconds:.2f} s" if run.seconds else f"failed: {run.error}",
                f"{run.rows_per_second:,.0f}" if run.rows_per_second else "—",
                "—" if run.setting == RAW else format_ratio(run.ratio),
                latencies(run.live.get(CHECKOUT)),
                latencies(run.live.get(ADMIN)),
                str(sum(summary.failures for summary in run.live.values())),
            )
        )
    header = (
        "Operation",
        "Chunk",
        "Rows",
        "Time",
        "Rows/s",
        "÷ raw",
        "Checkout p50 / p99 / max ms",
        "Admin save p50 / p99 / max ms",
        "Failed live",
    )
    lines += ["### Runs", "", *markdown_table(header, "llrrrrrrr", rows)]
    return "\n".join(lines) + "\n"


def short_setting(setting: str) -> str:
    return setting if setting in (RAW, *ENTRY_POINT_DEFAULTS) else short_size(int(setting))


def latency_chart(report: LiveReport) -> str:
    """p99 and max of both players, idle and per run, on a log scale."""
    groups = ["idle"] + [f"{run.operation} {short_setting(run.setting)}" for run in report.runs]
    windows = [report.idle, *(run.live for run in report.runs)]
    series = {
        f"{label} {name}": [getattr(live.get(kind), stat, None) for live in windows]
        for kind, label in PLAYERS.items()
        for stat, name in (("p99_ms", "p99"), ("max_ms", "max"))
    }
    return bar_chart(
        groups,
        series,
        title="Live transaction latency during bulk runs (PostgreSQL)",
        y_label="ms",
        log_scale=True,
        width=max(720, 112 * len(groups) + 120),
        height=400,
    )
