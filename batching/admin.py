"""Admin for bulk runs: a read-only window onto ``BatchProcessingLog``, and its dashboard.

Only the engine writes the log: a row edited by hand would misreport a run and
could break a resume, which trusts ``checkpoint_position``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Field, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from batching.dashboard import MAX_POINTS, build_dashboard
from batching.engine import FIGURES
from batching.models import BatchProcessingLog
from common.admin import DeclaredFiltersMixin, ReadOnlyAdminMixin

# Columns of the row-errors table: the keys of a row_errors entry, and their headers.
ROW_ERROR_KEYS = ("index", "field", "code", "message")
ROW_ERROR_HEADERS = [("Row index",), ("Field",), ("Code",), ("Message",)]
ROW_ERRORS_TABLE = '{}<table class="row-errors"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>'
NO_ROW_ERRORS = "No row errors."
ROW_ERRORS_CAPPED = (
    "Showing the first {shown} of {skipped} skipped rows "
    "(the log keeps at most settings.BULK_LOG_MAX_ROW_ERRORS)."
)

CHUNK_FIELDS = ["chunks_rolled_back", "chunks_retried", "chunks_rerun"]

# The admin index shows a "Reports" module (run dashboard, sales report) above the app list.
admin.site.index_template = "admin/reports_index.html"

DASHBOARD_DEFAULT_DAYS = 30
DASHBOARD_PERIODS = [(1, "24 hours"), (7, "7 days"), (30, "30 days"), (90, "90 days"), (0, "all")]


class DashboardForm(forms.Form):
    """The dashboard's period: runs started in the last ``days`` days, 0 for all runs."""

    days = forms.IntegerField(
        min_value=0, max_value=36_500, required=False, help_text="0 shows every run."
    )


def row_error_cells(entries: list[Any]) -> Iterator[tuple[Any, ...]]:
    """One tuple of cells per entry, in ``ROW_ERROR_KEYS`` order; an entry that is not
    a mapping (``row_errors`` is JSON) goes in the message column as text."""
    for entry in entries:
        if isinstance(entry, Mapping):
            yield tuple(entry.get(key, "") for key in ROW_ERROR_KEYS)
        else:
            yield ("", "", "", entry)


@admin.register(BatchProcessingLog)
class BatchProcessingLogAdmin(DeclaredFiltersMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "operation",
        "variant",
        "status",
        "read",
        "rows_written",
        "rows_skipped",
        "query_count",
        "duration",
        "throughput",
        "database_vendor",
        "started_at",
    ]
    list_display_links = ["id", "operation"]
    # database_vendor lists the vendors seen: one small query; the others are choices.
    list_filter = ["operation", "variant", "status", "database_vendor"]
    date_hierarchy = "started_at"
    # id__exact (not "=id"): a word typed in the box is skipped for the id, not compared.
    search_fields = ["id__exact", "operation", "error_summary", "worker"]
    search_help_text = "Run id, operation, error summary or worker (host:pid)."
    fieldsets = [
        (None, {"fields": ["operation", "variant", "status", "database_vendor", "chunk_size"]}),
        ("Rows", {"fields": [f"rows_{name}" for name in FIGURES]}),
        ("Chunks and queries", {"fields": ["chunks_committed", *CHUNK_FIELDS, "query_count"]}),
        (
            "Checkpoint",
            {"fields": ["checkpoint_position", "resume_count", "worker", "heartbeat_at"]},
        ),
        ("Timings", {"fields": ["started_at", "finished_at", "duration", "throughput"]}),
        ("Errors", {"fields": ["error_summary", "row_errors_table"]}),
    ]
    # Everything is read-only; the computed entries must be listed for the fieldsets.
    readonly_fields = flatten_fieldsets(fieldsets)

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.dashboard_view)
        dashboard = path("dashboard/", view, name="batching_batchprocessinglog_dashboard")
        return [dashboard, *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Charts and tables of a period's runs (``batching.dashboard``); a bad period is a 400."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        form = DashboardForm(request.GET)
        status, dashboard = 400, None
        if form.is_valid():
            days = form.cleaned_data["days"]
            days = DASHBOARD_DEFAULT_DAYS if days is None else days
            dashboard, status = build_dashboard(days=days or None), 200
        context = {
            **self.admin_site.each_context(request),
            "title": "Batch run dashboard",
            "opts": self.opts,
            "form": form,
            "dashboard": dashboard,
            "periods": DASHBOARD_PERIODS,
            "max_points": MAX_POINTS,
        }
        return TemplateResponse(
            request, "admin/batching/batchprocessinglog/dashboard.html", context, status=status
        )

    def get_queryset(self, request: HttpRequest) -> QuerySet[BatchProcessingLog]:
        """Leave the heavy error columns out of the list (search still filters on them)."""
        return super().get_queryset(request).defer("row_errors", "error_summary")

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> BatchProcessingLog | None:
        """``ModelAdmin.get_object`` undeferred: the detail page shows the errors, in one query."""
        queryset = self.get_queryset(request).defer(None)
        field = self.opts.pk if from_field is None else self.opts.get_field(from_field)
        if not isinstance(field, Field):  # a reverse relation holds no value of the row
            return None
        try:
            return queryset.get(**{field.name: field.to_python(object_id)})
        except (BatchProcessingLog.DoesNotExist, ValidationError, ValueError):
            return None

    @admin.display(description="duration", ordering="duration_seconds")
    def duration(self, log: BatchProcessingLog) -> str | None:
        return None if log.duration_seconds is None else f"{log.duration_seconds:.3f} s"

    @admin.display(description="rows read", ordering="checkpoint_position")
    def read(self, log: BatchProcessingLog) -> int:
        return log.rows_read

    @admin.display(description="rows/s", ordering=BatchProcessingLog.throughput())
    def throughput(self, log: BatchProcessingLog) -> str | None:
        return None if log.rows_per_second is None else f"{log.rows_per_second:,.0f}"

    @admin.display(description="row errors")
    def row_errors_table(self, log: BatchProcessingLog) -> SafeString:
        """The first row errors as an HTML table; every cell is escaped (messages quote input)."""
        entries = log.row_errors
        if not entries:
            return format_html("<p>{}</p>", NO_ROW_ERRORS)
        if not isinstance(entries, list):
            return format_html("<pre>{}</pre>", entries)
        note = ""
        if log.rows_skipped > len(entries):
            note = format_html(
                "<p>{}</p>", ROW_ERRORS_CAPPED.format(shown=len(entries), skipped=log.rows_skipped)
            )
        header = format_html_join("", '<th scope="col">{}</th>', ROW_ERROR_HEADERS)
        body = format_html_join(
            "\n", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", row_error_cells(entries)
        )
        return format_html(ROW_ERRORS_TABLE, note, header, body)
