"""``manage.py purge_history``: old finished history goes, in batches; what a resume needs stays."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tasks_db.models import DBTaskResult

from batching.models import BatchProcessingLog
from jobs import tasks
from jobs.control import cancel_job, resume_job
from jobs.models import Job, JobPartition, StagedKey, Status
from jobs.services import submit_job
from products.models import ProductView
from tests.factories import BatchProcessingLogFactory
from tests.test_jobs import catalogue as catalogue_fixture
from tests.test_jobs import product_row, run_all, view_rows
from tests.test_jobs_cancel import on_chunk

pytestmark = pytest.mark.django_db

Operation = BatchProcessingLog.Operation
LogStatus = BatchProcessingLog.Status
catalogue = catalogue_fixture

DAYS = 30  # the setting's default


def days_ago(days: float):
    return timezone.now() - timedelta(days=days)


def age_job(job: Job, days: float) -> None:
    """Make a job, and the logs of its partitions, ``days`` old."""
    when = days_ago(days)
    Job.objects.filter(pk=job.pk).update(
        created_at=when, finished_at=when if job.is_finished else None
    )
    BatchProcessingLog.objects.filter(pk__in=job.partitions.values("log")).update(
        started_at=when, finished_at=when
    )


def finished_job(catalogue, settings, days: float) -> Job:
    settings.JOB_PARTITION_ROWS = 2
    job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 4))
    run_all(job)
    assert job.status == Status.COMPLETED
    age_job(job, days)
    return job


def cancelled_job(catalogue, settings, monkeypatch) -> Job:
    """Partition 0 completed, 1 cancelled after its first chunk, 2 cancelled while queued."""
    settings.JOB_PARTITION_ROWS = 4
    settings.BULK_VOLUME_CHUNK_SIZE = 2
    rows = [row | {"session_id": f"kept-{i}"} for i, row in enumerate(view_rows(catalogue, 12))]
    job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=rows)
    first, second, _ = job.partitions.order_by("number")
    tasks.run_partition.call(first.pk)
    on_chunk(monkeypatch, tasks.partition_operation(job.operation), 1, lambda: cancel_job(job.pk))
    tasks.run_partition.call(second.pk)
    monkeypatch.undo()
    job.refresh_from_db()
    assert job.status == Status.CANCELLED
    assert [p.log.status if p.log else None for p in job.progress_partitions()] == [
        LogStatus.COMPLETED,
        LogStatus.CANCELLED,
        None,
    ]
    age_job(job, DAYS + 10)
    return job


def log(status: str, days: float) -> BatchProcessingLog:
    when = days_ago(days)
    return BatchProcessingLogFactory(status=status, started_at=when, finished_at=when)


def task_result(status: str | None, days: float) -> DBTaskResult:
    """A task result enqueued ``days`` ago, finished then with ``status`` (None: still queued)."""
    tasks.run_partition.enqueue(0)
    result = DBTaskResult.objects.order_by("-enqueued_at").first()
    if status is not None:
        DBTaskResult.objects.filter(pk=result.pk).update(status=status, finished_at=days_ago(days))
    return result


def purge(*args: str) -> str:
    out = StringIO()
    call_command("purge_history", *args, stdout=out)
    return out.getvalue()


def report(
    partitions: int, jobs: int, logs: int, results: int, *, keys=0, verb="deleted", days=DAYS
):
    # A finished partition has deleted its staged records already: none are left to purge.
    return "".join(
        f"{name}: {verb} {rows:,} older than {days} days\n"
        for name, rows in (
            ("staged input records", 0),
            ("staged input keys", keys),
            ("job partitions", partitions),
            ("jobs", jobs),
            ("batch logs", logs),
            ("task results", results),
        )
    )


class TestWhatGoesAndWhatStays:
    def test_old_finished_history_goes_and_what_a_resume_needs_stays(
        self, catalogue, settings, monkeypatch
    ):
        old_job = finished_job(catalogue, settings, DAYS + 10)
        old_job_logs = set(old_job.partitions.values_list("log", flat=True))
        recent_job = finished_job(catalogue, settings, DAYS - 5)
        kept_job = cancelled_job(catalogue, settings, monkeypatch)
        kept_job_logs = set(kept_job.partitions.exclude(log=None).values_list("log", flat=True))
        gone_logs = {log(LogStatus.COMPLETED, DAYS + 1).pk, log(LogStatus.PARTIAL, DAYS + 1).pk}
        kept_logs = {
            log(LogStatus.COMPLETED, DAYS - 1).pk,  # recent
            # Resumable with --resume, however old; running: still going.
            *(
                log(status, DAYS + 100).pk
                for status in (
                    LogStatus.FAILED,
                    LogStatus.INTERRUPTED,
                    LogStatus.CANCELLED,
                    LogStatus.RUNNING,
                )
            ),
        }
        DBTaskResult.objects.all().delete()  # the ones enqueued above
        gone_results = {
            task_result("SUCCESSFUL", DAYS + 1).pk,
            task_result("FAILED", DAYS + 1).pk,
        }
        kept_results = {task_result("SUCCESSFUL", DAYS - 1).pk, task_result(None, DAYS + 1).pk}

        assert purge() == report(2, 1, 4, 2)

        assert set(Job.objects.values_list("pk", flat=True)) == {recent_job.pk, kept_job.pk}
        assert not JobPartition.objects.filter(job=old_job.pk).exists()
        assert JobPartition.objects.filter(job=kept_job.pk).count() == 3
        remaining = set(BatchProcessingLog.objects.values_list("pk", flat=True))
        assert remaining.isdisjoint(gone_logs | old_job_logs)
        # The cancelled job's logs stay: the completed one too (the job's result sums it).
        assert kept_logs | kept_job_logs <= remaining
        assert set(DBTaskResult.objects.values_list("pk", flat=True)) == kept_results
        assert gone_results.isdisjoint(kept_results)

        # What stayed is what the resume needs: each row of the cancelled job lands once.
        resume_job(kept_job.pk)
        run_all(kept_job)
        assert kept_job.status == Status.COMPLETED
        kept = ProductView.objects.filter(session_id__startswith="kept-")
        assert sorted(kept.values_list("session_id", flat=True)) == sorted(
            f"kept-{i}" for i in range(12)
        )
        data = kept_job.as_dict()
        assert (data["rows_done"], data["result"]["written"]) == (12, 12)

        # A second purge finds nothing more to delete.
        assert purge() == report(0, 0, 0, 0)

    def test_a_failed_job_stays(self, catalogue, settings):
        settings.JOB_PARTITION_ROWS = 2
        job = submit_job(operation=Operation.PRODUCT_VIEWS, rows=view_rows(catalogue, 4))
        claimed, started = tasks.claim_partition(job.partitions.get(number=0).pk)
        BatchProcessingLog.objects.filter(pk=started.pk).update(status=LogStatus.FAILED)
        tasks.finish_partition(claimed, LogStatus.FAILED)
        run_all(job)
        assert job.status == Status.FAILED
        age_job(job, DAYS + 10)

        assert purge() == report(0, 0, 0, 0)
        assert JobPartition.objects.filter(job=job).count() == 2
        assert BatchProcessingLog.objects.count() == 2

    def test_keys_a_finished_job_left_behind_go(self, settings):
        """A job deletes its keys after its end commits; those a failure left go here."""
        settings.JOB_PARTITION_ROWS = 2
        rows = [product_row(f"P-{i}", "n") for i in range(3)]
        job = submit_job(operation=Operation.PRODUCTS, rows=rows)
        run_all(job)  # no commit in this test: the keys stay
        assert (job.status, StagedKey.objects.count()) == (Status.COMPLETED, 3)
        age_job(job, DAYS + 10)
        assert purge() == report(2, 1, 2, 0, keys=3)
        assert not StagedKey.objects.exists()

    def test_the_age_comes_from_the_option_or_the_setting(self, catalogue, settings):
        finished_job(catalogue, settings, DAYS + 10)
        settings.HISTORY_RETENTION_DAYS = DAYS + 20
        assert purge() == report(0, 0, 0, 0, days=DAYS + 20)
        assert purge("--older-than", str(DAYS)) == report(2, 1, 2, 0)

    def test_dry_run_deletes_nothing(self, catalogue, settings):
        finished_job(catalogue, settings, DAYS + 10)
        log(LogStatus.COMPLETED, DAYS + 1)
        before = (JobPartition.objects.count(), Job.objects.count())
        logs = BatchProcessingLog.objects.count()
        assert purge("--dry-run") == report(2, 1, 3, 0, verb="would delete")
        assert (JobPartition.objects.count(), Job.objects.count()) == before
        assert BatchProcessingLog.objects.count() == logs

    def test_bad_ages(self, settings):
        with pytest.raises(CommandError, match="must be at least 1"):
            purge("--older-than", "0")
        settings.HISTORY_RETENTION_DAYS = 0
        with pytest.raises(CommandError, match="HISTORY_RETENTION_DAYS must be at least 1, not 0"):
            purge()


class TestBatches:
    def test_2500_logs_in_three_deletes_each_in_its_own_transaction(
        self, django_assert_num_queries
    ):
        when = days_ago(DAYS + 1)
        BatchProcessingLog.objects.bulk_create(
            BatchProcessingLogFactory.build(started_at=when, finished_at=when) for _ in range(2500)
        )
        kept = log(LogStatus.COMPLETED, DAYS - 1)
        # Staged records and keys, partitions, jobs: one empty SELECT each. Logs: per batch
        # a SELECT of ids, then SAVEPOINT, DELETE, RELEASE (a transaction of its
        # own outside the test's); the short third batch is the last. Task
        # results: one SELECT.
        with (
            django_assert_num_queries(1 + 1 + 1 + 1 + 3 * 4 + 1),
            CaptureQueriesContext(connection) as queries,
        ):
            assert purge("--batch-size", "1000") == report(0, 0, 2500, 0)
        deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
        assert len(deletes) == 3
        assert all("batching_batchprocessinglog" in sql for sql in deletes)
        sequence = [q["sql"].split()[0] for q in queries.captured_queries]
        assert sequence[4:16] == ["SELECT", "SAVEPOINT", "DELETE", "RELEASE"] * 3
        assert list(BatchProcessingLog.objects.values_list("pk", flat=True)) == [kept.pk]

    def test_help(self):
        from django.core.management import load_command_class

        command = load_command_class("jobs", "purge_history")
        text = command.create_parser("manage.py", "purge_history").format_help()
        assert "--older-than DAYS" in text and "--dry-run" in text and "resume" in text
