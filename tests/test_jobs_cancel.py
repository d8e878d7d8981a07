"""Stopping a run on request, and cancelling and resuming a background job.

A "concurrent" cancel is made deterministic by running it from inside a
chunk's ``write`` (the hook ``on_chunk``): on the same connection, in the
chunk's transaction, it is exactly what a cancel committed by another process
while that chunk was being written looks like to the chunk's checkpoint
UPDATE. No sleeps, no threads; both databases.
"""

from __future__ import annotations

import time
import uuid
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from batching.engine import CANCELLED_AT, RESUME_FINISHED, ResumeError
from batching.models import BatchProcessingLog
from jobs import tasks
from jobs.control import (
    ALREADY_FINISHED,
    JOB_NOT_FOUND,
    NOT_RESUMABLE,
    JobNotFound,
    JobStateError,
    cancel_job,
    resume_job,
)
from jobs.models import Job, JobPartition, Status
from jobs.services import submit_job
from jobs.tasks import run_partition
from products.models import ProductView
from products.services import OptimizedBulkOperationsService
from tests.factories import StaffFactory, UserFactory
from tests.test_jobs import (
    HOST,
    assert_views_exactly_once,
    enqueued,
    run_all,
    view_rows,
    wait_for,
)
from tests.test_jobs import catalogue as catalogue_fixture
from tests.test_jobs import workers as workers_fixture
from tests.test_resume import dead_pid

Operation = BatchProcessingLog.Operation
LogStatus = BatchProcessingLog.Status
Service = OptimizedBulkOperationsService
catalogue = catalogue_fixture  # three users, four products
workers = workers_fixture  # two worker processes on the test database, once per backend


def on_chunk(monkeypatch, operation: type, number: int, hook) -> list[int]:
    """Call ``hook()`` as the ``number``-th chunk (1-based) is written; return the chunk starts.

    The hook runs after the chunk's rows are written, before its checkpoint.
    """
    starts: list[int] = []
    original = operation.write

    def write(op, rows, run):
        starts.append(rows[0].index)
        outcome = original(op, rows, run)
        if len(starts) == number:
            hook()
        return outcome

    monkeypatch.setattr(operation, "write", write)
    return starts


def stop(log_id: int) -> None:
    BatchProcessingLog.objects.filter(pk=log_id).update(stop_requested=True)


def the_log() -> BatchProcessingLog:
    return BatchProcessingLog.objects.get()


def sessions() -> list[str]:
    return sorted(ProductView.objects.values_list("session_id", flat=True))


def checkpoint_updates(queries) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith("UPDATE") and "checkpoint" in q["sql"]]


# -- the engine: a run stops at a chunk boundary when asked -----------------------------


@pytest.mark.django_db
class TestRunStops:
    def test_the_chunk_commits_and_no_later_chunk_starts(self, catalogue, monkeypatch):
        rows = view_rows(catalogue, 10)
        starts = on_chunk(monkeypatch, Service.views_operation, 2, lambda: stop(the_log().pk))
        result = Service().create_product_views(rows, chunk_size=3)

        log = the_log()
        assert (result.status, result.read, result.written) == (LogStatus.CANCELLED, 6, 6)
        assert starts == [0, 3]
        assert (log.checkpoint_position, log.chunks_committed, log.finished_at is not None) == (
            6,
            2,
            True,
        )
        assert log.error_summary == CANCELLED_AT.format(position=6)
        assert sessions() == sorted(f"job-{i}" for i in range(6))

        # Resuming a cancelled run goes on: its stop request is spent.
        monkeypatch.undo()
        result = Service().create_product_views(rows, resume=log.pk)
        log.refresh_from_db()
        assert (result.status, result.written) == (LogStatus.COMPLETED, 10)
        assert (log.stop_requested, log.resume_count) == (False, 1)
        assert_views_exactly_once(10)

    def test_the_check_costs_no_query_and_a_stop_one(self, catalogue, monkeypatch):
        """Per chunk: the checkpoint UPDATE reads the flag; stopping adds one UPDATE, once."""
        rows = view_rows(catalogue, 10)
        with CaptureQueriesContext(connection) as three_chunks:
            Service().create_product_views(rows[:9], chunk_size=3)
        checkpoints = checkpoint_updates(three_chunks.captured_queries)
        # Chunk 1's checkpoint inserts the log row: no one can have asked a run
        # to stop before it is there. Chunk 2 is a boundary with input after
        # it: its WHERE reads the flag. Chunk 3 is the last: nothing is left to
        # stop, its UPDATE ends the run.
        assert ["stop_requested" in sql.partition("WHERE")[2] for sql in checkpoints] == [
            True,
            False,
        ]
        ProductView.objects.all().delete()
        BatchProcessingLog.objects.all().delete()
        with CaptureQueriesContext(connection) as whole:
            Service().create_product_views(rows[:6], chunk_size=3)
        ProductView.objects.all().delete()
        BatchProcessingLog.objects.all().delete()

        # The hook stands for the canceller: one UPDATE of its own.
        on_chunk(
            monkeypatch,
            Service.views_operation,
            2,
            lambda: BatchProcessingLog.objects.update(stop_requested=True),
        )
        with CaptureQueriesContext(connection) as stopped:
            Service().create_product_views(rows, chunk_size=3)
        # The same two chunks as the 6-row run, the hook's UPDATE, and one more:
        # the checkpoint that matched no row, written again as the run's end.
        assert len(stopped) == len(whole) + 1 + 1
        assert len(checkpoint_updates(stopped.captured_queries)) == 2
        # The log counts the run's statements up to that UPDATE (the test
        # transaction's RELEASE of the chunk's savepoint follows it).
        assert the_log().query_count == len(stopped) - 1

    def test_a_stop_during_the_last_chunk_comes_too_late(self, catalogue, monkeypatch):
        rows = view_rows(catalogue, 6)
        on_chunk(monkeypatch, Service.views_operation, 2, lambda: stop(the_log().pk))
        result = Service().create_product_views(rows, chunk_size=3)
        assert (result.status, result.written) == (LogStatus.COMPLETED, 6)

    def test_resumed_with_a_stop_pending_it_ends_at_once(
        self, catalogue, monkeypatch, django_assert_num_queries
    ):
        """A stop requested while the run was interrupted: the resume writes nothing."""
        rows = view_rows(catalogue, 10)
        on_chunk(monkeypatch, Service.views_operation, 2, lambda: stop(the_log().pk))
        Service().create_product_views(rows, chunk_size=3)
        log = the_log()
        # As a run killed after chunk 2, whose stop was asked meanwhile, leaves it:
        BatchProcessingLog.objects.filter(pk=log.pk).update(status=LogStatus.INTERRUPTED)
        monkeypatch.undo()
        starts = on_chunk(monkeypatch, Service.views_operation, 99, lambda: None)

        # The log to resume, its start, its end.
        with django_assert_num_queries(3):
            result = Service().create_product_views(rows, resume=log.pk)
        log.refresh_from_db()
        assert starts == []
        assert (result.status, log.checkpoint_position, log.stop_requested) == (
            LogStatus.CANCELLED,
            6,
            True,
        )
        assert log.error_summary == CANCELLED_AT.format(position=6)

    def test_a_completed_run_is_not_resumable(self, catalogue):
        result = Service().create_product_views(view_rows(catalogue, 2))
        with pytest.raises(ResumeError, match=RESUME_FINISHED.split("(")[0].format(log_id=".*")):
            Service().create_product_views(view_rows(catalogue, 2), resume=result.log_id)


# -- jobs: cancel at each state -------------------------------------------------------------


def statuses(job: Job) -> list[str]:
    return list(job.partitions.order_by("number").values_list("status", flat=True))


@pytest.mark.django_db
class TestCancel:
    def test_a_queued_job_never_starts(
        self, catalogue, settings, django_assert_num_queries, django_capture_on_commit_callbacks
    ):
        settings.JOB_PARTITION_ROWS = 4
        with django_capture_on_commit_callbacks(execute=True):
            job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        # SAVEPOINT, UPDATE queued partitions, UPDATE running partitions' logs,
        # the job FOR UPDATE, its partitions' statuses, UPDATE job, RELEASE.
        with django_assert_num_queries(7):
            cancelled = cancel_job(job.pk)
        assert cancelled.status == Status.CANCELLED
        job.refresh_from_db()
        assert (job.status, job.finished_at is not None) == (Status.CANCELLED, True)
        assert statuses(job) == [Status.CANCELLED] * 3
        # Their tasks are still in the queue: a worker that takes one does nothing.
        for pk in job.partitions.values_list("pk", flat=True):
            assert run_partition.call(pk) == {"partition": pk, "ran": False}
        assert not ProductView.objects.exists()
        assert not BatchProcessingLog.objects.exists()
        data = job.as_dict()
        assert (data["status"], data["rows_done"], data["result"]["written"]) == ("cancelled", 0, 0)

    def test_a_running_partition_stops_at_its_next_chunk_boundary(
        self, catalogue, settings, monkeypatch, django_capture_on_commit_callbacks
    ):
        settings.JOB_PARTITION_ROWS = 4
        settings.BULK_VOLUME_CHUNK_SIZE = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 10))
        first, second, third = job.partitions.order_by("number")
        run_partition.call(first.pk)

        seen = {}

        def cancel_now():
            seen["job"] = cancel_job(job.pk).status
            seen["partitions"] = statuses(job)

        starts = on_chunk(monkeypatch, tasks.partition_operation(job.operation), 1, cancel_now)
        outcome = run_partition.call(second.pk)

        # While the chunk was being written: the queued partition cancelled,
        # the running one still running, so the job was cancelling.
        assert seen == {
            "job": Status.CANCELLING,
            "partitions": [Status.COMPLETED, Status.RUNNING, Status.CANCELLED],
        }
        assert starts == [0]  # one chunk of partition 1, then it stopped
        assert outcome["status"] == LogStatus.CANCELLED
        job.refresh_from_db()
        assert (job.status, statuses(job)) == (
            Status.CANCELLED,
            [Status.COMPLETED, Status.CANCELLED, Status.CANCELLED],
        )
        second.refresh_from_db()
        assert (second.log.status, second.log.checkpoint_position, second.log.stop_requested) == (
            LogStatus.CANCELLED,
            2,
            True,
        )
        assert run_partition.call(third.pk)["ran"] is False
        assert sessions() == sorted(f"job-{i}" for i in range(6))
        data = job.as_dict()
        assert (data["rows_done"], data["result"]["written"]) == (6, 6)

        # Resume: the cancelled partitions run from their checkpoints, each row once.
        monkeypatch.undo()
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            resumed = resume_job(job.pk)
        assert resumed.status == Status.QUEUED
        assert len(callbacks) == 1
        second.log.refresh_from_db()
        assert (second.log.status, second.log.stop_requested) == (LogStatus.INTERRUPTED, False)
        assert statuses(job) == [Status.COMPLETED, Status.QUEUED, Status.QUEUED]
        run_all(job)
        assert (job.status, job.as_dict()["rows_done"]) == (Status.COMPLETED, 10)
        second.refresh_from_db()
        assert (second.attempts, second.log.resume_count, second.log.rows_written) == (2, 2, 4)
        assert_views_exactly_once(10)

    def test_cancelling_twice_asks_again_and_changes_nothing(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        tasks.claim_partition(job.partitions.get().pk)
        assert cancel_job(job.pk).status == Status.CANCELLING
        assert cancel_job(job.pk).status == Status.CANCELLING
        assert BatchProcessingLog.objects.get().stop_requested is True

    @pytest.mark.parametrize("ended", [Status.COMPLETED, Status.PARTIAL, Status.FAILED])
    def test_a_finished_job_cannot_be_cancelled(self, catalogue, ended):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        run_all(job)
        Job.objects.filter(pk=job.pk).update(status=ended)
        with pytest.raises(JobStateError) as raised:
            cancel_job(job.pk)
        assert str(raised.value) == ALREADY_FINISHED.format(job_id=job.pk, status=ended)
        job.refresh_from_db()
        assert job.status == ended

    def test_a_cancelled_job_cannot_be_cancelled_again(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        cancel_job(job.pk)
        with pytest.raises(JobStateError, match="has already finished \\(cancelled\\)"):
            cancel_job(job.pk)

    def test_no_such_job(self):
        job_id = uuid.uuid4()
        with pytest.raises(JobNotFound, match=JOB_NOT_FOUND.format(job_id=job_id)):
            cancel_job(job_id)
        with pytest.raises(JobNotFound):
            resume_job(job_id)

    def test_a_worker_that_died_while_cancelling(
        self, catalogue, settings, django_capture_on_commit_callbacks
    ):
        """Taken over, the partition's run is resumed with its stop pending: it ends at once."""
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        partition = job.partitions.get()
        tasks.claim_partition(partition.pk)
        dead = f"{HOST}:{dead_pid()}"
        JobPartition.objects.filter(pk=partition.pk).update(worker=dead)
        assert cancel_job(job.pk).status == Status.CANCELLING
        with django_capture_on_commit_callbacks() as callbacks:
            outcome = run_partition.call(partition.pk)  # reaps it first, then runs it
        assert enqueued(callbacks) == [partition.pk]
        assert outcome["status"] == LogStatus.CANCELLED
        job.refresh_from_db()
        assert job.status == Status.CANCELLED
        assert not ProductView.objects.exists()


@pytest.mark.django_db
class TestResume:
    def test_a_failed_job_resumes_its_failed_partitions(self, catalogue, settings):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 4))
        first = job.partitions.get(number=0)
        claimed, log = tasks.claim_partition(first.pk)
        BatchProcessingLog.objects.filter(pk=log.pk).update(status=LogStatus.FAILED)
        tasks.finish_partition(claimed, LogStatus.FAILED)
        run_all(job)
        assert job.status == Status.FAILED

        resume_job(job.pk)
        assert statuses(job) == [Status.QUEUED, Status.COMPLETED]
        run_all(job)
        assert job.status == Status.COMPLETED
        assert_views_exactly_once(4)

    @pytest.mark.parametrize("running", [False, True])
    def test_only_a_cancelled_or_failed_job(self, catalogue, running):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        if running:
            tasks.claim_partition(job.partitions.get().pk)
        job.refresh_from_db()
        with pytest.raises(JobStateError) as raised:
            resume_job(job.pk)
        assert str(raised.value) == NOT_RESUMABLE.format(job_id=job.pk, status=job.status)
        cancel_job(job.pk)
        if running:  # cancelling: its partition has not stopped yet
            with pytest.raises(JobStateError, match="is cancelling"):
                resume_job(job.pk)


# -- the entry points: API, command, admin --------------------------------------------------


@pytest.fixture
def api():
    from api.models import ApiToken

    _, secret = ApiToken.issue(StaffFactory(), name="tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.mark.django_db
class TestApi:
    def test_cancel_then_resume(self, api, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        response = api.post(f"/api/jobs/{job.pk}/cancel")
        assert response.status_code == 200
        assert (response.json()["id"], response.json()["status"]) == (str(job.pk), "cancelled")

        again = api.post(f"/api/jobs/{job.pk}/cancel")
        assert again.status_code == 409
        assert again.json() == {
            "detail": ALREADY_FINISHED.format(job_id=job.pk, status="cancelled"),
            "errors": [],
        }

        resumed = api.post(f"/api/jobs/{job.pk}/resume")
        assert (resumed.status_code, resumed.json()["status"]) == (200, "queued")
        conflict = api.post(f"/api/jobs/{job.pk}/resume")
        assert conflict.status_code == 409
        assert conflict.json()["detail"] == NOT_RESUMABLE.format(job_id=job.pk, status="queued")

    def test_a_finished_job_is_409(self, api, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        run_all(job)
        response = api.post(f"/api/jobs/{job.pk}/cancel")
        assert response.status_code == 409
        assert response.json()["detail"] == ALREADY_FINISHED.format(
            job_id=job.pk, status="completed"
        )

    def test_unknown_job_is_404(self, api):
        job_id = uuid.uuid4()
        for action in ("cancel", "resume"):
            response = api.post(f"/api/jobs/{job_id}/{action}")
            assert response.status_code == 404
            assert response.json()["detail"] == JOB_NOT_FOUND.format(job_id=job_id)


@pytest.mark.django_db
class TestCommands:
    def test_cancel_and_resume(self, catalogue, settings):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 4))
        run_partition.call(job.partitions.get(number=0).pk)
        out = StringIO()
        call_command("cancel_job", str(job.pk), stdout=out)
        assert out.getvalue() == (
            f"Job {job.pk} is cancelled: 2 of 4 rows done. Resume it with resume_job.\n"
        )
        out = StringIO()
        call_command("resume_job", str(job.pk), stdout=out)
        assert out.getvalue() == (
            f"Job {job.pk} queued again: 1 partition(s) resume from their checkpoints.\n"
        )

    def test_cancelling_a_running_job(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        tasks.claim_partition(job.partitions.get().pk)
        out = StringIO()
        call_command("cancel_job", str(job.pk), stdout=out)
        assert out.getvalue().startswith(
            f"Job {job.pk} is cancelling: 1 running partition(s) stop after the chunk"
        )

    def test_errors(self, catalogue):
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 3))
        run_all(job)
        with pytest.raises(CommandError, match=r"has already finished \(completed\)"):
            call_command("cancel_job", str(job.pk))
        with pytest.raises(CommandError, match="is completed: only a cancelled or failed"):
            call_command("resume_job", str(job.pk))
        with pytest.raises(CommandError, match="no job"):
            call_command("cancel_job", str(uuid.uuid4()))
        with pytest.raises(CommandError, match="invalid UUID value: '42'"):
            call_command("cancel_job", "42")

    @pytest.mark.parametrize("name", ["cancel_job", "resume_job"])
    def test_help(self, name):
        from django.core.management import load_command_class

        command = load_command_class("jobs", name)
        text = command.create_parser("manage.py", name).format_help()
        assert "JOB_ID" in text and "checkpoint" in text


@pytest.mark.django_db
class TestAdmin:
    def changelist(self, client, action, *jobs):
        return client.post(
            reverse("admin:jobs_job_changelist"),
            {"action": action, "_selected_action": [str(job.pk) for job in jobs]},
            follow=True,
        )

    def test_cancel_and_resume_actions(self, catalogue):
        queued = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        done = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        run_all(done)
        client = Client()
        client.force_login(StaffFactory())

        page = self.changelist(client, "cancel_jobs", queued, done)
        text = [str(message) for message in page.context["messages"]]
        assert text == [
            ALREADY_FINISHED.format(job_id=done.pk, status="completed"),
            "1 job cancelled.",
        ]
        queued.refresh_from_db()
        assert queued.status == Status.CANCELLED

        page = self.changelist(client, "resume_jobs", queued)
        assert [str(message) for message in page.context["messages"]] == ["1 job resumed."]
        queued.refresh_from_db()
        assert queued.status == Status.QUEUED

    def test_the_actions_need_the_change_permission(self, catalogue):
        from django.contrib.auth.models import Permission

        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 2))
        viewer = UserFactory(is_staff=True)
        viewer.user_permissions.add(Permission.objects.get(codename="view_job"))
        client = Client()
        client.force_login(viewer)
        listing = client.get(reverse("admin:jobs_job_changelist"))
        assert listing.status_code == 200
        assert "cancel_jobs" not in listing.content.decode()
        self.changelist(client, "cancel_jobs", job)
        job.refresh_from_db()
        assert job.status == Status.QUEUED


# -- real workers -------------------------------------------------------------


@pytest.mark.skipif(
    not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
    reason=(
        "PostgreSQL only: SQLite's write lock is not fair, and the cancel can wait "
        "for it until the workers have finished the job"
    ),
)
@pytest.mark.django_db(transaction=True)
class TestWorkers:
    def test_cancel_mid_run_then_resume_lands_every_row_once(self, catalogue, settings, workers):
        """Two workers (chunks of 20 rows), on each backend: cancel, see them stop, resume."""
        settings.JOB_PARTITION_ROWS = 2000
        rows = 8000
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, rows))
        deadline = time.monotonic() + 30
        while not JobPartition.objects.filter(
            job=job, log__status=LogStatus.RUNNING, log__checkpoint_position__gt=0
        ).exists():
            assert time.monotonic() < deadline, workers.logs()
            time.sleep(0.01)

        assert cancel_job(job.pk).status in (Status.CANCELLING, Status.CANCELLED)
        job = wait_for(job, workers)
        assert job.status == Status.CANCELLED
        done = job.as_dict()["rows_done"]
        assert 0 < done < rows
        # Committed chunks stay, and nothing beyond them: the views are the checkpoints'.
        assert ProductView.objects.count() == done
        stopped = BatchProcessingLog.objects.filter(status=LogStatus.CANCELLED)
        assert stopped.exists()
        for log in stopped:
            assert log.checkpoint_position % 20 == 0
            assert log.error_summary == CANCELLED_AT.format(position=log.checkpoint_position)
        assert not JobPartition.objects.filter(job=job, status=Status.QUEUED).exists()

        resume_job(job.pk)
        job = wait_for(job, workers)
        assert job.status == Status.COMPLETED
        assert job.as_dict()["rows_done"] == rows
        assert_views_exactly_once(rows)
