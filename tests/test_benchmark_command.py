"""``test_bulk_performance`` and ``load_sample_data``: figures, fairness, namespace, idempotency.

Sizes stay small except where the issue's budgets are stated for 1000 rows.
No test asserts a time: only query counts, record counts and end states.
"""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone

from batching.models import BatchProcessingLog
from batching.readers import RowStream
from bench import report, writeup
from bench.workloads import STOCK_MARGIN, ImportWorkload, OrdersWorkload, ViewsWorkload, Workload
from bench.writeup import OPERATIONS, WORKLOADS, run_benchmark
from orders.models import Order, OrderItem
from products.models import Category, Product, ProductView, RecommendationScore
from products.services import OptimizedBulkOperationsService
from tests.factories import (
    OrderItemFactory,
    ProductFactory,
    ProductViewFactory,
    RecommendationScoreFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

LOG_OPERATION = {
    "views": BatchProcessingLog.Operation.PRODUCT_VIEWS,
    "scores": BatchProcessingLog.Operation.RECOMMENDATION_SCORES,
    "orders": BatchProcessingLog.Operation.ORDERS,
    "products": BatchProcessingLog.Operation.PRODUCTS,
}
# The budget for views, scores and products at --size 1000: queries in all.
QUERY_BUDGET = 10


def bench(*args: str) -> str:
    out = StringIO()
    call_command("test_bulk_performance", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def bench_json(*args: str) -> list[dict[str, Any]]:
    return json.loads(bench(*args, "--json"))


def by_operation(figures: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["operation"]: entry for entry in figures}


def bench_rows() -> dict[str, int]:
    """How many rows of the benchmark's namespace each table holds."""
    User = get_user_model()
    return {
        "users": User.objects.filter(username__startswith="bench-").count(),
        "categories": Category.objects.filter(name__startswith="Bench ").count(),
        "products": Product.objects.filter(sku__startswith="BENCH-").count(),
        "views": ProductView.objects.filter(product__sku__startswith="BENCH-").count(),
        "scores": RecommendationScore.objects.filter(product__sku__startswith="BENCH-").count(),
        "orders": Order.objects.filter(reference__startswith="BENCH-").count(),
    }


# -- output --------------------------------------------------------------------


def test_table_has_a_row_per_operation_with_its_record_count():
    lines = bench("--size", "20").splitlines()

    assert lines[0].split()[:2] == ["Operation", "Records"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == list(OPERATIONS)
    for cells in rows.values():
        assert cells[1] == "20"
        assert cells[-1].endswith("x")  # the speedup column


def test_one_operation_prints_only_its_row():
    lines = bench("--size", "5", "--operation", "scores").splitlines()

    assert [line.split()[0] for line in lines[2:]] == ["scores"]


def test_sizes_per_operation_run_those_operations_at_those_sizes():
    figures = bench_json("--size", "views=6, orders=2")

    assert [(entry["operation"], entry["records"]) for entry in figures] == [
        ("views", 6),
        ("orders", 2),
    ]


def test_call_command_takes_the_size_as_a_number():
    out = StringIO()
    call_command("test_bulk_performance", size=4, operation="views", json=True, stdout=out)

    assert [entry["records"] for entry in json.loads(out.getvalue())] == [4]


def test_json_has_the_figures_of_each_operation():
    figures = by_operation(bench_json("--size", "20"))

    assert list(figures) == list(OPERATIONS)
    for entry in figures.values():
        assert entry["records"] == 20
        naive, optimized = entry["queries_naive"], entry["queries_optimized"]
        assert naive > optimized > 0
        assert entry["query_reduction_percent"] == pytest.approx((1 - optimized / naive) * 100)
        time_naive, time_optimized = entry["time_naive_seconds"], entry["time_optimized_seconds"]
        assert entry["speedup"] == pytest.approx(time_naive / time_optimized)
        assert entry["time_improvement_percent"] == pytest.approx(
            (1 - time_optimized / time_naive) * 100
        )
        assert entry["states_match"] is True
        assert entry["naive_status"] == entry["optimized_status"] == "completed"


def test_json_figures_are_those_of_the_logs():
    figures = bench_json("--size", "20", "--operation", "views")
    (entry,) = figures

    naive = BatchProcessingLog.objects.get(pk=entry["naive_log_id"])
    optimized = BatchProcessingLog.objects.get(pk=entry["optimized_log_id"])
    assert naive.query_count == entry["queries_naive"]
    assert optimized.query_count == entry["queries_optimized"]
    assert naive.duration_seconds == entry["time_naive_seconds"]
    assert optimized.duration_seconds == entry["time_optimized_seconds"]


def test_markdown_has_command_line_database_date_and_a_row_per_operation():
    output = bench("--size", "10", "--chunk-size", "4", "--markdown")

    assert output.startswith(f"## {writeup.TITLE}: 10 views, 10 scores, 10 orders, 10 products\n")
    assert f"Machine: {report.machine_description()}  " in output
    assert (
        "`python manage.py test_bulk_performance --size 10 --operation all --chunk-size 4 "
        "--seed " in output
    )
    assert f"Database: {connection.vendor}" in output
    assert f"Date: {timezone.now().date().isoformat()}" in output
    table = [line for line in output.splitlines() if line.startswith("|")]
    assert table[0].startswith("| Operation | Records | Queries (naive) | Queries (optimized)")
    assert set(table[1]) <= set("|-: ")
    assert [row.split("|")[1].strip() for row in table[2:]] == list(OPERATIONS)
    assert all(row.split("|")[2].strip() == "10" for row in table[2:])


def test_markdown_states_the_repeat_method_only_when_repeated():
    assert "fastest" not in bench("--size", "3", "--operation", "views", "--markdown")

    output = bench("--size", "3", "--operation", "views", "--markdown", "--repeat", "2")
    assert "--seed 20240601 --repeat 2`" in output
    assert "Each time is the fastest of 2 runs of its service" in output


def test_verbosity_zero_prints_no_table_and_two_prints_progress():
    assert bench("--size", "3", "--operation", "views", "--verbosity", "0") == ""

    output = bench("--size", "3", "--operation", "views", "--verbosity", "2")
    assert "views (naive): 3 written" in output
    assert "views (optimized): 3 written" in output


# -- logs ------------------------------------------------------------------------


def test_each_operation_leaves_one_completed_log_per_variant():
    before = BatchProcessingLog.objects.count()

    figures = by_operation(bench_json("--size", "15", "--chunk-size", "4"))

    assert BatchProcessingLog.objects.count() == before + 2 * len(OPERATIONS)
    for operation, entry in figures.items():
        logs = BatchProcessingLog.objects.filter(
            pk__in=[entry["naive_log_id"], entry["optimized_log_id"]]
        )
        assert sorted(
            logs.values_list("variant", "status", "checkpoint_position", "chunk_size")
        ) == [
            ("naive", "completed", 15, 4),
            ("optimized", "completed", 15, 4),
        ]
        assert set(logs.values_list("operation", flat=True)) == {LOG_OPERATION[operation]}


def test_repeat_runs_each_variant_in_turn_and_reports_its_fastest_run():
    before = BatchProcessingLog.objects.count()

    (entry,) = bench_json("--size", "5", "--operation", "scores", "--repeat", "3")

    logs = BatchProcessingLog.objects.order_by("pk")[before:]
    assert [log.variant for log in logs] == ["naive", "optimized"] * 3
    assert entry["runs"] == 3
    assert entry["states_match"] is True
    for variant in ("naive", "optimized"):
        fastest = min(
            (log for log in logs if log.variant == variant),
            key=lambda log: log.duration_seconds,
        )
        assert entry[f"{variant}_log_id"] == fastest.pk
        assert entry[f"time_{variant}_seconds"] == fastest.duration_seconds


# -- the query budgets ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_products_at_size_1000_stay_within_the_query_budget():
    """Through the command, outside a test transaction: the counts of a real run."""
    (entry,) = bench_json("--size", "1000", "--operation", "products", "--chunk-size", "1000")

    assert entry["records"] == 1000
    assert entry["queries_optimized"] <= QUERY_BUDGET
    assert entry["queries_naive"] >= 3 * 1000  # at least a query per row per step


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("operation", ["views", "scores"])
def test_optimized_views_and_scores_at_size_1000_stay_within_the_query_budget(operation):
    """The optimized run alone (the naive one would only cost time here)."""
    workload = WORKLOADS[operation](1000)
    workload.setup()
    workload.prepare()

    result = workload.run_service(OptimizedBulkOperationsService(), 1000)

    assert result.written == 1000
    assert result.query_count <= QUERY_BUDGET


def test_optimized_orders_queries_do_not_grow_with_the_number_of_orders():
    small = bench_json("--size", "10", "--operation", "orders", "--chunk-size", "1000")[0]
    large = bench_json("--size", "30", "--operation", "orders", "--chunk-size", "1000")[0]

    assert small["queries_optimized"] == large["queries_optimized"]
    assert large["queries_naive"] > small["queries_naive"]


# -- fairness: same input, same start, same end ------------------------------------


def service_input(workload: Workload) -> list[Any]:
    """The input a fresh base state gives the services, ids as usernames and skus."""
    workload.setup()
    workload.prepare()
    if isinstance(workload, ImportWorkload):
        with RowStream(workload.path) as stream:
            return list(stream)
    users = dict(get_user_model().objects.values_list("pk", "username"))
    products = dict(Product.objects.values_list("pk", "sku"))

    def logical(value: Any) -> Any:
        if isinstance(value, list):
            return [logical(item) for item in value]
        if not isinstance(value, dict):
            return value
        numbers = {"user_id": users.get, "product_id": products.get}
        return {key: numbers.get(key, logical)(item) for key, item in value.items()}

    return logical(list(workload.service_input()))


@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_workload_is_deterministic_for_a_seed(operation, tmp_path):
    def rows(seed: int) -> list[Any]:
        return service_input(WORKLOADS[operation](25, seed=seed, work_dir=tmp_path))

    first = rows(1)
    assert len(first) == 25
    assert rows(1) == first
    assert rows(2) != first


def test_rows_map_logical_numbers_onto_the_ids_of_the_base_state():
    workload = ViewsWorkload(40)
    first = service_input(workload)
    first_ids = [(row["user_id"], row["product_id"]) for row in workload.rows()]

    assert service_input(workload) == first  # the same numbers ...
    assert [(row["user_id"], row["product_id"]) for row in workload.rows()] != first_ids  # new ids


def test_scores_are_half_updates_and_half_inserts():
    (entry,) = bench_json("--size", "30", "--operation", "scores")
    log = BatchProcessingLog.objects.get(pk=entry["optimized_log_id"])

    assert (log.rows_created, log.rows_updated) == (15, 15)


def test_products_are_half_updates_and_half_inserts():
    (entry,) = bench_json("--size", "30", "--operation", "products")
    logs = BatchProcessingLog.objects.filter(
        pk__in=[entry["naive_log_id"], entry["optimized_log_id"]]
    )

    assert list(logs.values_list("rows_created", "rows_updated")) == [(15, 15), (15, 15)]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_both_variants_end_in_the_same_state(operation):
    (comparison,) = run_benchmark({operation: 30}, chunk_size=7, keep_data=True)

    # The database now holds what the optimized run left: it must equal what
    # the naive run produced from the same start, read back independently.
    assert WORKLOADS[operation](30).snapshot() == comparison.naive_state
    assert comparison.states_match
    state = comparison.naive_state
    if operation == "views":
        assert sum(count for _, count in state["view_counts"]) == len(state["views"]) == 30
    elif operation == "scores":
        assert len(state["scores"]) == 30
    elif operation == "orders":
        # Stock was the demand plus a margin: every order was applied exactly once.
        assert {stock for _, stock in state["stock"]} == {STOCK_MARGIN}
        assert (len(state["orders"]), len(state["items"])) == (30, 90)
    else:
        assert len(state["products"]) == 30
        assert all(name.endswith("(imported)") for _, name, *_ in state["products"])


def test_the_command_fails_when_the_variants_end_differently(monkeypatch):
    snapshots = iter([{"view_counts": {"BENCH-P-000000": 1}}, {"view_counts": {}}])
    monkeypatch.setattr(OrdersWorkload, "snapshot", lambda self: next(snapshots))

    with pytest.raises(CommandError, match="different states: orders"):
        bench("--size", "3", "--operation", "orders")


def test_the_command_fails_when_a_repeated_run_ends_differently(monkeypatch):
    # Naive and optimized agree in the first turn; the second naive run differs.
    same, other = {"view_counts": {}}, {"view_counts": {"BENCH-P-000000": 1}}
    snapshots = iter([same, same, other, same])
    monkeypatch.setattr(OrdersWorkload, "snapshot", lambda self: next(snapshots))

    with pytest.raises(CommandError, match="different states: orders"):
        bench("--size", "3", "--operation", "orders", "--repeat", "2")


# -- arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "0"], "--size must be at least 1, not 0"),
        (["--size", "-5"], "--size must be at least 1, not -5"),
        (["--chunk-size", "0"], "--chunk-size must be at least 1, not 0"),
        (["--repeat", "0"], "--repeat: must be at least 1, not 0"),
        (["--operation", "refunds"], "invalid choice: 'refunds'"),
        (["--size", "ten"], "--size takes a number or sizes per operation"),
        (["--size", "views=1,refunds=2"], "--size takes a number or sizes per operation"),
        (["--size", "views=x"], "--size takes a number or sizes per operation"),
        (["--size", "views=1,views=2"], "--size takes a number or sizes per operation"),
        (["--size", "views=4,orders=0"], "--size must be at least 1, not 0"),
        (["--size", "views=4", "--operation", "views"], "leave out --operation"),
        (["--json", "--markdown"], "not allowed with argument"),
    ],
)
def test_bad_arguments_raise_command_error(args, message):
    before = BatchProcessingLog.objects.count()

    with pytest.raises(CommandError, match=message):
        bench(*args)

    assert BatchProcessingLog.objects.count() == before


# -- the namespace -----------------------------------------------------------------


def test_data_outside_the_namespace_survives():
    alice = UserFactory(username="alice")
    product = ProductFactory(sku="SKU-KEEP", stock_quantity=7, view_count=3)
    ProductViewFactory(user=alice, product=product)
    RecommendationScoreFactory(user=alice, product=product, algorithm="trending", score=0.25)
    item = OrderItemFactory(order__reference="ORD-KEEP", order__user=alice, product=product)

    bench("--size", "10")

    product.refresh_from_db()
    assert (product.stock_quantity, product.view_count) == (7, 3)
    assert ProductView.objects.filter(user=alice, product=product).count() == 1
    assert RecommendationScore.objects.get(user=alice).score == 0.25
    assert OrderItem.objects.get(pk=item.pk).order.reference == "ORD-KEEP"
    assert set(bench_rows().values()) == {0}  # and the benchmark cleaned up after itself


def test_keep_data_leaves_the_last_optimized_state():
    bench("--size", "12", "--operation", "orders", "--keep-data")

    rows = bench_rows()
    assert rows["orders"] == 12
    assert rows["products"] == 100
    assert rows["users"] == 50


def test_a_rerun_starts_from_a_clean_namespace():
    bench("--size", "12", "--operation", "views", "--keep-data")
    bench("--size", "12", "--operation", "views", "--keep-data")

    assert bench_rows()["views"] == 12
    assert (
        sum(Product.objects.filter(sku__startswith="BENCH-").values_list("view_count", flat=True))
        == 12
    )


# -- load_sample_data ------------------------------------------------------------------


def load_sample(*args: str) -> str:
    out = StringIO()
    call_command("load_sample_data", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def shop_state() -> dict[str, Any]:
    return {
        "users": get_user_model().objects.count(),
        "categories": sorted(Category.objects.values_list("name", flat=True)),
        "products": sorted(
            Product.objects.values_list("sku", "stock_quantity", "view_count", "price")
        ),
        "views": ProductView.objects.count(),
        "scores": sorted(
            RecommendationScore.objects.values_list(
                "user__username", "product__sku", "algorithm", "score"
            )
        ),
        "orders": sorted(Order.objects.values_list("reference", "total")),
        "items": OrderItem.objects.count(),
    }


def test_load_sample_data_loads_a_small_shop():
    output = load_sample("--users", "4", "--products", "6")

    state = shop_state()
    assert state["users"] == 4
    assert len(state["products"]) == 6
    assert state["views"] == 40
    assert len(state["scores"]) == 4 * 5 * 2
    assert len(state["orders"]) == 8
    assert all(total > Decimal("0") for _, total in state["orders"])
    assert sum(view_count for _, _, view_count, _ in state["products"]) == 40
    logs = BatchProcessingLog.objects.filter(variant="optimized")
    loaded = ["products", "product_views", "recommendation_scores", "orders"]
    assert sorted(logs.values_list("operation", "status")) == sorted(
        (operation, "completed") for operation in loaded
    )
    for log in logs:
        assert f"log #{log.pk}" in output


def test_load_sample_data_twice_changes_nothing():
    load_sample("--users", "4", "--products", "6")
    first = shop_state()

    output = load_sample("--users", "4", "--products", "6")

    assert shop_state() == first
    assert "users: 4 sample shoppers (0 new)" in output
    assert "products: all 6 already present" in output
    assert "views: all 40 already loaded" in output
    assert "scores: 0 created, 40 updated" in output
    assert "orders: 0 created, 0 updated, 8 already processed" in output


def test_load_sample_data_rejects_counts_below_one():
    with pytest.raises(CommandError, match="--users must be at least 1, not 0"):
        load_sample("--users", "0")
    with pytest.raises(CommandError, match="--products must be at least 1, not -1"):
        load_sample("--products", "-1")


def test_the_benchmark_leaves_the_sample_shop_alone():
    load_sample("--users", "3", "--products", "4")
    before = shop_state()

    bench("--size", "8")

    assert shop_state() == before
