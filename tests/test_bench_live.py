"""``bench_live``: the summary helpers, the kept hot products, the raw orders path, the report.

No test asserts a time: the report is checked for its shape, the database for
what the runs and resets left behind.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from batching.readers import RowStream
from bench import live
from bench.namespace import PRODUCT_POOL, SKU_PREFIX, product_sku
from bench.players import HOT_STOCK, Samples
from products.models import Product, ProductView, RecommendationScore

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="bench_live measures PostgreSQL's row locks, COPY and a second connection: "
    "PostgreSQL only",
)


def run(*args: str) -> str:
    out = StringIO()
    call_command("bench_live", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


# -- summaries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"), [(1, 1), (50, 50), (99, 99), (99.5, 100), (100, 100), (0.5, 1)]
)
def test_percentile_is_the_nearest_rank(q, expected):
    values = list(range(100, 0, -1))  # unsorted on purpose
    assert live.percentile(values, q) == expected


def test_percentile_of_few_values_and_of_none():
    assert live.percentile([3.0], 99) == 3.0
    assert live.percentile([1.0, 9.0], 50) == 1.0
    assert live.percentile([1.0, 9.0], 51) == 9.0
    assert live.percentile([], 50) is None
    for q in (0, -1, 101):
        with pytest.raises(ValueError, match="q must be in"):
            live.percentile([1.0], q)


def test_summarize_gives_milliseconds_and_keeps_failures():
    latencies = [0.001 * n for n in range(1, 101)]  # 1 ms .. 100 ms
    summary = live.summarize(latencies, failures=2)
    assert summary.count == 100 and summary.failures == 2
    assert summary.p50_ms == pytest.approx(50.0)
    assert summary.p99_ms == pytest.approx(99.0)
    assert summary.max_ms == pytest.approx(100.0)
    assert live.summarize([]) == live.Summary(0, 0, None, None, None)


def test_samples_between_takes_the_transactions_started_in_the_window():
    samples = Samples(
        starts=[1.0, 2.0, 3.0, 4.0],
        latencies=[0.1, 0.2, 0.3, 0.4],
        failed=[True, False, True, True],
    )
    assert samples.between(2.0, 3.0) == ([0.2, 0.3], 1)
    assert samples.between(5.0, 6.0) == ([], 0)


def test_live_summary_pools_the_transactions_of_every_window():
    samples = Samples(
        starts=[1.0, 2.0, 3.0, 4.0, 5.0],
        latencies=[0.001, 0.002, 0.003, 0.004, 0.005],
        failed=[False, True, False, False, True],
    )

    summary = live.live_summary(samples, [(1.0, 2.0), (4.0, 5.0)])

    assert (summary.count, summary.failures, summary.max_ms) == (4, 2, pytest.approx(5.0))


def test_fastest_takes_the_quickest_time_every_window_and_the_first_error():
    tries = [
        live.Run("views", "default", 10, seconds=3.0, windows=[(0.0, 3.0)]),
        live.Run("views", "default", 10, windows=[(3.0, 4.0)], error="lock timeout"),
        live.Run("views", "default", 10, seconds=2.0, windows=[(4.0, 6.0)]),
    ]

    run = live.fastest(tries)

    assert run.seconds == 2.0 and run.runs == 3 and run.error == "lock timeout"
    assert run.windows == [(0.0, 3.0), (3.0, 4.0), (4.0, 6.0)]
    assert live.fastest(tries[1:2]).seconds is None


# -- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--operations", "views,nope"], "unknown operation 'nope' in --operations"),
        (["--chunks", "default,0"], "--chunks must be comma-separated 'default', 'volume' or"),
        (["--chunks", "big"], "not 'big'"),
        (["--scale", "0"], "--scale must be more than 0, not 0.0"),
        (["--idle-seconds", "-1"], "--idle-seconds must be more than 0"),
        (["--repeat", "0"], "--repeat: must be at least 1, not 0"),
    ],
)
def test_bad_arguments_are_command_errors(args, message):
    with pytest.raises(CommandError, match=message):
        run(*args)


@pytest.mark.skipif(connection.vendor == "postgresql", reason="checks the refusal on SQLite")
def test_refuses_sqlite():
    with pytest.raises(CommandError, match="bench_live measures PostgreSQL's locks and COPY"):
        run("--scale", "0.001")


def test_sizes_scale_and_never_reach_zero():
    assert live.sizes_at(1) == {
        "views": 200_000,
        "scores": 200_000,
        "orders": 30_000,
        "import": 200_000,
        "updates": 200_000,
    }
    assert live.sizes_at(0.25)["orders"] == 7_500
    assert set(live.sizes_at(1e-9).values()) == {1}


# -- the base state around the hot products ------------------------------------------------


def workload(name: str, size: int, tmp_path) -> live.Workload:
    return live.OPERATIONS[name](size, work_dir=tmp_path)


@postgres_only
@pytest.mark.django_db
def test_reset_keeps_the_hot_products_and_restores_their_stock(tmp_path):
    hot = live.create_hot("default")
    scores = workload("scores", 20_000, tmp_path)  # products past the hot ones, scores
    scores.create_base()
    views = workload("views", 50, tmp_path)
    views.prepare()
    views.run_limit()
    Product.objects.filter(pk__in=hot.products[:10]).update(stock_quantity=3, price=1)
    assert Product.objects.filter(sku__startswith=SKU_PREFIX).count() > PRODUCT_POOL

    live.reset("default", hot)

    bench = Product.objects.filter(sku__startswith=SKU_PREFIX)
    # The hot products and the catalogue around them, nothing else.
    assert set(hot.products) < set(hot.kept)
    assert len(hot.kept) == PRODUCT_POOL + len(live.CATALOGUE)
    assert sorted(bench.values_list("pk", flat=True)) == sorted(hot.kept)
    assert set(bench.values_list("stock_quantity", "price")) == {(HOT_STOCK, live.HOT_PRICE)}
    assert not ProductView.objects.exists()
    assert not RecommendationScore.objects.exists()


@postgres_only
@pytest.mark.django_db
@pytest.mark.parametrize("name", ["views", "scores", "orders"])
def test_referencing_operations_touch_only_hot_products(name, tmp_path):
    hot = live.create_hot("default")
    operation = workload(name, 300, tmp_path)
    operation.create_base()
    operation.prepare()
    rows = operation.service_input()
    if name == "orders":
        products = {item["product_id"] for order in rows for item in order["items"]}
    else:
        products = {row["product_id"] for row in rows}
    assert products <= set(hot.products)
    assert len(products) > 1


@postgres_only
@pytest.mark.django_db
@pytest.mark.parametrize("name", ["import", "updates"])
def test_catalogue_operations_write_every_hot_product(name, tmp_path):
    live.create_hot("default")
    operation = workload(name, 300, tmp_path)
    operation.create_base()
    operation.prepare()
    if name == "import":
        with RowStream(operation.path) as stream:
            skus = {row["sku"] for row in stream}
    else:
        skus = {row["sku"] for row in operation.service_input()}
    assert {product_sku(number) for number in range(PRODUCT_POOL)} <= skus
    assert len(skus) == 300


@postgres_only
@pytest.mark.django_db
def test_raw_orders_path_ends_as_the_service_does(tmp_path):
    hot = live.create_hot("default")
    orders = workload("orders", 200, tmp_path)
    ends = []
    for run in (orders.run_limit, lambda: orders.run_bulk(None)):
        live.reset("default", hot)
        orders.prepare()
        run()
        ends.append(orders.snapshot())
    assert ends[0] == ends[1]
    assert len(ends[0]["orders"]) == 200 and len(ends[0]["items"]) == 600
    assert min(stock for _, stock in ends[0]["stock"]) < HOT_STOCK


# -- the command ---------------------------------------------------------------------------


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_command_reports_every_run_beside_the_live_players(tmp_path):
    paths = {name: tmp_path / "out" / f"live.{name}" for name in ("md", "json", "svg")}
    run(
        "--scale",
        "0.001",
        "--chunks",
        "default,volume,50",
        "--idle-seconds",
        "0.3",
        "--markdown",
        str(paths["md"]),
        "--json",
        str(paths["json"]),
        "--chart",
        str(paths["svg"]),
    )

    report = json.loads(paths["json"].read_text())
    assert report["operations"] == list(live.OPERATIONS)
    assert report["settings"] == ["raw", "default", "volume", "50"]
    assert report["problems"] == []
    assert set(report["idle"]) == {"checkout", "admin"}
    assert report["idle"]["checkout"]["count"] > 0
    runs = report["runs"]
    assert [(r["operation"], r["setting"]) for r in runs] == [
        (name, setting)
        for name in live.OPERATIONS
        for setting in ("raw", "default", "volume", "50")
    ]
    for r in runs:
        assert r["rows"] == report["sizes"][r["operation"]]
        assert r["seconds"] > 0 and r["error"] == ""
        assert set(r["live"]) == {"checkout", "admin"}
        assert (r["ratio"] is None) == (r["setting"] == "raw")
        summary = r["live"]["checkout"]
        assert summary["count"] == 0 or summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]

    markdown = paths["md"].read_text()
    assert "## Live shop during bulk work" in markdown
    assert "![Live latency during bulk runs](live.svg)" in markdown
    assert "| checkout p99 during every bulk run (default and volume chunks) | ≤ 50 ms |" in (
        markdown
    )
    assert "| orders at the volume chunk (5,000) ÷ raw orders path | ≥ 0.50x |" in markdown
    assert "\n| views | default (1,000) | " in markdown
    assert "\n| import | volume (3,000) | " in markdown
    assert markdown.count("\n| views | ") == 4
    assert "\n| idle | " in markdown
    root = ET.fromstring(paths["svg"].read_text())
    assert root.tag.endswith("svg")
    assert ">ms (log scale)</text>" in paths["svg"].read_text()
    assert not Product.objects.filter(sku__startswith=SKU_PREFIX).exists()


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_repeat_runs_each_setting_in_turn_and_reports_it_once(tmp_path):
    paths = {name: tmp_path / f"live.{name}" for name in ("md", "json")}
    run(
        *("--operations", "views", "--chunks", "default", "--scale", "0.001"),
        *("--idle-seconds", "0.3", "--repeat", "2"),
        *("--markdown", str(paths["md"]), "--json", str(paths["json"])),
    )

    report = json.loads(paths["json"].read_text())
    assert [(r["setting"], r["runs"]) for r in report["runs"]] == [("raw", 2), ("default", 2)]
    assert report["problems"] == []
    markdown = paths["md"].read_text()
    assert "--repeat 2`" in markdown
    assert "Each setting ran 2 times" in markdown
    assert markdown.count("\n| views | ") == 2
