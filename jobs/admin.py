"""Background jobs' admin: read-only (a hand edit could double-run or lose a partition),
with progress (two queries a page) and cancel and resume actions (``jobs.change_job``)."""

from __future__ import annotations

from typing import cast

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin
from jobs.control import JobNotFound, JobStateError, cancel_job, resume_job
from jobs.models import Job, JobPartition, JobQuerySet


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
    fields = (*list_display[:4], "rows_total", "partition_size", *list_display[4:])
    readonly_fields = fields
    inlines = [JobPartitionInline]
    actions = ["cancel_jobs", "resume_jobs"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Job]:
        # Job's manager makes JobQuerySets; the admin's stubs do not know the model.
        return cast(JobQuerySet, super().get_queryset(request)).with_partitions()

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        done = sum(partition.rows_done for partition in job.progress_partitions())
        percent = 100 * done // job.rows_total if job.rows_total else 100
        return f"{done:,} / {job.rows_total:,} rows ({percent}%)"

    def has_control_permission(self, request: HttpRequest) -> bool:
        """Cancel and resume: the change permission (the form itself stays read-only)."""
        return request.user.has_perm("jobs.change_job")

    @admin.action(description="Cancel the selected jobs", permissions=["control"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._control(request, queryset, cancel_job, "cancelled")

    @admin.action(
        description="Resume the selected cancelled or failed jobs", permissions=["control"]
    )
    def resume_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._control(request, queryset, resume_job, "resumed")

    def _control(self, request: HttpRequest, queryset: QuerySet[Job], action, done: str) -> None:
        """Each job on its own: one job's refusal is reported, the others still go."""
        count = 0
        for pk in queryset.prefetch_related(None).values_list("pk", flat=True):
            try:
                action(pk)
            except (JobNotFound, JobStateError) as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                count += 1
        if count:
            noun = "job" if count == 1 else "jobs"
            self.message_user(request, f"{count} {noun} {done}.", messages.SUCCESS)
