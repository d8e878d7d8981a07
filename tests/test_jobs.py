"""Background jobs: partitions, their runs, take-over of dead workers, progress.

The unit tests call the task functions directly (``task.call``) on both
databases. The worker tests start real worker processes against the test
database, once on each task backend (``manage.py db_worker``, and Celery
workers on RabbitMQ: ``tests/job_workers.py``), on both databases (SQLite's
test database is a file, so the workers share it).
"""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from datetime import timedelta
from functools import partial
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Count
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from batching.engine import DUPLICATE_IN_INPUT
from batching.liveness import NO_HEARTBEAT, WORKER_GONE, parse_worker
from batching.models import BatchProcessingLog
from jobs import services as job_services
from jobs import staging, tasks
from jobs.models import Job, JobPartition, StagedKey, StagedRecord, Status
from jobs.services import (
    NO_WORKER,
    NOTHING_WAITING,
    WORKERS_BUSY,
    check_job,
    discard_held_jobs,
    discard_job,
    hold_job,
    release_job,
    run_held_job,
    submit_job,
    worker_status,
)
from jobs.staging import NUL_IN_ROW, Refused, partition_input
from jobs.tasks import reap_stale_partitions, run_partition
from products.models import Product, ProductView
from products.services import rows as r
from tests import job_workers
from tests.factories import ProductFactory, StaffFactory, UserFactory
from tests.job_workers import Workers
from tests.test_resume import dead_pid

HOST = socket.gethostname()
Operation = BatchProcessingLog.Operation
LogStatus = BatchProcessingLog.Status


@pytest.fixture
def catalogue():
    """Three users and four products the view rows refer to."""
    return UserFactory.create_batch(3), ProductFactory.create_batch(4)


def view_rows(catalogue, count: int) -> list[dict]:
    users, products = catalogue
    return [
        {
            "user_id": users[i % len(users)].pk,
            "product_id": products[i % len(products)].pk,
            "session_id": f"job-{i}",
        }
        for i in range(count)
    ]


def product_row(sku: str, name: str) -> dict:
    return {"sku": sku, "name": name, "category": "C", "price": "1.00", "stock_quantity": 1}


def enqueued(callbacks) -> list[int]:
    """The partitions that on-commit callbacks enqueue (services add callbacks of their own)."""
    return [
        callback.args[0]
        for callback in callbacks
        if isinstance(callback, partial) and callback.func is tasks.enqueue_partition
    ]


def run_all(job: Job) -> None:
    for pk in job.partitions.order_by("number").values_list("pk", flat=True):
        run_partition.call(pk)
    job.refresh_from_db()


def assert_views_exactly_once(count: int) -> None:
    """Every row's view landed once, and every product's counter agrees."""
    sessions = ProductView.objects.values("session_id").annotate(n=Count("id"))
    assert {row["session_id"]: row["n"] for row in sessions} == {
        f"job-{i}": 1 for i in range(count)
    }
    counted = dict(ProductView.objects.values_list("product").annotate(n=Count("id")).order_by())
    for pk, view_count in Product.objects.values_list("pk", "view_count"):
        assert view_count == counted.get(pk, 0)


# -- submitting ----------------------------------------------------------------------


@pytest.mark.django_db
class TestSubmit:
    def test_partitions_and_tasks_after_commit(
        self, catalogue, settings, django_assert_num_queries, django_capture_on_commit_callbacks
    ):
        settings.JOB_PARTITION_ROWS = 4
        rows = view_rows(catalogue, 10)
        user = catalogue[0][0]
        # SAVEPOINT, the job, its rows staged (one COPY or INSERT), the job's
        # total, its partitions (one INSERT), RELEASE.
        with (
            django_capture_on_commit_callbacks() as callbacks,
            django_assert_num_queries(6),
        ):
            job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=iter(rows), created_by=user)
        assert not DBTaskResult.objects.exists()  # nothing is enqueued before the commit
        partitions = list(job.partitions.order_by("number"))
        assert [(p.number, p.start, p.size, list(partition_input(p))) for p in partitions] == [
            (0, 0, 4, rows[0:4]),
            (1, 4, 4, rows[4:8]),
            (2, 8, 2, rows[8:10]),
        ]
        assert {p.status for p in partitions} == {Status.QUEUED}
        assert (job.status, job.rows_total, job.partition_size, job.created_by) == (
            Status.QUEUED,
            10,
            4,
            user,
        )

        assert len(callbacks) == 1
        before = timezone.now()
        # One INSERT per partition's task, and one for the job's watchdog.
        with django_assert_num_queries(3 + 1):
            callbacks[0]()
        enqueued = DBTaskResult.objects.order_by("enqueued_at")
        assert [(t.task_path, t.args_kwargs["args"]) for t in enqueued] == [
            ("jobs.tasks.run_partition", [p.pk]) for p in partitions
        ] + [("jobs.tasks.watch_job", [str(job.pk)])]
        watch = enqueued.last()
        assert watch.run_after >= before + timedelta(seconds=settings.JOB_WATCH_SECONDS)

    def test_partitions_are_one_insert(self, catalogue, settings, django_assert_num_queries):
        settings.JOB_PARTITION_ROWS = 1
        # SAVEPOINT, the job, its rows, its total, 11 partitions in one INSERT, RELEASE.
        with django_assert_num_queries(6):
            job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 11))
        assert job.partitions.count() == 11

    def test_unknown_operation(self):
        with pytest.raises(ValueError, match="unknown operation 'nope': expected one of"):
            submit_job(operation="nope", rows=[{}])
        assert not Job.objects.exists()

    def test_an_empty_job_is_complete_at_once(self, django_capture_on_commit_callbacks):
        with django_capture_on_commit_callbacks() as callbacks:
            job = submit_job(operation=Operation.PRODUCTS, rows=[])
        assert callbacks == []
        data = job.as_dict()
        assert (data["status"], data["rows_total"], data["rows_done"]) == ("completed", 0, 0)
        assert data["result"] == {
            "read": 0,
            "written": 0,
            "created": 0,
            "updated": 0,
            "skipped": 0,
            "errors": [],
            "log_ids": [],
        }
        assert data["finished_at"] is not None

    def test_an_anonymous_user_is_no_creator(self):
        from django.contrib.auth.models import AnonymousUser

        job = submit_job(operation=Operation.PRODUCTS, rows=[], created_by=AnonymousUser())
        assert job.created_by is None


# -- running partitions ------------------------------------------------------------------


@pytest.mark.django_db
class TestRun:
    def test_partitions_sum_to_the_job(self, catalogue, settings):
        settings.JOB_PARTITION_ROWS = 4
        rows = view_rows(catalogue, 10)
        rows[5] = {"user_id": "x"}
        rows[9]["product_id"] = 999_999
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=rows)
        assert job.as_dict()["rows_done"] == 0

        run_partition.call(job.partitions.get(number=0).pk)
        job.refresh_from_db()
        data = job.as_dict()
        assert (data["status"], data["rows_done"], data["result"]) == ("running", 4, None)

        run_partition.call(job.partitions.get(number=2).pk)
        run_partition.call(job.partitions.get(number=1).pk)
        job.refresh_from_db()
        logs = [p.log for p in job.partitions.order_by("number").select_related("log")]
        data = job.as_dict()
        assert data == {
            "id": str(job.pk),
            "operation": "product_views",
            "status": "partial",
            "rows_done": 10,
            "rows_total": 10,
            "result": {
                "read": 10,
                "written": 8,
                "created": 8,
                "updated": 0,
                "skipped": 2,
                "errors": [
                    {"index": 5, "field": "user_id", "message": r.NOT_INTEGER, "code": "invalid"},
                    {
                        "index": 9,
                        "field": "product_id",
                        "message": r.UNKNOWN_PRODUCT.format(id=999_999),
                        "code": "not_found",
                    },
                ],
                "log_ids": [log.pk for log in logs],
            },
            "created_at": job.created_at.isoformat(),
            "finished_at": job.finished_at.isoformat(),
        }
        assert [p.status for p in job.partitions.order_by("number")] == [
            Status.COMPLETED,
            Status.PARTIAL,
            Status.PARTIAL,
        ]
        # Each partition is one optimized run of its own rows, resumed from checkpoint 0.
        assert [(log.variant, log.rows_read, log.resume_count) for log in logs] == [
            ("optimized", 4, 1),
            ("optimized", 4, 1),
            ("optimized", 2, 1),
        ]
        assert ProductView.objects.count() == 8

    @pytest.mark.parametrize("failed", [False, True])
    def test_job_status_from_its_partitions(self, catalogue, settings, failed):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 4))
        if failed:
            # A run that ended failed (its retries exhausted) fails the job.
            first = job.partitions.get(number=0)
            claimed, log = tasks.claim_partition(first.pk)
            BatchProcessingLog.objects.filter(pk=log.pk).update(status=LogStatus.FAILED)
            tasks.finish_partition(claimed, LogStatus.FAILED)
        run_all(job)
        assert job.status == (Status.FAILED if failed else Status.COMPLETED)
        assert job.finished_at is not None
        # A partition that ended completed never runs again: its staged rows go.
        # A failed one keeps them, so it can be resumed.
        staged = StagedRecord.objects.filter(job=job).values_list("number", flat=True)
        assert sorted(staged) == ([0, 1] if failed else [])

    def test_submitting_holds_no_copy_of_the_input(self, catalogue):
        """The submitting process's memory stays flat from 5,000 to 25,000 rows:
        rows are staged as they are read, and partitions name ranges of them."""
        users, products = catalogue

        def rows(count):
            for i in range(count):
                yield {
                    "user_id": users[i % 3].pk,
                    "product_id": products[i % 4].pk,
                    "session_id": f"memory-{i}",
                }

        def peak(count: int) -> int:
            tracemalloc.start()
            try:
                job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=rows(count))
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
                assert job.rows_total == count

        small, large = peak(5_000), peak(25_000)
        assert large < 1.5 * small, (small, large)
        assert StagedRecord.objects.count() == 30_000

    def test_repeated_keys_across_partitions(self, settings):
        """A sku repeated in another partition is a duplicate, as in one run."""
        settings.JOB_PARTITION_ROWS = 3
        rows = [
            {
                "sku": f"S-{i}",
                "name": f"P{i}",
                "category": "C",
                "price": "1.00",
                "stock_quantity": 1,
            }
            for i in range(7)
        ]
        rows[2] = rows[0] | {"name": "second"}  # same partition as its first
        rows[4] = rows[1] | {"name": "third"}  # another partition
        rows[6] = {"sku": ""}  # invalid: its key is not remembered
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        run_all(job)
        errors = job.as_dict()["result"]["errors"]
        assert [(e["index"], e["code"], e["message"]) for e in errors] == [
            (2, "duplicate", DUPLICATE_IN_INPUT.format(field="sku", first=0)),
            (4, "duplicate", DUPLICATE_IN_INPUT.format(field="sku", first=1)),
            (6, "invalid", r.REQUIRED),
        ]
        assert dict(Product.objects.values_list("sku", "name")) == {
            "S-0": "P0",
            "S-1": "P1",
            "S-3": "P3",
            "S-5": "P5",
        }

    def test_staged_rows_read_back_as_given(self):
        """Whatever COPY's text format escapes, and non-ASCII text, round-trips."""
        rows = [
            {"name": "tab\t, back\\slash, line\nbreak, return\r", "n": 1},
            Refused("row", "a refused\tone", "unreadable"),
            {"name": "Café ☕", "list": [1, "two"], "none": None},
            {"name": "plain"},
        ]
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=rows)
        assert list(partition_input(job.partitions.select_related("job").get())) == rows

    def test_repeated_keys_found_whatever_order_the_partitions_run_in(
        self, settings, django_capture_on_commit_callbacks
    ):
        """The last partition runs first: it keys the earlier ones itself, once each."""
        settings.JOB_PARTITION_ROWS = 2
        rows = [product_row(f"S-{i % 3}", f"P{i}") for i in range(6)]  # S-0 S-1 S-2 S-0 S-1 S-2
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        assert not StagedKey.objects.exists()  # staging parses nothing
        last, middle, first = job.partitions.order_by("-number")
        run_partition.call(last.pk)
        assert set(job.partitions.values_list("number", "keyed")) == {
            (0, True),
            (1, True),
            (2, True),
        }
        assert StagedKey.objects.filter(job=job).count() == 6
        run_partition.call(middle.pk)
        with django_capture_on_commit_callbacks(execute=True):
            run_partition.call(first.pk)
        job.refresh_from_db()
        errors = job.as_dict()["result"]["errors"]
        assert [(e["index"], e["message"]) for e in errors] == [
            (3, DUPLICATE_IN_INPUT.format(field="sku", first=0)),
            (4, DUPLICATE_IN_INPUT.format(field="sku", first=1)),
            (5, DUPLICATE_IN_INPUT.format(field="sku", first=2)),
        ]
        assert dict(Product.objects.values_list("sku", "name")) == {
            "S-0": "P0",
            "S-1": "P1",
            "S-2": "P2",
        }
        # The job ended with nothing to resume: its keys and records are gone.
        assert (job.status, StagedKey.objects.count(), StagedRecord.objects.count()) == (
            Status.PARTIAL,
            0,
            0,
        )

    def test_keying_a_partition_is_one_read_and_one_write(
        self, settings, django_assert_num_queries
    ):
        settings.JOB_PARTITION_ROWS = 2
        rows = [product_row(f"K-{i}", "n") for i in range(3)] + [{"sku": ""}]
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        first, second = job.partitions.order_by("number").select_related("job")
        # The earlier partitions not keyed (one SELECT); then per partition:
        # SAVEPOINT, its row FOR UPDATE, its records, its keys (one COPY or
        # INSERT), UPDATE keyed, RELEASE.
        with django_assert_num_queries(1 + 6 + 6):
            assert staging.key_partitions(second) == 2
        first = job.partitions.select_related("job").get(number=0)
        with django_assert_num_queries(1):  # keyed, and nothing before it
            assert staging.key_partitions(first) == 0
        # A row that does not prepare has no key; its run reports why.
        assert sorted(StagedKey.objects.values_list("number", "key")) == [
            (0, '"K-0"'),
            (1, '"K-1"'),
            (2, '"K-2"'),
        ]

    def test_a_keying_failure_fails_the_partition_instead_of_requeueing_it(
        self, settings, monkeypatch
    ):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCTS, rows=[product_row("F-1", "n")] * 3)
        second = job.partitions.get(number=1)

        def broken(*args):
            raise RuntimeError("a bug")

        monkeypatch.setattr(staging, "parse_record", broken)
        with pytest.raises(RuntimeError, match="a bug"):
            run_partition.call(second.pk)
        second.refresh_from_db()
        assert (second.status, second.attempts, second.log.status) == (
            Status.FAILED,
            1,
            LogStatus.FAILED,
        )
        assert second.log.error_summary == tasks.KEYING_FAILED.format(error="RuntimeError('a bug')")

    def test_a_task_delivered_twice_runs_once(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        partition = job.partitions.get()
        assert run_partition.call(partition.pk)["ran"] is True
        assert run_partition.call(partition.pk) == {"partition": partition.pk, "ran": False}
        partition.refresh_from_db()
        assert (partition.attempts, partition.log.resume_count) == (1, 1)
        assert_views_exactly_once(3)

    def test_the_watchdog_watches_again_until_the_job_ends(self, catalogue, settings):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        watches = DBTaskResult.objects.filter(task_path="jobs.tasks.watch_job")
        before = timezone.now()
        tasks.watch_job.call(str(job.pk))
        assert watches.get().run_after >= before + timedelta(seconds=settings.JOB_WATCH_SECONDS)
        run_all(job)
        assert job.status == Status.COMPLETED
        tasks.watch_job.call(str(job.pk))
        assert watches.count() == 1  # a finished job is not watched again

    def test_a_backend_that_cannot_defer_leaves_the_watch_to_the_reapers(self, settings):
        """The immediate backend refuses ``run_after``: no watch is scheduled, nothing fails."""
        settings.TASKS = {
            "default": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}
        }
        assert not tasks.watch_job.get_backend().supports_defer
        tasks.schedule_watch("3f1c1e5e-0000-4000-8000-000000000000")
        assert not DBTaskResult.objects.exists()

    def test_a_partition_runs_in_its_operations_volume_chunks(self, catalogue, settings):
        settings.BULK_VOLUME_CHUNK_SIZE = 4
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        run_partition.call(job.partitions.get().pk)
        log = job.partitions.get().log
        assert (log.status, log.chunk_size, log.chunks_committed) == ("completed", 4, 3)

        settings.BULK_CATALOGUE_CHUNK_SIZE = 3
        rows = [{"sku": "V-1", "name": "n", "category": "c", "price": "1", "stock_quantity": 1}]
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        run_partition.call(job.partitions.get().pk)
        assert job.partitions.get().log.chunk_size == 3

    def test_query_count_of_a_partition(self, catalogue, settings):
        """A fixed overhead around the engine's own count (which its tests pin per chunk)."""
        settings.BULK_VOLUME_CHUNK_SIZE = 4
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        partition = job.partitions.get()
        with CaptureQueriesContext(connection) as queries:
            run_partition.call(partition.pk)
        partition.refresh_from_db()
        assert partition.log.chunks_committed == 3
        # reap: 1 SELECT. claim: SAVEPOINT, partition FOR UPDATE, INSERT log,
        # UPDATE partition, UPDATE job, RELEASE. The log to resume (before the
        # engine counts; its count includes reading the staged rows, one
        # SELECT). finish: SAVEPOINT, UPDATE partition, DELETE its staged
        # rows, job FOR UPDATE, its statuses, UPDATE job, RELEASE. The log's
        # count is recorded by the last checkpoint: the RELEASE of that
        # chunk's savepoint follows it.
        overhead = 1 + 6 + 1 + 7 + 1
        sql = "\n".join(query["sql"] for query in queries.captured_queries)
        assert len(queries) == overhead + partition.log.query_count, sql


# -- held jobs: staged first, then released, run in-process or discarded --------------


@pytest.mark.django_db
class TestHeld:
    def test_a_held_job_is_staged_and_queues_nothing(
        self, catalogue, settings, django_capture_on_commit_callbacks
    ):
        settings.JOB_PARTITION_ROWS = 4
        rows = view_rows(catalogue, 10)
        with django_capture_on_commit_callbacks() as callbacks:
            job = hold_job(operation=Operation.PRODUCT_VIEWS, rows=iter(rows))
        assert (job.status, job.rows_total, callbacks) == (Status.HELD, 10, [])
        assert not job.partitions.exists()
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            release_job(job)
        assert job.status == Status.QUEUED
        assert [(p.start, p.size) for p in job.partitions.all()] == [(0, 4), (4, 4), (8, 2)]
        assert len(callbacks) == 1  # the partitions are enqueued once committed
        with pytest.raises(ValueError, match="is not held"):
            release_job(job)
        run_all(job)
        assert_views_exactly_once(10)

    def test_a_refused_row_is_staged_and_reported_at_its_index(self, catalogue):
        rows = view_rows(catalogue, 3)
        rows[1] = Refused("row", "not valid JSON: oops", "unreadable")
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=rows)
        run_all(job)
        result = job.as_dict()["result"]
        assert (result["created"], result["skipped"]) == (2, 1)
        assert result["errors"] == [
            {"index": 1, "field": "row", "message": "not valid JSON: oops", "code": "unreadable"}
        ]

    def test_a_row_with_a_nul_character_is_staged_refused_with_the_runs_error(self):
        """PostgreSQL's jsonb cannot hold one; the run reports the operation's own error."""
        rows = [
            {"sku": "A\x00", "name": "n", "category": "c", "price": "1", "stock_quantity": 1},
            {"sku": "B", "name": "n", "category": "c", "price": "1", "stock_quantity": 1},
            {"sku": "C", "name": "a \\u0000 b", "category": "c", "price": "1", "stock_quantity": 1},
        ]
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        run_all(job)
        result = job.as_dict()["result"]
        assert (result["created"], result["skipped"]) == (2, 1)
        assert result["errors"] == [
            {"index": 0, "field": "sku", "message": r.NUL_CHARACTER, "code": "invalid"}
        ]
        assert Product.objects.get(sku="C").name == "a \\u0000 b"

    def test_a_nul_character_where_the_operation_reads_nothing_refuses_the_row(self):
        row = {"sku": "A", "name": "n", "category": "c", "price": "1", "stock_quantity": 1}
        rows = [row | {"note": "\x00"}]
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        run_all(job)
        assert job.as_dict()["result"]["errors"] == [
            {"index": 0, "field": "row", "message": NUL_IN_ROW, "code": "invalid"}
        ]
        assert not Product.objects.exists()

    def test_an_empty_held_job_is_complete_once_released(self):
        job = hold_job(operation=Operation.PRODUCT_VIEWS, rows=[])
        release_job(job)
        job.refresh_from_db()
        assert (job.status, job.partitions.count()) == (Status.COMPLETED, 0)
        assert job.finished_at is not None

    def test_only_a_held_job_runs_in_process(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        with pytest.raises(ValueError, match="is not held"):
            run_held_job(job)
        assert not ProductView.objects.exists()

    def test_a_dry_run_of_a_held_job_writes_nothing(self, catalogue, settings):
        settings.BULK_CHUNK_SIZE = 2
        rows = view_rows(catalogue, 5)
        rows[3]["product_id"] = 10**9
        job = hold_job(operation=Operation.PRODUCT_VIEWS, rows=rows)
        checked = check_job(job, rows=4)
        assert (checked.read, checked.created, checked.skipped) == (4, 3, 1)
        assert [error.index for error in checked.errors] == [3]
        assert not ProductView.objects.exists()
        assert not BatchProcessingLog.objects.exists()

    def test_a_held_job_run_in_process_is_then_discarded(self, catalogue):
        job = hold_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        result = run_held_job(job)
        assert (result.created, result.skipped) == (3, 0)
        assert (Job.objects.count(), StagedRecord.objects.count()) == (0, 0)
        assert_views_exactly_once(3)

    def test_a_run_in_process_that_commits_nothing_leaves_the_job_held(
        self, catalogue, monkeypatch
    ):
        job = hold_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))

        def broken(operation, rows):
            raise RuntimeError("the database went away")

        monkeypatch.setattr(job_services, "run_batch", broken)
        with pytest.raises(RuntimeError):
            run_held_job(job)
        assert StagedRecord.objects.filter(job=job).count() == 3
        monkeypatch.undo()
        assert run_held_job(job).created == 3

    def test_held_jobs_are_discarded_when_asked_or_old(self, catalogue):
        kept = hold_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        old = hold_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        dropped = hold_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        submitted = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        Job.objects.filter(pk__in=[old.pk, submitted.pk]).update(
            created_at=timezone.now() - timedelta(days=2)
        )
        assert discard_job(dropped.pk) is True
        assert discard_job(submitted.pk) is False  # never a job that was submitted
        assert discard_held_jobs(older_than=timedelta(days=1)) == 1
        assert set(Job.objects.values_list("pk", flat=True)) == {kept.pk, submitted.pk}
        assert StagedRecord.objects.filter(job=kept).count() == 2


# -- progress in a fixed number of queries ------------------------------------------------


@pytest.mark.django_db
class TestProgressQueries:
    @pytest.mark.parametrize("partitions", [2, 6])
    def test_as_dict_is_one_query(self, catalogue, settings, partitions, django_assert_num_queries):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(
            operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2 * partitions)
        )
        run_all(job)
        job = Job.objects.get(pk=job.pk)
        with django_assert_num_queries(1):
            data = job.as_dict()
        assert data["rows_done"] == 2 * partitions
        assert len(data["result"]["log_ids"]) == partitions

    def test_a_list_of_jobs_is_two_queries(self, catalogue, settings, django_assert_num_queries):
        settings.JOB_PARTITION_ROWS = 2
        for count in (2, 4, 6):
            run_all(submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, count)))
        with django_assert_num_queries(2):
            done = [job.as_dict()["rows_done"] for job in Job.objects.with_partitions()]
        assert done == [6, 4, 2]

    def test_admin_list_and_page(self, catalogue, settings):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 5))
        run_partition.call(job.partitions.get(number=0).pk)
        client = Client()
        client.force_login(StaffFactory())
        listing = client.get(reverse("admin:jobs_job_changelist"))
        assert listing.status_code == 200
        assert "2 / 5 rows (40%)" in listing.content.decode()
        page = client.get(reverse("admin:jobs_job_change", args=[job.pk]))
        assert page.status_code == 200
        assert "2 / 2" in page.content.decode()
        assert client.get(reverse("admin:jobs_job_add")).status_code == 403


# -- take-over ------------------------------------------------------------------------------


def fail_on_chunk(monkeypatch, operation: str, chunk: int, exc: BaseException) -> None:
    """Make the partitions' writes raise ``exc`` on the ``chunk``-th call (1-based)."""
    cls = tasks.partition_operation(operation)
    calls = []

    def failing(original):
        def write(self, rows, run):
            calls.append(1)
            if len(calls) == chunk:
                raise exc
            return original(self, rows, run)

        return write

    monkeypatch.setattr(cls, "write", failing(cls.write))


@pytest.mark.django_db
class TestTakeOver:
    def test_shut_down_worker_requeues_and_resume_lands_rows_once(
        self, catalogue, settings, monkeypatch, django_capture_on_commit_callbacks
    ):
        settings.BULK_VOLUME_CHUNK_SIZE = 3
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        partition = job.partitions.get()
        fail_on_chunk(monkeypatch, Operation.PRODUCT_VIEWS, 3, SystemExit(1))
        with django_capture_on_commit_callbacks() as callbacks, pytest.raises(SystemExit):
            run_partition.call(partition.pk)
        partition.refresh_from_db()
        assert (partition.status, partition.attempts, partition.worker) == (Status.QUEUED, 1, "")
        assert (partition.log.status, partition.log.checkpoint_position) == (
            LogStatus.INTERRUPTED,
            6,
        )
        assert enqueued(callbacks) == [partition.pk]  # the partition is enqueued again
        monkeypatch.undo()

        run_partition.call(partition.pk)
        partition.refresh_from_db()
        assert (partition.status, partition.attempts, partition.log.resume_count) == (
            Status.COMPLETED,
            2,
            2,
        )
        assert_views_exactly_once(10)
        job.refresh_from_db()
        assert job.as_dict()["result"]["created"] == 10

    def test_killed_worker_is_taken_over(
        self, catalogue, settings, monkeypatch, django_capture_on_commit_callbacks
    ):
        """SIGKILL leaves the partition and its log "running" with a dead pid."""
        settings.BULK_VOLUME_CHUNK_SIZE = 3
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        partition = job.partitions.get()
        fail_on_chunk(monkeypatch, Operation.PRODUCT_VIEWS, 2, SystemExit(1))
        with pytest.raises(SystemExit):
            run_partition.call(partition.pk)
        monkeypatch.undo()
        partition.refresh_from_db()
        # What a SIGKILL at that point leaves behind:
        dead = f"{HOST}:{dead_pid()}"
        JobPartition.objects.filter(pk=partition.pk).update(status=Status.RUNNING, worker=dead)
        BatchProcessingLog.objects.filter(pk=partition.log_id).update(
            status=LogStatus.RUNNING, worker=dead
        )
        with django_capture_on_commit_callbacks() as callbacks:
            outcome = run_partition.call(partition.pk)
        # The task reaped its own partition first (and enqueued it again), then ran it.
        assert enqueued(callbacks) == [partition.pk]
        assert outcome == {
            "partition": partition.pk,
            "ran": True,
            "log_id": partition.log_id,
            "status": "completed",
        }
        partition.refresh_from_db()
        assert (partition.attempts, partition.log.resume_count) == (2, 2)
        assert_views_exactly_once(10)

    def test_killed_after_its_run_ended(self, catalogue, django_capture_on_commit_callbacks):
        """The run completed, then the worker died before recording the partition."""
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        partition = job.partitions.get()
        run_partition.call(partition.pk)
        dead = f"{HOST}:{dead_pid()}"
        JobPartition.objects.filter(pk=partition.pk).update(status=Status.RUNNING, worker=dead)
        Job.objects.filter(pk=job.pk).update(status=Status.RUNNING, finished_at=None)
        with django_capture_on_commit_callbacks():
            run_partition.call(partition.pk)
        partition.refresh_from_db()
        job.refresh_from_db()
        assert (partition.status, partition.log.resume_count) == (Status.COMPLETED, 1)
        assert job.status == Status.COMPLETED
        assert_views_exactly_once(3)

    def test_reaper(self, catalogue, settings, django_capture_on_commit_callbacks):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 8))
        parts = list(job.partitions.order_by("number"))
        for part in parts:
            tasks.claim_partition(part.pk)
        parts = list(job.partitions.order_by("number").select_related("log"))
        old = timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS + 1)
        fresh = timezone.now() - timedelta(seconds=settings.JOB_STALE_SECONDS - 5)
        dead = f"{HOST}:{dead_pid()}"
        states = [
            (dead, fresh, fresh),  # dead local pid: taken over at once
            ("elsewhere:1", old, old),  # silent too long
            ("elsewhere:1", old, fresh),  # committed a chunk recently
            (f"{HOST}:{os.getpid()}", old, old),  # alive here... but silent too long
        ]
        for part, (worker, claimed_at, heartbeat_at) in zip(parts, states, strict=True):
            JobPartition.objects.filter(pk=part.pk).update(worker=worker, claimed_at=claimed_at)
            BatchProcessingLog.objects.filter(pk=part.log_id).update(
                status=LogStatus.RUNNING, worker=worker, heartbeat_at=heartbeat_at
            )
        with django_capture_on_commit_callbacks() as callbacks:
            out = StringIO()
            call_command("reap_jobs", stdout=out)
        assert out.getvalue() == "3 partitions re-queued.\n"
        assert enqueued(callbacks) == [parts[0].pk, parts[1].pk, parts[3].pk]
        silent = NO_HEARTBEAT.format(seconds=settings.JOB_STALE_SECONDS)
        assert [
            (p.status, p.log.status, p.log.error_summary)
            for p in job.partitions.order_by("number").select_related("log")
        ] == [
            (Status.QUEUED, LogStatus.INTERRUPTED, WORKER_GONE),
            (Status.QUEUED, LogStatus.INTERRUPTED, silent),
            (Status.RUNNING, LogStatus.RUNNING, parts[2].log.error_summary),
            (Status.QUEUED, LogStatus.INTERRUPTED, silent),
        ]
        assert reap_stale_partitions() == 0

    def test_reap_jobs_rejects_a_non_positive_age(self):
        from django.core.management.base import CommandError

        with pytest.raises(CommandError, match="must be at least 1"):
            call_command("reap_jobs", "--stale-after", "0")


# -- worker status ----------------------------------------------------------------------------


@pytest.mark.django_db
class TestWorkerStatus:
    def test_nothing_waiting(self, django_assert_num_queries):
        with django_assert_num_queries(1):
            assert worker_status() == (True, NOTHING_WAITING)

    def test_fresh_work_waits_for_a_poll(self, catalogue):
        submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        ok, detail = worker_status()
        assert ok
        assert detail.startswith("job work queued")

    def test_old_work_and_no_worker(self, catalogue, settings, django_assert_num_queries):
        settings.JOB_PARTITION_ROWS = 1
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        waited = settings.JOB_STALE_SECONDS + 60
        job.partitions.update(queued_at=timezone.now() - timedelta(seconds=waited))
        with django_assert_num_queries(2):
            assert worker_status() == (
                False,
                NO_WORKER.format(seconds=waited, limit=settings.JOB_STALE_SECONDS),
            )
        # A worker busy with the other partition shows life: ok.
        tasks.claim_partition(job.partitions.get(number=1).pk)
        assert worker_status() == (True, WORKERS_BUSY.format(limit=settings.JOB_STALE_SECONDS))


# -- real workers, on each task backend ------------------------------------------


# The fixture: two worker processes, once per task backend.
workers = job_workers.workers


def wait_for(job: Job, workers: Workers, timeout: float = 40) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_finished:
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job.pk} did not finish:\n{workers.logs()}")


@pytest.mark.django_db(transaction=True)
class TestWorkers:
    """Each test runs twice: on two db_workers, and on two Celery workers."""

    def test_rows_land_exactly_once_across_workers(self, catalogue, settings, workers):
        settings.JOB_PARTITION_ROWS = 500
        rows = 3000
        job = wait_for(
            submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, rows)),
            workers,
        )
        data = job.as_dict()
        assert (data["status"], data["rows_done"], data["rows_total"]) == ("completed", rows, rows)
        assert (data["result"]["created"], data["result"]["skipped"]) == (rows, 0)
        assert len(data["result"]["log_ids"]) == 6
        assert_views_exactly_once(rows)
        # Every partition ran on a started worker (a Celery worker runs them in its
        # pool child); on PostgreSQL both took some. SQLite has one writer at a time
        # and its lock is not fair: the worker writing may take every partition.
        ran_on = set(job.partitions.values_list("log__worker", flat=True))
        owners = {workers.owner(worker).pid for worker in ran_on}
        started = {worker.pid for worker in workers.started}
        if connection.vendor == "postgresql":
            assert owners == started, ran_on
        else:
            assert owners <= started, ran_on

    def test_a_killed_workers_partition_is_taken_over(self, catalogue, settings, workers):
        settings.JOB_PARTITION_ROWS = 2000
        settings.JOB_WATCH_SECONDS = 1  # the job's first watchdog is deferred from here
        rows = 4000  # two partitions of 100 chunks of 20 rows
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, rows))

        deadline = time.monotonic() + 30
        while True:
            victim = (
                JobPartition.objects.filter(
                    job=job,
                    status=Status.RUNNING,
                    log__status=LogStatus.RUNNING,
                    log__checkpoint_position__gt=0,
                )
                .select_related("log")
                .first()
            )
            if victim is not None or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert victim is not None, workers.logs()
        killed = victim.worker
        workers.kill(killed)
        victim.log.refresh_from_db()
        killed_at = victim.log.checkpoint_position
        assert 0 < killed_at < 2000, "the worker was not killed mid-partition"
        assert victim.log.status == LogStatus.RUNNING  # the dead cannot say otherwise

        job = wait_for(job, workers)
        data = job.as_dict()
        assert (data["status"], data["rows_done"]) == ("completed", rows)
        assert data["result"]["created"] == rows
        assert_views_exactly_once(rows)
        victim.refresh_from_db()
        victim.log.refresh_from_db()
        # Resumed by another live worker process: the other db_worker, or a
        # Celery pool child (the killed one's replacement, or the other worker's).
        assert (victim.status, victim.attempts) == (Status.COMPLETED, 2)
        assert victim.worker != killed
        assert workers.owner(victim.worker) is not None
        assert (victim.log.resume_count, victim.log.worker) == (2, victim.worker)
        # The backend's own record of the killed task was no help to the take-over.
        if workers.backend == "db":
            # django-tasks-db's row for it still says RUNNING.
            assert (
                DBTaskResult.objects.filter(
                    task_path="jobs.tasks.run_partition", status="RUNNING"
                ).count()
                == 1
            )
        else:
            # Celery acknowledged the task when it started, and its worker's
            # parent saw the child die: the task is lost to Celery.
            _, pid = parse_worker(killed)
            assert f"pid:{pid} exited with 'signal 9 (SIGKILL)'" in workers.logs()
