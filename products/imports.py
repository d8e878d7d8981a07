"""Imports uploaded in the admin: stage, preview without writing, confirm.

An upload is stored server-side under ``settings.ADMIN_IMPORT_DIR`` as
``<token><suffix>`` with a JSON sidecar ``<token>.json`` (its kind, its owner,
its preview and, later, its job and result). The token is random and is the
only thing the browser sends back: no client-sent path is ever opened, and a
token is honoured only for the user who uploaded it.

The preview reads the file once with ``RowStream``. Its first
``settings.ADMIN_IMPORT_PREVIEW_ROWS`` rows are validated with the services'
own parsers (``products.services.rows``) and the database is asked what the
run would find, one query per chunk per table (existing skus for products;
users and products for views), so its counts match what the optimized service
will do with those rows, short of rows only the database refuses. The rest of
the file is only inflated and its lines counted: the request stays short and
small whatever the file, and the reader's limits (decompressed size, line
length; see ``products.readers``) refuse a bad file here, as a form error,
rather than half-way through its import.

A confirmed import runs the registered optimized operation in the request up
to ``settings.ADMIN_IMPORT_SYNC_MAX_ROWS`` rows, and as a background job
(``jobs.services.submit_job``) beyond that. Confirming first claims the upload
by creating ``<token>.claim`` exclusively, so of two confirms of one token
(a double click, two tabs) only one runs. The claim is released when a run
fails before committing anything, so the import can be confirmed again; once
any chunk is committed it is kept, and the page shows what the run's log says
(a second confirm would import the committed rows twice).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.http import Http404

from batching.engine import DUPLICATE_IN_INPUT, BatchResult, RowInvalid, run_batch, run_log_of
from batching.models import BatchProcessingLog
from batching.registry import operation_class
from jobs.models import Job
from jobs.services import submit_job
from products.models import Product
from products.readers import BadLine, InputTooLarge, ReaderError, RowStream, detect_format
from products.services import rows as r
from products.services.base import reference_error
from products.services.optimized import existing_product_ids, existing_user_ids

logger = logging.getLogger(__name__)

PRODUCTS = BatchProcessingLog.Operation.PRODUCTS
PRODUCT_VIEWS = BatchProcessingLog.Operation.PRODUCT_VIEWS
KINDS: dict[str, str] = {
    PRODUCTS: "Products (catalogue rows by sku)",
    PRODUCT_VIEWS: "Product views",
}
PREVIEW = "preview"
RUNNING = "running"
DONE = "done"
# Bad lines listed on the preview and on the result page; the rest are counted.
LISTED_ERRORS = 20
RESULT_ERRORS = 200
STALE_SECONDS = 24 * 3600
TOKEN_LENGTH = 43  # secrets.token_urlsafe(32)
TOKEN = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")

TOO_LARGE = "the file is larger than {limit:,} bytes (settings.ADMIN_IMPORT_MAX_BYTES)"
TOO_MANY_ROWS = (
    "the file has {rows:,} rows, more than the {limit:,} an admin import takes "
    "(settings.ADMIN_IMPORT_MAX_ROWS); import it with manage.py import_products"
)
NOT_READABLE = "cannot read the file: {error}"
DAMAGED_GZIP = "cannot read the file: its gzip data is damaged or cut short ({error})"


class ImportFileError(ValueError):
    """The upload cannot be imported as a whole (format, header, size)."""


@dataclass
class BadRow:
    line: int
    field: str
    message: str


@dataclass
class Staged:
    """One upload between its preview and its result; stored as JSON beside the file."""

    token: str
    kind: str
    user_id: int
    original_name: str
    suffix: str
    created: float
    state: str = PREVIEW
    preview: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    result: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return Path(settings.ADMIN_IMPORT_DIR) / f"{self.token}{self.suffix}"

    @property
    def meta_path(self) -> Path:
        return Path(settings.ADMIN_IMPORT_DIR) / f"{self.token}.json"

    @property
    def claim_path(self) -> Path:
        return Path(settings.ADMIN_IMPORT_DIR) / f"{self.token}.claim"

    def save(self) -> None:
        """Replace the sidecar whole, so a concurrent ``load`` never reads half of it."""
        partial = self.meta_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, self.meta_path)

    def claim(self) -> bool:
        """True for exactly one caller, however many confirm at once.

        Creating the claim file is atomic (``O_CREAT | O_EXCL``): a second
        confirm of the same token (a double click, two tabs) finds it and runs
        nothing.
        """
        try:
            with open(self.claim_path, "x"):
                return True
        except FileExistsError:
            return False

    def stream(self) -> RowStream:
        return RowStream(self.path, name=self.original_name)


def stage(upload: UploadedFile, kind: str, user_id: int) -> Staged:
    """Store ``upload`` under a new token and preview it.

    Raises:
        ImportFileError: unknown format, no usable header, too large.
    """
    if upload.size is not None and upload.size > settings.ADMIN_IMPORT_MAX_BYTES:
        raise ImportFileError(TOO_LARGE.format(limit=settings.ADMIN_IMPORT_MAX_BYTES))
    try:
        format, gzipped = detect_format(Path(upload.name or ""))
    except ReaderError as exc:
        raise ImportFileError(str(exc)) from exc
    directory = Path(settings.ADMIN_IMPORT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    sweep(directory)
    staged = Staged(
        token=secrets.token_urlsafe(32),
        kind=kind,
        user_id=user_id,
        original_name=Path(upload.name or "").name[:200],
        suffix=f".{format}" + (".gz" if gzipped else ""),
        created=time.time(),
    )
    try:
        with open(staged.path, "wb") as target:
            for block in upload.chunks():
                target.write(block)
        staged.preview = preview(staged)
        staged.save()
    except BaseException as exc:
        discard(staged)  # whatever went wrong, nothing is left behind
        if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise ImportFileError(DAMAGED_GZIP.format(error=exc)) from exc
        if isinstance(exc, InputTooLarge):
            raise ImportFileError(str(exc)) from exc
        if isinstance(exc, (ReaderError, OSError)):
            raise ImportFileError(NOT_READABLE.format(error=exc)) from exc
        raise
    return staged


def load(token: str, user_id: int) -> Staged:
    """The staged upload of ``token``, if it is this user's; Http404 otherwise."""
    if not TOKEN.fullmatch(token):
        raise Http404("no such import")
    meta = Path(settings.ADMIN_IMPORT_DIR) / f"{token}.json"
    try:
        staged = Staged(**json.loads(meta.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise Http404("no such import") from exc
    if staged.user_id != user_id:
        raise Http404("no such import")
    return staged


def discard(staged: Staged) -> None:
    for path in (staged.path, staged.meta_path, staged.claim_path):
        path.unlink(missing_ok=True)


def sweep(directory: Path) -> None:
    """Remove uploads (and their sidecars) older than a day, unless their import is running.

    A running import's job still reads its file (and its result is written to
    the sidecar when it ends), however long ago the file was uploaded.
    """
    limit = time.time() - STALE_SECONDS
    for path in directory.iterdir():
        try:
            if path.stat().st_mtime >= limit or _is_running(directory, path.name[:TOKEN_LENGTH]):
                continue
            path.unlink(missing_ok=True)
        except OSError:
            continue


def _is_running(directory: Path, token: str) -> bool:
    try:
        return json.loads((directory / f"{token}.json").read_text()).get("state") == RUNNING
    except (OSError, ValueError, AttributeError):
        return False


# -- the preview -------------------------------------------------------------------


def preview(staged: Staged) -> dict[str, Any]:
    """What the import would do, without writing: counts and the first bad lines.

    The counts are those of the first ``ADMIN_IMPORT_PREVIEW_ROWS`` rows
    ("rows"); "rows_total" is exact when the preview read them all
    ("truncated" false), else counted from the line breaks of the rest.
    """
    parse: Callable[[Any], Any] = r.parse_product if staged.kind == PRODUCTS else r.parse_view
    created = updated = 0
    errors: list[BadRow] = []
    error_count = 0
    seen: dict[str, int] = {}

    def reject(line: int, field: str, message: str) -> None:
        nonlocal error_count
        error_count += 1
        if len(errors) < LISTED_ERRORS:
            errors.append(BadRow(line, field, message))

    limit = settings.ADMIN_IMPORT_PREVIEW_ROWS
    with staged.stream() as stream:
        rows = enumerate(islice(stream, limit))
        while chunk := list(islice(rows, settings.BULK_CHUNK_SIZE)):
            good: list[tuple[int, Any]] = []
            for index, raw in chunk:
                try:
                    item = parse(raw)
                except RowInvalid as exc:
                    reject(stream.line_of(index), exc.field, exc.message)
                    continue
                if staged.kind == PRODUCTS:
                    first = seen.setdefault(item.sku, index)
                    if first != index:
                        message = DUPLICATE_IN_INPUT.format(field="sku", first=first)
                        reject(stream.line_of(index), "sku", message)
                        continue
                good.append((index, item))
            if staged.kind == PRODUCTS:
                skus = [item.sku for _, item in good]
                existing = set(
                    Product.objects.filter(sku__in=skus).order_by().values_list("sku", flat=True)
                )
                updated += len(existing)
                created += len(good) - len(existing)
                continue
            users = existing_user_ids("default", (item.user_id for _, item in good))
            products = existing_product_ids("default", (item.product_id for _, item in good))
            for index, item in good:
                if error := reference_error(index, item, users, products):
                    reject(stream.line_of(index), error.field, error.message)
                else:
                    created += 1
        previewed = stream.rows_yielded
        # Fewer rows than the limit: the whole file has been read already.
        rest = stream.count_rest() if previewed == limit else 0
    total = previewed + rest
    if total > settings.ADMIN_IMPORT_MAX_ROWS:
        raise ImportFileError(
            TOO_MANY_ROWS.format(rows=total, limit=settings.ADMIN_IMPORT_MAX_ROWS)
        )
    return {
        "rows": previewed,
        "rows_total": total,
        "truncated": rest > 0,
        "created": created,
        "updated": updated,
        "skipped": error_count,
        "errors": [asdict(error) for error in errors],
        "more_errors": error_count - len(errors),
        "background": total > settings.ADMIN_IMPORT_SYNC_MAX_ROWS,
    }


# -- the run -----------------------------------------------------------------------


def run(staged: Staged, user: Any) -> None:
    """Import the staged file: now if small, else as a background job. Saves ``staged``.

    Only the request that claims the file runs it; any other confirm of the
    same token returns at once, and its page shows the first one's progress
    (the state is "running" from the claim on) and then its result.
    """
    if staged.state != PREVIEW or not staged.claim():
        return
    staged.state = RUNNING
    staged.save()
    try:
        if staged.preview.get("background"):
            start_job(staged, user)
        else:
            with staged.stream() as stream:
                result = run_batch(operation_class(staged.kind)(), stream)
                staged.result = result_of(result, stream.line_of)
            staged.state = DONE
    except BaseException as exc:
        log = run_log_of(exc)
        if log is None or not log.checkpoint_position:
            # Nothing was committed: back to the preview, which can be confirmed again.
            staged.state = PREVIEW
            staged.save()
            staged.claim_path.unlink(missing_ok=True)
            raise
        # Rows were committed: the claim stays, and the page shows the run's log.
        staged.result = logged_result(log)
        staged.state = DONE
        staged.save()
        if not isinstance(exc, Exception):
            raise
        logger.exception("import %s failed after committing rows (run #%s)", staged.token, log.pk)
        return
    staged.save()


def result_of(result: BatchResult, line_of: Callable[[int], int]) -> dict[str, Any]:
    errors = sorted(result.errors, key=lambda error: error.index)
    return {
        "status": result.status,
        "read": result.read,
        "created": result.created,
        "updated": result.updated,
        "skipped": result.skipped,
        "log_ids": [result.log_id],
        "errors": [
            asdict(BadRow(line_of(error.index), error.field, error.message))
            for error in errors[:RESULT_ERRORS]
        ],
        "more_errors": max(len(errors) - RESULT_ERRORS, 0),
    }


def logged_result(log: BatchProcessingLog) -> dict[str, Any]:
    """The result of a run that raised, as its log row recorded the committed chunks."""
    return {
        "status": log.status,
        "read": log.rows_read,
        "created": log.rows_created,
        "updated": log.rows_updated,
        "skipped": log.rows_skipped,
        "log_ids": [log.pk],
        "detail": log.error_summary,
        "errors": [],
        "more_errors": log.rows_skipped,
    }


def readable_rows(staged: Staged) -> Iterator[tuple[int, Any]]:
    """(line, row) for every row the reader could parse; bad lines are left out."""
    with staged.stream() as stream:
        for index, row in enumerate(stream):
            if not isinstance(row, BadLine):
                yield stream.line_of(index), dict(row)


def start_job(staged: Staged, user: Any) -> None:
    """Submit the readable rows as a job; lines the reader could not parse are kept aside.

    The rows are staged as they are read from the file (``jobs.staging``):
    the web process holds none of them. A job stages its rows as JSON, which
    an unparsed line is not; its error (with its line number) goes straight
    into the result instead.
    """
    job = submit_job(
        operation=staged.kind,
        rows=(row for _, row in readable_rows(staged)),
        created_by=user,
    )
    staged.job_id = str(job.pk)


def job_status(staged: Staged) -> dict[str, Any] | None:
    """The job's ``as_dict()``; once it has finished, the staged result is stored too."""
    job = Job.objects.filter(pk=staged.job_id).first() if staged.job_id else None
    if job is None:
        return None
    status = job.as_dict()
    if status["result"] is not None and staged.state == RUNNING:
        finish_job(staged, status["result"], status["status"])
    return status


def finish_job(staged: Staged, result: dict[str, Any], status: str) -> None:
    """Store the job's result with line numbers: job row i is the i-th readable line.

    One pass over the file, holding only the lines of the rows the result
    names and the first unreadable lines: flat whatever the file's size.
    """
    wanted = {error["index"] for error in result["errors"]}
    line_of_row: dict[int, int] = {}
    unreadable: list[BadRow] = []
    unreadable_count = readable = 0
    with staged.stream() as stream:
        for index, row in enumerate(stream):
            if isinstance(row, BadLine):
                unreadable_count += 1
                # Sorted by line below: only the first ones can be among those shown.
                if len(unreadable) < RESULT_ERRORS:
                    unreadable.append(BadRow(row.line, "row", row.reason))
                continue
            if readable in wanted:
                line_of_row[readable] = stream.line_of(index)
            readable += 1
    errors = [BadRow(line_of_row[e["index"]], e["field"], e["message"]) for e in result["errors"]]
    errors = sorted(errors + unreadable, key=lambda error: error.line)
    listed = len(result["errors"]) + unreadable_count
    staged.result = {
        "status": status,
        "read": result["read"] + unreadable_count,
        "created": result["created"],
        "updated": result["updated"],
        "skipped": result["skipped"] + unreadable_count,
        "log_ids": result["log_ids"],
        "errors": [asdict(error) for error in errors[:RESULT_ERRORS]],
        "more_errors": max(listed - RESULT_ERRORS, 0),
    }
    staged.state = DONE
    staged.save()
