"""Dead runs are shown as interrupted, and a run killed mid-run resumes exactly.

The kill-and-resume tests run ``manage.py import_products`` in a child process
against the test database, SIGKILL it part-way, and resume the same run, on
both databases (SQLite's test database is a file, which the child shares).

The import is safe to repeat by sku, so it cannot show a chunk applied twice:
views and orders can. ``TestChunkAndCheckpointCommitTogether`` interrupts a
run at the exact points where a chunk and its checkpoint could part (after the
write, at the checkpoint statement, between the halves of a split chunk), on
both databases, and resumes it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection
from django.utils import timezone

from batching import liveness
from batching.liveness import NO_HEARTBEAT, WORKER_GONE, mark_interrupted_runs
from batching.models import BatchProcessingLog
from bench.server import database_url
from orders.models import Order
from products.models import Category, Product, ProductView
from tests.factories import ProductFactory, UserFactory

HOST = socket.gethostname()
Status = BatchProcessingLog.Status


def make_log(**fields) -> BatchProcessingLog:
    now = timezone.now()
    values = {
        "operation": BatchProcessingLog.Operation.PRODUCTS,
        "variant": BatchProcessingLog.Variant.OPTIMIZED,
        "chunk_size": 100,
        "started_at": now,
        "heartbeat_at": now,
        "database_vendor": connection.vendor,
        "worker": f"{HOST}:{os.getpid()}",
    } | fields
    return BatchProcessingLog.objects.create(**values)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


# -- mark_interrupted_runs ---------------------------------------------------------


@pytest.mark.django_db
class TestMarkInterruptedRuns:
    def test_dead_local_worker(self):
        log = make_log(worker=f"{HOST}:{dead_pid()}")
        assert mark_interrupted_runs() == 1
        log.refresh_from_db()
        assert (log.status, log.error_summary) == (Status.INTERRUPTED, WORKER_GONE)

    def test_live_local_worker_stays_running(self):
        log = make_log(worker=f"{HOST}:{os.getpid()}", heartbeat_at=ago(60))
        assert mark_interrupted_runs() == 0
        log.refresh_from_db()
        assert log.status == Status.RUNNING

    @pytest.mark.parametrize("worker", [f"{HOST}:{os.getpid()}", "elsewhere:123", "", "x:0"])
    def test_stale_heartbeat(self, worker):
        fresh = make_log(worker=worker, heartbeat_at=ago(899))
        stale = make_log(worker=worker, heartbeat_at=ago(901))
        assert mark_interrupted_runs() == 1
        fresh.refresh_from_db()
        stale.refresh_from_db()
        assert fresh.status == Status.RUNNING
        assert (stale.status, stale.error_summary) == (
            Status.INTERRUPTED,
            NO_HEARTBEAT.format(seconds=900),
        )

    def test_no_heartbeat_falls_back_to_the_start(self):
        old = make_log(worker="elsewhere:1", heartbeat_at=None, started_at=ago(1000))
        new = make_log(worker="elsewhere:1", heartbeat_at=None, started_at=ago(10))
        assert mark_interrupted_runs() == 1
        assert set(BatchProcessingLog.objects.values_list("pk", "status")) == {
            (old.pk, Status.INTERRUPTED),
            (new.pk, Status.RUNNING),
        }

    def test_stale_after_argument_and_setting(self, settings):
        log = make_log(worker="elsewhere:1", heartbeat_at=ago(120))
        assert mark_interrupted_runs() == 0
        assert mark_interrupted_runs(stale_after=timedelta(seconds=300)) == 0
        settings.BULK_STALE_RUN_SECONDS = 60
        assert mark_interrupted_runs() == 1
        log.refresh_from_db()
        assert log.error_summary == NO_HEARTBEAT.format(seconds=60)

    @pytest.mark.parametrize("status", [Status.COMPLETED, Status.PARTIAL, Status.FAILED])
    def test_finished_runs_are_left_alone(self, status):
        log = make_log(status=status, worker=f"{HOST}:{dead_pid()}", heartbeat_at=ago(10_000))
        assert mark_interrupted_runs() == 0
        log.refresh_from_db()
        assert log.status == status

    def test_one_select_and_one_update_per_reason_and_batch(self, django_assert_num_queries):
        pid = dead_pid()
        now = timezone.now()
        BatchProcessingLog.objects.bulk_create(
            [
                BatchProcessingLog(
                    operation="products",
                    variant="optimized",
                    chunk_size=1,
                    started_at=now,
                    heartbeat_at=now if i % 2 else now - timedelta(hours=1),
                    database_vendor=connection.vendor,
                    worker=f"{HOST}:{pid}" if i % 2 else "elsewhere:1",
                )
                for i in range(2 * liveness.UPDATE_BATCH_SIZE + 2)
            ]
        )
        # One SELECT; dead workers: 501 ids in 2 UPDATEs; stale: 501 in 2.
        with django_assert_num_queries(1 + 2 + 2):
            assert mark_interrupted_runs() == 2 * liveness.UPDATE_BATCH_SIZE + 2
        assert not BatchProcessingLog.objects.filter(status=Status.RUNNING).exists()
        with django_assert_num_queries(1):
            assert mark_interrupted_runs() == 0

    def test_a_run_resumed_meanwhile_is_not_marked(self, monkeypatch):
        """Between the SELECT and the UPDATE a live process took the run over."""
        log = make_log(worker=f"{HOST}:{dead_pid()}")

        def resumed_meanwhile(pid: int) -> bool:
            BatchProcessingLog.objects.filter(pk=log.pk).update(worker=f"{HOST}:{os.getpid()}")
            return False

        monkeypatch.setattr(liveness, "pid_alive", resumed_meanwhile)
        assert mark_interrupted_runs() == 0
        log.refresh_from_db()
        assert log.status == Status.RUNNING

    def test_command(self):
        log = make_log(worker=f"{HOST}:{dead_pid()}", checkpoint_position=1500)
        make_log(worker="elsewhere:1", heartbeat_at=ago(120))
        out = StringIO()
        call_command("mark_interrupted_runs", verbosity=2, stdout=out)
        assert out.getvalue().splitlines() == [
            "1 run marked interrupted.",
            f"  #{log.pk} products (optimized): committed up to row 1,500; {WORKER_GONE}",
        ]
        out = StringIO()
        call_command("mark_interrupted_runs", "--stale-after", "60", stdout=out)
        assert out.getvalue() == "1 run marked interrupted.\n"
        out = StringIO()
        call_command("mark_interrupted_runs", verbosity=0, stdout=out)
        assert out.getvalue() == ""

    def test_command_rejects_a_non_positive_age(self):
        with pytest.raises(CommandError, match="must be at least 1"):
            call_command("mark_interrupted_runs", "--stale-after", "0")


# -- kill and resume ---------------------------------------------------------------

CHUNK_SIZE = 500
STALE = "stale"


def sku(i: int) -> str:
    return f"KR-{i:06d}"


def expected_row(i: int) -> tuple:
    """name, category, price, stock, active of row ``i``, as the file holds them."""
    return (
        f"Product {i}",
        f"Category {i % 40}",
        Decimal(f"{i % 1000}.{i % 100:02d}"),
        i % 250,
        i % 9 != 0,
    )


def csv_bytes(rows: range) -> bytes:
    lines = []
    for i in rows:
        name, category, price, stock, active = expected_row(i)
        lines.append(f"{sku(i)},{name},{category},{price},{stock},{str(active).lower()}\n")
    return "".join(lines).encode()


HEADER = b"sku,name,category,price,stock_quantity,is_active\n"


def seed_existing(count: int, every: int) -> set[int]:
    """Products the import will update: every ``every``-th sku, with stale values."""
    category = Category.objects.create(name="Old")
    seeded = set(range(0, count, every))
    Product.objects.bulk_create(
        Product(sku=sku(i), name=STALE, category=category, price=0, stock_quantity=0)
        for i in seeded
    )
    return seeded


def child_environment() -> dict[str, str]:
    """This environment, with DATABASE_URL pointing at the test database."""
    pool = {"DB_POOL_MIN_SIZE": "1"} if connection.vendor == "postgresql" else {}
    return os.environ | {"DATABASE_URL": database_url(), "PYTHONUNBUFFERED": "1", **pool}


def manage(*args: str) -> list[str]:
    return [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), *args]


def products_log() -> BatchProcessingLog | None:
    return BatchProcessingLog.objects.filter(
        operation=BatchProcessingLog.Operation.PRODUCTS
    ).first()


def import_until_killed(path: Path, *, kill_at: int, timeout: float = 300) -> BatchProcessingLog:
    """Run the import in a child, SIGKILL it once its checkpoint reaches ``kill_at``."""
    child = subprocess.Popen(
        manage("import_products", str(path), "--chunk-size", str(CHUNK_SIZE), "--verbosity", "0"),
        env=child_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    ended_early = False
    try:
        while True:
            log = products_log()
            if log is not None and log.checkpoint_position >= kill_at:
                break
            if child.poll() is not None or time.monotonic() > deadline:
                ended_early = True
                break
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)  # does nothing if it has already ended
        # Reap it: until then its pid still exists (a zombie) and looks alive.
        _, err = child.communicate()
    if ended_early:
        pytest.fail(f"the import ended or stalled before it could be killed:\n{err.decode()}")
    assert child.returncode == -signal.SIGKILL, f"the import was not killed mid-run:\n{err}"
    log.refresh_from_db()
    return log


def check_killed_state(log: BatchProcessingLog, seeded: set[int]) -> None:
    """Exactly the rows before the checkpoint were written: the chunk in flight was not."""
    assert log.status == Status.RUNNING  # the dead process could not say otherwise
    assert log.checkpoint_position % CHUNK_SIZE == 0
    written = set(Product.objects.exclude(name=STALE).values_list("sku", flat=True))
    assert written == {sku(i) for i in range(log.checkpoint_position)}
    updated = sum(1 for i in seeded if i < log.checkpoint_position)
    assert (log.rows_read, log.rows_written) == (log.checkpoint_position,) * 2
    assert (log.rows_created, log.rows_updated) == (log.checkpoint_position - updated, updated)
    assert Product.objects.count() == len(seeded) + log.rows_created


def resume_and_check(path: Path, log: BatchProcessingLog, rows: int, seeded: set[int]) -> None:
    assert mark_interrupted_runs() == 1
    log.refresh_from_db()
    assert (log.status, log.error_summary) == (Status.INTERRUPTED, WORKER_GONE)
    killed_at = log.checkpoint_position

    done = subprocess.run(
        manage("import_products", str(path), "--resume", str(log.pk)),
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stderr
    assert f"Resuming products from {path} as run #{log.pk}" in done.stdout
    assert (
        f"Run #{log.pk} completed: {rows:,} rows read, {rows - len(seeded):,} created, "
        f"{len(seeded):,} updated, 0 skipped." in done.stdout
    )
    assert f"Resumed at row {killed_at:,}: {rows - killed_at:,} rows in" in done.stdout
    log.refresh_from_db()
    assert log.status == Status.COMPLETED
    assert (log.rows_read, log.checkpoint_position, log.rows_written) == (rows, rows, rows)
    assert (log.rows_created, log.rows_updated, log.rows_skipped) == (
        rows - len(seeded),
        len(seeded),
        0,
    )
    assert log.resume_count == 1
    assert log.chunks_committed == -(-rows // CHUNK_SIZE)
    imported = {
        code: tuple(rest)
        for code, *rest in Product.objects.values_list(
            "sku", "name", "category__name", "price", "stock_quantity", "is_active"
        )
    }
    assert imported == {sku(i): expected_row(i) for i in range(rows)}

    with pytest.raises(CommandError, match=f"run #{log.pk} has already finished"):
        call_command("import_products", str(path), resume=log.pk, stdout=StringIO())


@pytest.mark.django_db(transaction=True)
class TestKillAndResume:
    def test_killed_while_reading_a_pipe(self, tmp_path):
        """20,000 rows fed through a named pipe: the child cannot finish before the kill.

        The pipe gets the header and the first 40% of the rows and is held
        open, so the import waits for more input after its last full chunk;
        it is killed once its checkpoint passes a third of the rows. The
        resume reads the same rows from a regular file.
        """
        rows = 20_000
        seeded = seed_existing(rows, every=20)
        path = tmp_path / "products.csv"
        path.write_bytes(HEADER + csv_bytes(range(rows)))
        pipe = tmp_path / "pipe.csv"
        os.mkfifo(pipe)
        killed = threading.Event()

        def feed() -> None:
            try:
                with open(pipe, "wb") as out:
                    out.write(HEADER + csv_bytes(range(rows * 2 // 5)))
                    out.flush()
                    killed.wait(timeout=600)  # closing now would end the input early
            except BrokenPipeError:
                pass  # the child died with input unread

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            log = import_until_killed(pipe, kill_at=rows // 3)
        finally:
            killed.set()
            feeder.join(timeout=10)
        check_killed_state(log, seeded)
        assert rows // 3 <= log.checkpoint_position <= rows * 2 // 5
        resume_and_check(path, log, rows, seeded)

    @pytest.mark.slow
    def test_killed_mid_file(self, tmp_path):
        """60,000 rows from a regular file, killed wherever it is after a third."""
        rows = 60_000
        seeded = seed_existing(rows, every=20)
        path = tmp_path / "products.csv"
        path.write_bytes(HEADER + csv_bytes(range(rows)))
        log = import_until_killed(path, kill_at=rows // 3)
        check_killed_state(log, seeded)
        assert log.checkpoint_position < rows
        resume_and_check(path, log, rows, seeded)


# -- a chunk and its checkpoint commit together ------------------------------------
#
# Views are not safe to repeat: a chunk applied twice adds its views and its
# counters twice, and a chunk skipped loses them. These runs die in the middle
# of a chunk (``KeyboardInterrupt``, as the engine sees Ctrl-C) and are resumed
# with the same input; every view must then be stored once, every counter be
# exact, and the checkpoint left by the dead run must match what it committed.

VIEW_CHUNK = 8
VIEWS = 3 * VIEW_CHUNK
STARTING_VIEWS = 5  # each product's view_count before the run


def views_input() -> list[dict]:
    users = UserFactory.create_batch(2)
    products = ProductFactory.create_batch(3, view_count=STARTING_VIEWS)
    return [
        {
            "user_id": users[n % 2].pk,
            "product_id": products[n % 3].pk,
            "session_id": f"resume-{n:03d}",
        }
        for n in range(VIEWS)
    ]


def assert_views_stored_once(rows: list[dict]) -> None:
    """Each row is one stored view; each counter grew by its product's rows exactly."""
    sessions = list(ProductView.objects.values_list("session_id", flat=True))
    assert sorted(sessions) == sorted(row["session_id"] for row in rows)
    grown = Counter(row["product_id"] for row in rows)
    assert dict(Product.objects.values_list("pk", "view_count")) == {
        pk: STARTING_VIEWS + grown[pk] for pk in Product.objects.values_list("pk", flat=True)
    }


def fail_in_write(monkeypatch, operation, fault) -> list[list[int]]:
    """Replace the operation's write: do the real write, then raise ``fault(indexes)`` if any.

    Returns the input rows of each call, in order.
    """
    calls: list[list[int]] = []
    original = operation.write

    def write(op, rows, run):
        indexes = [row.index for row in rows]
        calls.append(indexes)
        outcome = original(op, rows, run)
        if (error := fault(indexes)) is not None:
            raise error
        return outcome

    monkeypatch.setattr(operation, "write", write)
    return calls


@contextmanager
def killed_at_checkpoint(number: int) -> Iterator[list[int]]:
    """Raise ``KeyboardInterrupt`` from the ``number``-th checkpoint statement of a run.

    The checkpoint is the log row's statement that sets ``checkpoint_position``:
    the last statement of a chunk before its commit (the first chunk's is the
    row's INSERT, for the views and orders that use this). Yields the count so far.
    """
    seen = [0]

    def wrapper(execute, sql, params, many, context):
        if sql.startswith(("UPDATE", "INSERT")) and "checkpoint_position" in sql:
            seen[0] += 1
            if seen[0] == number:
                raise KeyboardInterrupt
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield seen


def interrupted_views_log() -> BatchProcessingLog:
    log = BatchProcessingLog.objects.get(operation=BatchProcessingLog.Operation.PRODUCT_VIEWS)
    assert log.status == Status.INTERRUPTED
    return log


@pytest.mark.django_db(transaction=True)
class TestChunkAndCheckpointCommitTogether:
    def test_killed_after_the_write_of_chunk_2(self, service, monkeypatch):
        """Chunk 2's views are written, then the run dies before its commit."""
        rows = views_input()
        done = {"killed": False}

        def kill_once(indexes: list[int]) -> BaseException | None:
            if indexes[0] == VIEW_CHUNK and not done["killed"]:
                done["killed"] = True
                return KeyboardInterrupt()
            return None

        fail_in_write(monkeypatch, service.views_operation, kill_once)
        with pytest.raises(KeyboardInterrupt):
            service.create_product_views(rows, chunk_size=VIEW_CHUNK)
        log = interrupted_views_log()
        assert (log.checkpoint_position, log.rows_written) == (VIEW_CHUNK, VIEW_CHUNK)
        assert_views_stored_once(rows[:VIEW_CHUNK])

        result = service.create_product_views(rows, resume=log.pk)

        assert (result.status, result.written, result.skipped) == (Status.COMPLETED, VIEWS, 0)
        assert_views_stored_once(rows)

    def test_killed_as_chunk_2_records_its_checkpoint(self, service):
        """The checkpoint statement is the chunk's last before its commit: both or neither."""
        rows = views_input()
        with killed_at_checkpoint(2) as seen, pytest.raises(KeyboardInterrupt):
            service.create_product_views(rows, chunk_size=VIEW_CHUNK)
        assert seen[0] >= 2
        log = interrupted_views_log()
        assert (log.checkpoint_position, log.rows_written) == (VIEW_CHUNK, VIEW_CHUNK)
        assert_views_stored_once(rows[:VIEW_CHUNK])

        result = service.create_product_views(rows, resume=log.pk)

        log.refresh_from_db()
        assert (result.status, result.written, result.skipped) == (Status.COMPLETED, VIEWS, 0)
        assert (log.checkpoint_position, log.rows_written, log.resume_count) == (VIEWS, VIEWS, 1)
        assert_views_stored_once(rows)

    def test_orders_killed_as_chunk_2_records_its_checkpoint(self, service):
        """Orders: a chunk replayed would report its orders as duplicates, not apply them."""
        user = UserFactory()
        products = ProductFactory.create_batch(3, stock_quantity=100)
        rows = [
            {
                "reference": f"RESUME-{n:03d}",
                "user_id": user.pk,
                "items": [{"product_id": products[n % 3].pk, "quantity": 1 + n % 2}],
            }
            for n in range(VIEWS)
        ]
        with killed_at_checkpoint(2), pytest.raises(KeyboardInterrupt):
            service.process_orders(rows, chunk_size=VIEW_CHUNK)
        log = BatchProcessingLog.objects.get(operation=BatchProcessingLog.Operation.ORDERS)
        assert (log.status, log.checkpoint_position) == (Status.INTERRUPTED, VIEW_CHUNK)
        assert Order.objects.count() == log.rows_written == VIEW_CHUNK

        result = service.process_orders(rows, resume=log.pk)

        assert (result.status, result.written, result.skipped) == (Status.COMPLETED, VIEWS, 0)
        assert sorted(Order.objects.values_list("reference", flat=True)) == [
            row["reference"] for row in rows
        ]
        taken = Counter()
        for row in rows:
            taken[row["items"][0]["product_id"]] += row["items"][0]["quantity"]
        assert dict(Product.objects.values_list("pk", "stock_quantity")) == {
            product.pk: 100 - taken[product.pk] for product in products
        }

    def test_killed_between_the_halves_of_a_split_chunk(self, service, monkeypatch):
        """Chunk 2 holds a row the database rejects: the chunk is split in halves.

        Its first half (rows 8-11) commits with its own end as the checkpoint;
        the run dies as the second half (rows 12-15) is written. The checkpoint
        must say 12, not the chunk's end: the resume writes rows 12-15 (row 13
        rejected again) and every other view lands once.
        """
        rows = views_input()
        bad, second_half = VIEW_CHUNK + 5, VIEW_CHUNK + VIEW_CHUNK // 2
        state = {"killed": False}

        def reject_and_kill(indexes: list[int]) -> BaseException | None:
            if indexes[0] == second_half and not state["killed"]:
                state["killed"] = True
                return KeyboardInterrupt()
            if bad in indexes:
                return IntegrityError("rejected: a row only the database refuses")
            return None

        calls = fail_in_write(monkeypatch, service.views_operation, reject_and_kill)
        with pytest.raises(KeyboardInterrupt):
            service.create_product_views(rows, chunk_size=VIEW_CHUNK)
        assert calls[-3:] == [
            list(range(VIEW_CHUNK, 2 * VIEW_CHUNK)),
            list(range(VIEW_CHUNK, second_half)),
            list(range(second_half, 2 * VIEW_CHUNK)),
        ]
        log = interrupted_views_log()
        assert (log.checkpoint_position, log.rows_written) == (second_half, second_half)
        assert_views_stored_once(rows[:second_half])

        result = service.create_product_views(rows, resume=log.pk)

        assert (result.status, result.written, result.skipped) == (Status.PARTIAL, VIEWS - 1, 1)
        assert [(error.index, error.code) for error in result.errors] == [(bad, "database")]
        log.refresh_from_db()
        assert (log.checkpoint_position, log.rows_written, log.rows_skipped) == (
            VIEWS,
            VIEWS - 1,
            1,
        )
        assert_views_stored_once(rows[:bad] + rows[bad + 1 :])
