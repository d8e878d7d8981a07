"""Batch run logs: a filtered, paginated list and one run with its row errors."""

from datetime import UTC, datetime

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from django.utils import timezone
from ninja import Field, Query, Router, Schema
from ninja.pagination import PageNumberPagination, paginate

from api.auth import needs
from api.errors import ApiError, row_error
from api.schemas import ERRORS
from batching.models import BatchProcessingLog

router = Router(tags=["batch logs"])

Log = BatchProcessingLog
MAX_PAGE = 1_000_000
MAX_PAGE_SIZE = 200
OUT_OF_RANGE = "out of range once converted to UTC"


class BatchLogOut(Schema):
    id: int
    operation: Log.Operation
    variant: Log.Variant
    status: Log.Status
    chunk_size: int
    rows_read: int
    rows_written: int
    rows_created: int
    rows_updated: int
    rows_skipped: int
    chunks_committed: int
    chunks_rolled_back: int
    chunks_retried: int
    chunks_rerun: int
    query_count: int
    started_at: datetime
    finished_at: datetime | None
    duration_seconds: float | None
    rows_per_second: float | None
    database_vendor: str
    error_summary: str
    checkpoint_position: int
    resume_count: int
    worker: str


class RowErrorLogged(Schema):
    index: int
    field: str
    message: str
    code: str | None = None


class BatchLogDetailOut(BatchLogOut):
    row_errors: list[RowErrorLogged]


class Pages(PageNumberPagination):
    """ninja's page numbers, bounded so an absurd page is a 400, not a database error."""

    class Input(Schema):
        page: int = Field(1, ge=1, le=MAX_PAGE)
        page_size: int | None = Field(None, ge=1, le=MAX_PAGE_SIZE)


class BatchLogFilters(Schema):
    operation: Log.Operation | None = None
    variant: Log.Variant | None = None
    status: Log.Status | None = None
    since: datetime | None = Field(None, description="runs started at or after this time")


def as_utc(moment: datetime, field: str) -> datetime:
    """An aware UTC time (a time without an offset is taken as UTC), or a 400."""
    if timezone.is_naive(moment):
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ApiError(400, OUT_OF_RANGE, [row_error(None, field, OUT_OF_RANGE)]) from None


VIEW_LOGS = needs("batching.view_batchprocessinglog")


@router.get(
    "/batch-logs",
    auth=VIEW_LOGS,
    response={200: list[BatchLogOut], **ERRORS},
    summary="Batch runs",
)
@paginate(Pages, page_size=50, max_page_size=MAX_PAGE_SIZE)
def batch_logs(request: HttpRequest, filters: Query[BatchLogFilters]):
    """Newest first; two queries: the count and the page (row errors are not loaded)."""
    logs = Log.objects.defer("row_errors")
    chosen = {name: getattr(filters, name) for name in ("operation", "variant", "status")}
    logs = logs.filter(**{name: value for name, value in chosen.items() if value is not None})
    if filters.since is not None:
        logs = logs.filter(started_at__gte=as_utc(filters.since, "query.since"))
    return logs


@router.get(
    "/batch-logs/{log_id}",
    auth=VIEW_LOGS,
    response={200: BatchLogDetailOut, **ERRORS},
    summary="One batch run with its row errors",
)
def batch_log(request: HttpRequest, log_id: int):
    return get_object_or_404(Log, pk=log_id)
