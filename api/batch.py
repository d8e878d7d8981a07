"""The flow every batch endpoint shares: read the rows, then run them now or later.

The API refuses only the envelope whole (docs/api.md); the services own every
row's fields.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest
from django.urls import reverse
from ninja import Status

from api.errors import ApiError, body_too_large, row_error
from api.idempotency import failed_after_commit, replay_or_run
from batching.engine import run_batch
from batching.models import BatchProcessingLog
from batching.registry import operation_class
from jobs.services import submit_job
from products.services.rows import NOT_AN_OBJECT

BAD_CONTENT_LENGTH = "the Content-Length header is not a non-negative integer"
NOT_JSON = "the body is not valid JSON: {error}"
NOT_UTF8 = "the body is not UTF-8 text"
JSON_SYNTAX = "invalid JSON: {error} (line {line}, column {column})"
NOT_A_LIST = "the body must be a JSON list of row objects"
ROWS_NOT_OBJECTS = "{count} rows are not JSON objects"
TOO_MANY_ROWS = "{count} rows is more than the limit of {limit} rows per request"
NOTHING_WRITTEN = (
    "batch run #{log_id} wrote nothing: {error}. The shop is busy; send the same batch again "
    "after Retry-After seconds"
)
RETRY_AFTER_SECONDS = 1
MAX_LISTED_ERRORS = 100  # rows listed in one 400 answer

_WHITESPACE = re.compile(r"[ \t\n\r]*")


def read_body(request: HttpRequest) -> bytes:
    """The raw body, refused with 413 before it is read when it is too large."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(400, BAD_CONTENT_LENGTH) from None
    if length < 0:
        raise ApiError(400, BAD_CONTENT_LENGTH)
    if length > settings.API_MAX_BODY_BYTES:
        raise ApiError(413, body_too_large())
    try:
        return request.body
    except RequestDataTooBig:  # DATA_UPLOAD_MAX_MEMORY_SIZE set below the API's limit
        raise ApiError(413, body_too_large()) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _skip_whitespace(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    return match.end() if match else position  # it always matches, perhaps nothing


def syntax_error_row(text: str) -> int | None:
    """The index of the top-level element a JSON syntax error is in, if any: the list
    decoded one element at a time until the failing one."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    position = _skip_whitespace(text, 0)
    if not text.startswith("[", position):
        return None
    index = 0
    while True:
        try:
            _, position = decoder.raw_decode(text, _skip_whitespace(text, position + 1))
        except (ValueError, RecursionError):
            return index
        position = _skip_whitespace(text, position)
        if not text.startswith(",", position):
            return index  # a missing comma or bracket, right after this row
        index += 1


def parse_rows(body: bytes) -> list[dict[str, Any]]:
    """A JSON list of objects, or a 400 naming the row and field at fault."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, NOT_UTF8) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        message = JSON_SYNTAX.format(error=exc.msg, line=exc.lineno, column=exc.colno)
        raise ApiError(400, message, [row_error(syntax_error_row(text), "row", message)]) from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, huge integers, absurd nesting
        message = NOT_JSON.format(error=exc if isinstance(exc, ValueError) else "nested too deeply")
        raise ApiError(400, message, [row_error(syntax_error_row(text), "row", message)]) from None
    if not isinstance(data, list):
        raise ApiError(400, NOT_A_LIST, [row_error(None, "body", NOT_A_LIST)])
    bad = [index for index, row in enumerate(data) if not isinstance(row, dict)]
    if bad:
        errors = [row_error(index, "row", NOT_AN_OBJECT) for index in bad[:MAX_LISTED_ERRORS]]
        raise ApiError(400, ROWS_NOT_OBJECTS.format(count=len(bad)), errors)
    return data


def fingerprint(request: HttpRequest, body: bytes) -> str:
    """What makes two requests the same request, for idempotency."""
    digest = hashlib.sha256()
    query = urlencode(sorted(request.GET.lists()), doseq=True)
    for part in (request.method or "", request.path, query):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\n")
    digest.update(body)
    return digest.hexdigest()


def run_rows(
    request: HttpRequest, operation: str, *, background: bool, idempotency_key: str | None
) -> Status:
    """Read the request's rows and run ``operation`` on them: the status and answer."""
    body = read_body(request)
    rows = parse_rows(body)
    if len(rows) > settings.API_MAX_ROWS:
        raise ApiError(413, TOO_MANY_ROWS.format(count=len(rows), limit=settings.API_MAX_ROWS))
    # A row weighs 1, an order its lines, as in a chunk.
    weight = sum(map(operation_class(operation)().weight, rows))
    later = background or weight > settings.API_SYNC_MAX_ROWS
    user = request.auth  # type: ignore[attr-defined]  # what the endpoint's auth returned

    def run() -> tuple[int, dict[str, Any]]:
        if not later:
            return 200, run_now(operation, rows)
        job = submit_job(operation=operation, rows=rows, created_by=user)
        return 202, {**job.as_dict(), "status_url": reverse("api:job", kwargs={"job_id": job.pk})}

    if idempotency_key:
        status, answer = replay_or_run(
            user=user, key=idempotency_key, request_hash=fingerprint(request, body), run=run
        )
    else:
        status, answer = run()
    return Status(status, answer)


def run_now(operation: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the registered (optimized) operation on ``rows`` in this request.

    A failed run is an error: 503 with ``Retry-After`` when nothing was
    committed (the same batch may be sent again), else the 500 of ``api.idempotency``.
    """
    result = run_batch(operation_class(operation)(), rows)
    if result.status != BatchProcessingLog.Status.FAILED:
        return result.as_dict()
    log = result.log
    if log.checkpoint_position:
        error = ApiError(500, failed_after_commit(log)["detail"])
    else:
        detail = NOTHING_WRITTEN.format(log_id=log.pk, error=log.error_summary)
        error = ApiError(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    error.batch_log = log  # type: ignore[attr-defined]  # see batching.engine.run_log_of
    raise error
