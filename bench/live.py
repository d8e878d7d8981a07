"""The benchmark behind ``manage.py bench_live``: bulk work while a live shop runs beside it.

The rows and raw limits are ``bench.workloads``'; the base state differs: the hot
products the players (``bench.players``) hold, a catalogue around them, the users and
categories are created once and kept, and every run starts from a reset that deletes
the rest and restores the hot products. Method: docs/benchmarks.md.
"""

from __future__ import annotations

import gc
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

from batching.engine import BatchOperation
from batching.models import BatchProcessingLog
from batching.postgres import add_to, column_name, copy_rows
from batching.registry import operation_class
from bench import namespace as ns
from bench import workloads as wl
from bench.players import ADMIN, CHECKOUT, HOT_STOCK, Samples, play
from bench.report import (
    BenchError,
    checks,
    format_ratio,
    markdown_table,
    met,
    percentile,
    section_head,
    short_size,
    take_turns,
)
from bench.server import database_url
from common.charts import bar_chart
from orders.models import Order, OrderItem
from products.models import Category, Product

Operation = BatchProcessingLog.Operation
DEFAULT = "default"  # no chunk_size: the service's default (BULK_CHUNK_SIZE)
VOLUME = "volume"  # the import commands' and jobs' default (the operation's volume chunk)
Chunk = str | int  # DEFAULT, VOLUME, or rows per chunk
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
PLAYERS = {CHECKOUT: "checkout", ADMIN: "admin save"}
STATS = (("p99_ms", "p99", LATENCY_P99_MS), ("max_ms", "max", LATENCY_MAX_MS))
reset = ns.reset_namespace


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
    top = max(ms) if ms else None
    return Summary(len(ms), failures, percentile(ms, 50), percentile(ms, 99), top)


def create_hot(using: str) -> ns.Kept:
    """An empty namespace, then the kept base: users, categories, the hot products and the
    catalogue around them (with the hot products alone, PostgreSQL checks foreign keys
    against the table by sequential scans, which a long raw transaction beside the players
    makes slower with every row)."""
    ns.reset_namespace(using)
    with transaction.atomic(using=using):
        ns.create_users(using, ns.USER_POOL)
        category = ns.create_categories(using, BASE_CATEGORIES)[0]
        for numbers in (range(ns.PRODUCT_POOL), CATALOGUE):
            ns.copy_products(using, numbers, lambda _: category, HOT_PRICE, HOT_STOCK)
    kept = Product.objects.using(using).filter(sku__startswith=ns.SKU_PREFIX)
    hot, kept_ids = ns.product_ids(using, ns.PRODUCT_POOL), list(kept.values_list("pk", flat=True))
    return ns.Kept(
        products=hot,
        category=category,
        kept=kept_ids,
        categories=BASE_CATEGORIES,
        price=HOT_PRICE,
        stock=HOT_STOCK,
    )


class Live(wl.Workload):
    """What ``bench_live`` adds to a workload; ``create_base`` adds what the kept base lacks
    (by default nothing: 50 users, the 100 products, their stock covers every order)."""

    size_at_scale_1: ClassVar[int] = 200_000
    operation_name: ClassVar[str]  # the registered operation (its volume chunk)
    raw_label: ClassVar[str] = ""

    @classmethod
    def operation(cls) -> type[BatchOperation]:
        return operation_class(cls.operation_name)

    @classmethod
    def limit_label(cls) -> str:
        return cls.raw_label or cls.strategy(wl.RAW).label

    def create_base(self) -> None:
        pass

    def copy_products_past_the_hot_ones(self, stop: int) -> None:
        category = Category.objects.using(self.using).get(name=ns.category_name(0)).pk
        numbers = range(ns.PRODUCT_POOL, stop)
        ns.copy_products(self.using, numbers, lambda _: category, "10.00", 100)

    def run_bulk(self, chunk_size: int | None) -> None:
        self.run_checked(wl.OPTIMIZED, chunk_size)

    def run_limit(self) -> None:
        self.run(wl.RAW)


class LiveViews(Live, wl.ViewsWorkload):
    operation_name = Operation.PRODUCT_VIEWS


class LiveScores(Live, wl.ScoresWorkload):
    operation_name = Operation.RECOMMENDATION_SCORES

    def create_base(self) -> None:
        pool = max(ns.PRODUCT_POOL, self.product_pool)
        self.copy_products_past_the_hot_ones(pool)
        self.copy_existing_scores(ns.user_ids(self.using), ns.product_ids(self.using, pool))


class LiveUpdates(Live, wl.UpdatesWorkload):
    operation_name = Operation.PRODUCT_UPDATES

    def create_base(self) -> None:
        self.copy_products_past_the_hot_ones(self.size)


class LiveOrders(Live, wl.OrdersWorkload):
    size_at_scale_1 = 30_000
    operation_name = Operation.ORDERS
    raw_label = "raw orders path"

    def run_limit(self) -> None:
        """COPY the orders, COPY their items, one UPDATE ... FROM unnest of stock; one
        transaction. Order ids are reserved from the sequence first, so the items can
        reference them without reading the orders back."""
        using, orders = self.using, self.orders
        with wl.raw_transaction(using):
            wanted = {item["product_id"] for order in orders for item in order["items"]}
            products = Product.objects.using(using).filter(pk__in=wanted)
            prices = dict(products.values_list("pk", "price"))
            with connections[using].cursor() as cursor:
                cursor.execute(
                    "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                    [Order._meta.db_table, Order._meta.pk.column, len(orders)],
                )
                ids = [row[0] for row in cursor.fetchall()]
            now, confirmed = timezone.now(), Order.Status.CONFIRMED.value
            numbered = list(zip(ids, orders, strict=True))
            demand: Counter[int] = Counter()
            for order in orders:
                for item in order["items"]:
                    demand[item["product_id"]] -= item["quantity"]
            totals = [
                sum(prices[i["product_id"]] * i["quantity"] for i in order["items"])
                for order in orders
            ]
            rows = (
                (order_id, order["reference"], order["user_id"], confirmed, total, now)
                for (order_id, order), total in zip(numbered, totals, strict=True)
            )
            fields = ["id", "reference", "user", "status", "total", "created_at"]
            copy_rows(Order, fields, rows, using=using)
            items = (
                (order_id, i["product_id"], i["quantity"], prices[i["product_id"]])
                for order_id, order in numbered
                for i in order["items"]
            )
            copy_rows(OrderItem, ["order", "product", "quantity", "unit_price"], items, using=using)
            add_to(Product, "stock_quantity", demand, using=using)


class LiveImport(Live, wl.ImportWorkload):
    operation_name = Operation.PRODUCTS

    first_product = ns.PRODUCT_POOL
    create_base = wl.ImportWorkload.create_base


OPERATIONS: dict[str, type[Live]] = {
    cls.name: cls for cls in (LiveViews, LiveScores, LiveOrders, LiveImport, LiveUpdates)
}


def sizes_at(scale: float) -> dict[str, int]:
    return {name: max(1, round(cls.size_at_scale_1 * scale)) for name, cls in OPERATIONS.items()}


class Players:
    """The live players, one spawned process each (nothing of Django is inherited)."""

    def __init__(self, dsn: str, products: list[int], intervals: dict[str, float], seed: int):
        context = multiprocessing.get_context("spawn")
        names = [Product._meta.db_table] + [
            column_name(Product, name) for name in ("id", "price", "stock_quantity", "updated_at")
        ]
        self.stopping = context.Event()
        self.players: dict[str, tuple[Any, Any, Any]] = {}
        for kind, interval in intervals.items():
            ready = context.Event()
            receiver, sender = context.Pipe(duplex=False)
            args = (kind, dsn, names, products, interval, seed, ready, self.stopping, sender)
            process = context.Process(target=play, args=args, name=f"bench-live-{kind}")
            process.daemon = True
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


@dataclass(slots=True)
class Run:
    """An operation at one chunk setting (or its raw limit), and the live shop beside it;
    with ``--repeat``, the fastest run's time and the live transactions of all runs."""

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
        return {**asdict(self), "runs": [run.as_dict() for run in self.runs]}


def chunk_size_of(setting: Chunk, operation: str) -> int | None:
    """The service's ``chunk_size`` for a setting: none, the operation's volume default, or rows."""
    if setting == DEFAULT:
        return None
    if setting == VOLUME:
        return OPERATIONS[operation].operation().volume_chunk_size()
    return int(setting)


def timed_run(
    workload: Live, hot: ns.Kept, setting: str, call: Callable, report: LiveReport
) -> Run:
    """Reset, base state and input (not timed), then ``call`` alone, timed; a failure is
    reported in ``problems`` and leaves the run without a time."""
    run = Run(workload.name, setting, workload.size)
    workload.setup(hot)
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
    run.seconds = None if run.error else ended - started
    return run


def fastest(tries: Sequence[Run]) -> Run:
    """A setting's runs as one: the fastest one's time, every one's window and the first error."""
    timed = [run for run in tries if run.seconds is not None]
    best = min(timed, key=lambda run: run.seconds or 0.0) if timed else tries[0]
    windows = [window for run in tries for window in run.windows]
    error = next((run.error for run in tries if run.error), "")
    return replace(best, windows=windows, error=error, runs=len(tries))


def live_summary(samples: Samples, windows: Sequence[tuple[float, float]]) -> Summary:
    """The transactions started in any of ``windows``, summarized together."""
    found = [samples.between(*window) for window in windows]
    return summarize([t for latencies, _ in found for t in latencies], sum(f for _, f in found))


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
    """Idle first, then per operation its raw limit and each chunk setting, ``repeat`` times
    taking turns, the players running. The namespace is emptied before and after; a
    failed run is reported in ``problems`` and the others still run."""
    sizes = {name: sizes_at(scale)[name] for name in operations}
    report = LiveReport(list(operations), sizes, [wl.RAW, *map(str, chunks)])
    intervals = intervals or {CHECKOUT: CHECKOUT_INTERVAL, ADMIN: ADMIN_INTERVAL}
    hot = create_hot(using)
    try:
        with Players(database_url(using), hot.products, intervals, seed) as players:
            players.wait_ready()
            idle = time.monotonic()
            time.sleep(idle_seconds)
            idle_window = (idle, time.monotonic())
            for name in operations:
                workload = OPERATIONS[name](sizes[name], seed=seed, using=using, work_dir=work_dir)
                calls = {wl.RAW: workload.run_limit} | {
                    str(chunk): partial(
                        workload.run_checked, wl.OPTIMIZED, chunk_size_of(chunk, name)
                    )
                    for chunk in chunks
                }
                timed = {
                    s: partial(timed_run, workload, hot, s, c, report) for s, c in calls.items()
                }
                runs = [fastest(found) for found in take_turns(timed, repeat).values()]
                report.runs += runs
                for run in runs:
                    rate = run.error or f"{run.rows_per_second:,.0f} {workload.unit}/s"
                    if progress is not None:
                        progress(f"{name} {run.setting}: {rate}")
            samples = players.stop()
    finally:
        ns.reset_namespace(using)
    report.idle = {kind: live_summary(found, [idle_window]) for kind, found in samples.items()}
    limits = {run.operation: run for run in report.runs if run.setting == wl.RAW}
    for run in report.runs:
        run.live = {kind: live_summary(found, run.windows) for kind, found in samples.items()}
        limit = limits.get(run.operation)
        if run.setting != wl.RAW and run.rows_per_second and limit and limit.rows_per_second:
            run.ratio = run.rows_per_second / limit.rows_per_second
    return report


# -- the report ---------------------------------------------------------------------------


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def latencies(summary: Summary | None) -> str:
    if summary is None or not summary.count:
        return "—"
    return f"{ms(summary.p50_ms)} / {ms(summary.p99_ms)} / {ms(summary.max_ms)}"


def run_label(run: Run) -> str:
    if run.setting == wl.RAW:
        return f"raw: {OPERATIONS[run.operation].limit_label()}"
    if run.setting in ENTRY_POINT_DEFAULTS:
        size = chunk_size_of(run.setting, run.operation) or settings.BULK_CHUNK_SIZE
        return f"{run.setting} ({size:,})"
    return f"{int(run.setting):,}"


def target_rows(report: LiveReport) -> list[tuple[str, str, str, str]]:
    """The goals, at the entry points' default chunks (the other settings are in the
    table of runs for comparison: 50,000 rows a chunk holds locks far longer)."""
    bulk = [run for run in report.runs if run.setting in ENTRY_POINT_DEFAULTS and run.live]
    if not bulk:
        return []
    rows = []
    for kind, label in PLAYERS.items():
        for stat, name, limit in STATS:
            worst = max(bulk, key=lambda run: getattr(run.live[kind], stat) or 0.0)
            value = getattr(worst.live[kind], stat) or 0.0
            figure = f"{label} {name} during every bulk run (default and volume chunks)"
            where = f"{ms(value)} ms ({worst.operation} {run_label(worst)})"
            rows.append((figure, f"≤ {limit:.0f} ms", where, met(value <= limit)))
    failures = sum(summary.failures for run in bulk for summary in run.live.values())
    rows.append(
        ("failed live transactions during bulk runs", "0", str(failures), met(not failures))
    )
    for run in bulk:
        if run.setting != VOLUME or (minimum := RATIO_TARGETS.get(run.operation)) is None:
            continue
        limit_label = OPERATIONS[run.operation].limit_label()
        figure = f"{run.operation} at the volume chunk ({chunk_size_of(VOLUME, run.operation):,})"
        ok = "n/a" if run.ratio is None else met(run.ratio >= minimum)
        rows.append((f"{figure} ÷ {limit_label}", f"≥ {minimum:.2f}x", format_ratio(run.ratio), ok))
    return rows


def run_cells(name: str, label: str, live: dict[str, Summary], *figures: str) -> tuple[str, ...]:
    checkout, admin = latencies(live.get(CHECKOUT)), latencies(live.get(ADMIN))
    return (name, label, *figures, checkout, admin, str(sum(s.failures for s in live.values())))


def markdown_report(
    report: LiveReport, *, command_line: str, charts: Sequence[tuple[str, str]] = ()
) -> str:
    """The BENCHMARKS.md section; ``charts`` are (alt text, relative path) pairs to link."""
    lines = [
        *section_head("Live shop during bulk work: checkout and admin-save latency", command_line),
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
    lines += [f"![{alt}]({path})" for alt, path in charts] + ([""] if charts else [])
    lines += checks("Figures to reach", target_rows(report), report.problems)
    rows = [run_cells("idle", "—", report.idle, *["—"] * 4)]
    for run in report.runs:
        seconds = f"{run.seconds:.2f} s" if run.seconds else f"failed: {run.error}"
        rate = f"{run.rows_per_second:,.0f}" if run.rows_per_second else "—"
        ratio = "—" if run.setting == wl.RAW else format_ratio(run.ratio)
        cells = (f"{run.rows:,}", seconds, rate, ratio)
        rows.append(run_cells(run.operation, run_label(run), run.live, *cells))
    latency = "p50 / p99 / max ms"
    header = ("Operation", "Chunk", "Rows", "Time", "Rows/s", "÷ raw", f"Checkout {latency}",
              f"Admin save {latency}", "Failed live")  # fmt: skip
    lines += ["### Runs", "", *markdown_table(header, "llrrrrrrr", rows)]
    return "\n".join(lines) + "\n"


def latency_chart(report: LiveReport) -> str:
    """p99 and max of both players, idle and per run, on a log scale."""
    named = (wl.RAW, *ENTRY_POINT_DEFAULTS)
    groups = ["idle"] + [
        f"{r.operation} {r.setting if r.setting in named else short_size(int(r.setting))}"
        for r in report.runs
    ]
    windows = [report.idle, *(run.live for run in report.runs)]
    series = {
        f"{label} {name}": [getattr(live.get(kind), stat, None) for live in windows]
        for kind, label in PLAYERS.items()
        for stat, name, _ in STATS
    }
    title = "Live transaction latency during bulk runs (PostgreSQL)"
    width = max(720, 112 * len(groups) + 120)
    return bar_chart(
        groups, series, title=title, y_label="ms", log_scale=True, width=width, height=400
    )


CHARTS = {"chart": ("Live latency during bulk runs", latency_chart)}
