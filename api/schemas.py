"""Response shapes shared by the API's routers (they are the OpenAPI schema)."""

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from ninja import Field, Header, Query, Schema

KEY_HELP = "Replaying a request with the same key returns the first answer."
IdempotencyKey = Annotated[
    str | None,
    Header(None, alias="Idempotency-Key", min_length=1, max_length=255, description=KEY_HELP),
]
BACKGROUND_HELP = (
    "Up to API_SYNC_MAX_ROWS rows (order lines, for orders) run at once and answer "
    "200 with the result; more rows, or background=true, answer 202 with a job and "
    "its status URL."
)
Background = Annotated[bool, Query(description=BACKGROUND_HELP)]


class RowErrorOut(Schema):
    index: int | None = Field(description="0-based row in the request, when one is at fault")
    field: str | None
    message: str


class ErrorOut(Schema):
    detail: str
    errors: list[RowErrorOut] = []


class BatchRowErrorOut(Schema):
    index: int
    field: str
    message: str
    code: str


class BatchResultOut(Schema):
    log_id: int
    operation: str
    variant: str
    status: str
    read: int
    written: int
    created: int
    updated: int
    skipped: int
    errors: list[BatchRowErrorOut]
    query_count: int
    duration: float


class JobOut(Schema):
    id: UUID
    operation: str
    status: str = Field(
        description="queued, running, cancelling, completed, partial, failed or cancelled"
    )
    rows_done: int
    rows_total: int
    result: dict[str, Any] | None = Field(description="the batch result, once finished")
    created_at: datetime
    finished_at: datetime | None


class JobAcceptedOut(JobOut):
    status_url: str


class FailedAfterCommitOut(ErrorOut):
    log_id: int = Field(description="the batch run whose committed chunks stay")


ERRORS = {code: ErrorOut for code in (400, 401, 403, 404, 409, 413, 503)}
# 500: a run that raised after committing some chunks (kept for its Idempotency-Key).
BATCH_RESPONSES = {200: BatchResultOut, 202: JobAcceptedOut, 500: FailedAfterCommitOut, **ERRORS}


def rows_body(description: str, example: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI for a batch body: a JSON list of objects (the flow parses it itself)."""
    schema = {"type": "array", "items": {"type": "object"}}
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "description": description, "content": content}}
