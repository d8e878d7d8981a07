"""``bench_scale``: argument errors, PostgreSQL only, equal end states, well-formed outputs.

No test asserts a time: the figures are checked for presence and shape, the
database for what every strategy left behind.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from batching.engine import BatchResult
from batching.models import BatchProcessingLog
from bench import scale as bench
from bench import workloads
from products.models import Product

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="bench_scale measures COPY and django-pgbulk: PostgreSQL only",
)
SIZE = 200


def run(*args: str) -> str:
    out = StringIO()
    call_command("bench_scale", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "0"], "--sizes must be comma-separated whole numbers of at least 1"),
        (["--sizes", "10,x"], "not '10,x'"),
        (["--sizes", ""], "--sizes must be"),
        (["--workloads", "views,nope"], "unknown workload 'nope' in --workloads"),
        (["--chunk-size", "0"], "--chunk-size must be at least 1, not 0"),
        (["--peer-budget", "0"], "--peer-budget must be more than 0 seconds"),
        (["--repeat", "0"], "--repeat must be at least 1, not 0"),
        (["--strategy", "raw"], "--strategy is only for --one"),
        (["--one", "views"], "--one runs one strategy at one size"),
        (["--one", "views", "--strategy", "raw", "--sizes", "10,20"], "--one runs one"),
        (["--one", "sales", "--strategy", "raw", "--sizes", "10"], "unknown workload 'sales'"),
        (["--work-dir", "/nonexistent/bench"], "--work-dir /nonexistent/bench is not a directory"),
    ],
)
def test_bad_arguments_are_command_errors(args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        run(*args)


@pytest.mark.skipif(connection.vendor == "postgresql", reason="checks the refusal on SQLite")
def test_refuses_sqlite():
    with pytest.raises(CommandError, match="need PostgreSQL; this database is sqlite"):
        run("--sizes", "10", "--workloads", "views", "--in-process")


@postgres_only
def test_unknown_strategy_for_one():
    with pytest.raises(CommandError, match="views has no strategy 'bulk': choose one of"):
        run("--one", "views", "--strategy", "bulk", "--sizes", "10")


def test_each_workload_chunks_at_the_scale_figures_sizes(tmp_path):
    chunks = {
        name: cls(10, work_dir=tmp_path).chunk_size for name, cls in workloads.WORKLOADS.items()
    }
    assert chunks == {
        "views": 50_000,
        "scores": 50_000,
        "updates": 50_000,
        "orders": 50_000,
        "import": 20_000,
    }
    assert workloads.WORKLOADS["views"](10, chunk_size=64, work_dir=tmp_path).chunk_size == 64


def workload(name: str, tmp_path: Path) -> workloads.Workload:
    return workloads.WORKLOADS[name](SIZE, chunk_size=64, work_dir=tmp_path)


@postgres_only
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_every_strategy_leaves_the_same_state(name, tmp_path):
    """Each strategy from a fresh base state; their end states are equal and complete."""
    job = workload(name, tmp_path)
    snapshots = {}
    for strategy in job.strategies:
        job.setup()
        bench.run_strategy(job, strategy.key, measure_memory=False)
        snapshots[strategy.key] = job.snapshot(shared=True)
    first = snapshots[workloads.OPTIMIZED]
    main = next(iter(first))
    assert len(first[main]) == SIZE
    assert {key: snapshot == first for key, snapshot in snapshots.items()} == {
        strategy.key: True for strategy in job.strategies
    }


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_updates_write_the_input_values(tmp_path):
    """The shared end state is the input's, not an agreement on doing nothing."""
    job = workload("updates", tmp_path)
    job.setup()
    bench.run_strategy(job, workloads.RAW, measure_memory=False)
    expected = sorted(
        (row["sku"], Decimal(row["price"]), row["stock_quantity"]) for row in job.rows()
    )
    assert job.snapshot()["products"] == expected
    assert Product.objects.filter(sku__startswith="BENCH-", price=Decimal("10.00")).count() < 5


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_strategy_that_writes_nothing_is_a_problem(monkeypatch, tmp_path):
    monkeypatch.setattr(workloads.ViewsWorkload, "run_django", lambda self: None)
    report = bench.run_scale_bench(["views"], [SIZE], isolate=False, work_dir=tmp_path)
    assert report.problems == [
        f"views at {SIZE} rows: bulk_create left 0 rows, expected {SIZE}",
        f"views at {SIZE} rows: bulk_create ended in a different state than "
        "optimized create_product_views",
    ]
    with pytest.raises(CommandError, match="bulk_create left 0 rows"):
        run("--sizes", str(SIZE), "--workloads", "views", "--in-process", "--verbosity", "0")


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_peers_over_budget_are_not_run(tmp_path):
    report = bench.run_scale_bench(
        ["scores"], [SIZE // 2, SIZE], isolate=False, work_dir=tmp_path, peer_budget=1e-9
    )
    ran = {(m.strategy, m.size) for m in report.measurements if m.seconds is not None}
    assert ran == {
        (key, size) for key in ("optimized", "raw", "pgbulk", "django") for size in [SIZE // 2]
    } | {("optimized", SIZE), ("raw", SIZE)}
    skipped = report.find("scores", workloads.PGBULK, SIZE)
    assert skipped is not None and skipped.note.startswith("not run: ")
    assert "over the 0 s budget per peer run" in skipped.note
    assert report.problems == []
    assert Product.objects.filter(sku__startswith="BENCH-").count() == 0  # namespace removed


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_repeats_take_turns_and_keep_the_fastest_run_within_the_budget(monkeypatch, tmp_path):
    times = iter([3.0, 25.0, 40.0, 1.0, 10.0, 2.0])
    order: list[str] = []

    def timed(workload, key, *, measure_memory):
        workload.prepare()
        workload.run(key)
        order.append(key)
        return bench.Timing(next(times))

    monkeypatch.setattr(bench, "run_strategy", timed)
    job = workload("views", tmp_path)
    report = bench.ScaleReport([SIZE], ["views"], [], [])
    checked: list[str] = []
    keys = (workloads.OPTIMIZED, workloads.RAW, workloads.DJANGO)
    measured = bench.measure(
        job,
        [job.strategy(key) for key in keys],
        isolate=False,
        report=report,
        repeat=3,
        after_first_run=lambda strategy: checked.append(strategy.key),
    )
    fast, slow, slower = (measured[key] for key in keys)
    # Round by round: a first run of 40 s is the only one; 25 + 10 s reach
    # the 30 s budget after two runs; 3 runs for the rest, the fastest counts.
    assert order == [*keys, workloads.OPTIMIZED, workloads.RAW, workloads.OPTIMIZED]
    assert checked == list(keys)
    assert (fast.seconds, fast.runs) == (1.0, 3)
    assert (slow.seconds, slow.runs) == (10.0, 2)
    assert (slower.seconds, slower.runs) == (40.0, 1)
    assert report.problems == []
    assert "| 3 |" in "\n".join(bench.workload_section(report_of(job, fast), "views"))


def report_of(job: workloads.Workload, measurement: bench.Measurement) -> bench.ScaleReport:
    return bench.ScaleReport([job.size], [job.name], [measurement], [])


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_command_writes_well_formed_outputs(tmp_path):
    """Child processes (one per strategy) measure time and memory; files parse."""
    markdown, data = tmp_path / "scale.md", tmp_path / "scale.json"
    chart, memory = tmp_path / "docs" / "throughput.svg", tmp_path / "docs" / "memory.svg"
    out = run(
        "--sizes",
        str(SIZE),
        "--workloads",
        "views,orders",
        "--markdown",
        str(markdown),
        "--json",
        str(data),
        "--chart",
        str(chart),
        "--memory-chart",
        str(memory),
    )
    figures = json.loads(data.read_text())
    assert figures["problems"] == []
    measured = {(m["workload"], m["strategy"]): m for m in figures["measurements"]}
    assert set(measured) == {("views", key) for key in ("optimized", "raw", "pgbulk", "django")} | {
        ("orders", "optimized"),
        ("orders", "naive"),
    }
    for m in measured.values():
        assert m["size"] == SIZE
        assert m["seconds"] > 0
        assert m["rows_per_second"] == pytest.approx(SIZE / m["seconds"])
        assert m["peak_growth_mb"] >= 0
    assert f"views {SIZE:,} raw COPY: " in out

    text = markdown.read_text()
    assert text.startswith("## At scale: ")
    assert "Command: `python manage.py bench_scale --sizes 200 --workloads views,orders" in text
    assert "Database: postgresql (PostgreSQL " in text
    assert "![Throughput by strategy and size](docs/throughput.svg)" in text
    assert "![Peak memory growth by strategy and size](docs/memory.svg)" in text
    assert f"| raw COPY | {SIZE} | " in text
    assert f"| naive process_orders | {SIZE} | " in text
    assert figures["chunk_sizes"] == {"views": 50_000, "orders": 50_000}
    assert "- Chunks of 50,000 rows." in text
    for svg in (chart, memory):
        root = ET.fromstring(svg.read_text())
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert len(root.findall(".//{http://www.w3.org/2000/svg}rect")) >= 6
    assert ">rows/s (log scale)</text>" in chart.read_text()


def test_a_run_that_failed_without_row_errors_is_reported_with_its_cause():
    log = BatchProcessingLog(
        status=BatchProcessingLog.Status.FAILED, error_summary="the server closed the connection"
    )
    result = BatchResult(
        log,
        read=10,
        written=0,
        created=0,
        updated=0,
        skipped=0,
        errors=[],
        query_count=3,
        duration=0.1,
    )

    with pytest.raises(workloads.BenchError, match="views with optimized ended failed: the server"):
        workloads.check_completed("views", workloads.OPTIMIZED, result)


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_bench_submit_reports_and_leaves_no_job(tmp_path):
    from jobs.models import Job, StagedRecord

    out = StringIO()
    call_command(
        "bench_submit", "--sizes", "60", "--work-dir", str(tmp_path), stdout=out, stderr=StringIO()
    )
    (row,) = [line for line in out.getvalue().splitlines() if line.startswith("| 60 |")]
    assert row.count("|") == 9 and row.endswith("MB |")
    assert not Job.objects.exists() and not StagedRecord.objects.exists()


@pytest.mark.skipif(connection.vendor == "postgresql", reason="checks the refusal on SQLite")
def test_bench_submit_refuses_sqlite():
    with pytest.raises(CommandError, match="PostgreSQL only; this database is sqlite"):
        call_command("bench_submit", "--sizes", "10", stdout=StringIO())


@pytest.mark.django_db(transaction=True)
def test_bench_submit_child_stages_the_file_as_one_job_and_names_it(tmp_path):
    from jobs.models import Job, StagedRecord

    path = workloads.ImportWorkload(40, work_dir=tmp_path).input_file()
    out = StringIO()
    call_command("bench_submit", "--child", str(path), stdout=out)
    report = json.loads(out.getvalue())
    job = Job.objects.get()
    assert report["job"] == str(job.pk)
    assert report["seconds"] > 0 and report["growth_mb"] >= 0
    assert job.rows_total == 40 and StagedRecord.objects.filter(job=job).count() == 40


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_bench_workers_runs_the_job_on_real_workers_and_leaves_nothing(tmp_path):
    from jobs.models import Job

    out = StringIO()
    call_command(
        "bench_workers", "--size", "300", "--workers", "1", "--backends", "db",
        "--work-dir", str(tmp_path), stdout=out, stderr=StringIO(),
    )  # fmt: skip
    (row,) = [line for line in out.getvalue().splitlines() if line.startswith("| db | 1 |")]
    assert "| 300 |" in row and row.endswith("% |")
    assert not Job.objects.exists()
    assert not Product.objects.filter(sku__startswith="BENCH-").exists()


def test_bench_workers_refuses_an_unknown_backend():
    with pytest.raises(CommandError, match="--backends must be comma-separated, from db, celery"):
        call_command("bench_workers", "--backends", "rq", stdout=StringIO())
