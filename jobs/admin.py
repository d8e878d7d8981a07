"""Admin for background jobs: read-only, with each job's progress.

Jobs and partitions are written only by ``jobs.services`` and the workers; a
hand edit could double-run or lose a partition, so staff can look, not touch.
The list prefetches the partitions and their logs (never their input rows):
two queries for the page, whatever the number of jobs and partitions.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin
from jobs.models import Job, JobPartition


class JobPartitionInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = JobPartition
    fields = ("number", "start", "size", "status", "progress", "attempts", "worker", "log")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobPartition]:
        return JobPartition.progress_rows()

    @admin.display(description="rows done")
    def progress(self, partition: JobPartition) -> str:
        return f"{partition.rows_done:,} / {partition.size:,}"


@admin.register(Job)
class JobAdmin(DeclaredFiltersMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "operation",
        "status",
        "progress",
        "created_by",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "operation", "created_at")
    list_select_related = ("created_by",)
    date_hierarchy = "created_at"
    fields = (
        "id",
        "operation",
        "status",
        "progress",
        "rows_total",
        "partition_size",
        "created_by",
        "created_at",
        "finished_at",
    )
    readonly_fields = fields
    inlines = [JobPartitionInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        return super().get_queryset(request).with_partitions()

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        done = sum(partition.rows_done for partition in job.progress_partitions())
        percent = 100 * done // job.rows_total if job.rows_total else 100
        return f"{done:,} / {job.rows_total:,} rows ({percent}%)"
