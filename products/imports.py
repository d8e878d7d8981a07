"""Imports uploaded in the admin: staged once, previewed without writing, confirmed.

The upload is read once, in one streaming pass, as it is received
(``RecordStream`` over the uploaded file): each record goes straight, unparsed,
into the staged input of a held job (``jobs.services.hold_job``), in the
database, where every worker reaches it; a line the reader cannot read is
staged refused with the reader's reason, so row indexes stay the file's.
The reader's table of line numbers (``RecordStream.line_map``: one entry per
blank line or multi-line record, none for a regular file) is kept to turn the
indexes of errors into lines. Nothing else of the file is kept: the preview,
the confirm and the result page read the staged rows or the runs' logs, never
the file. The reader's limits (decompressed size, line length; see
``batching.readers``) and ``ADMIN_IMPORT_MAX_ROWS`` refuse a bad file during
that pass, as a form error, and its staging rolls back.

The preview is a dry run of the first ``ADMIN_IMPORT_PREVIEW_ROWS`` staged
rows (``jobs.services.check_job``): the registered optimized operation's own
``prepare``, duplicate keys among them, and the operation's
``check``, which makes the reads its ``write`` makes (existing skus; users and
products) and writes nothing. Its counts and errors are therefore what the
run reports for those rows, short of rows only the database refuses.

Each upload has a JSON sidecar ``<token>.json`` under ``ADMIN_IMPORT_DIR``
(its kind, its owner, its job, its line map, its preview and, later, its
result). The token is random and is the only thing the browser sends back:
no client-sent path is ever opened, and a token is honoured only for the user
who uploaded it.

A confirmed import runs in the request up to ``ADMIN_IMPORT_SYNC_MAX_ROWS``
rows (``jobs.services.run_held_job``: one run over the staged rows, then the
job and its rows are deleted) and beyond that is released to the workers as a
background job partitioned by range (``jobs.services.release_job``), whose
partitions delete their rows as they end. Confirming first claims the upload
by creating ``<token>.claim`` exclusively, so of two confirms of one token (a
double click, two tabs) only one runs. The claim is released when a run fails
before committing anything, so the import can be confirmed again; once any
chunk is committed it is kept, and the page shows what the run's log says (a
second confirm would import the committed rows twice). An upload left
unconfirmed is swept after a day with its held job and staged rows.
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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.http import Http404

from batching.engine import BatchResult, run_log_of
from batching.models import BatchProcessingLog
from batching.readers import InputTooLarge, ReaderError, RecordStream, detect_format, line_at
from jobs.models import Job
from jobs.services import (
    check_job,
    discard_held_jobs,
    discard_job,
    hold_job,
    release_job,
    run_held_job,
)

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
    """One upload between its preview and its result; stored as JSON under its token."""

    token: str
    kind: str
    user_id: int
    original_name: str
    created: float
    state: str = PREVIEW
    # The held job whose staged rows are the upload's; a background run's job.
    job_id: str | None = None
    # RecordStream.line_map() of the upload: row index -> line.
    line_map: list[tuple[int, int]] = field(default_factory=list)
    preview: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

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

    def bad_rows(self, errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Row errors (``RowError.as_dict()``) as bad lines, by line."""
        rows = [
            BadRow(line_at(self.line_map, error["index"]), error["field"], error["message"])
            for error in errors
        ]
        return [asdict(row) for row in sorted(rows, key=lambda row: row.line)]


def stage(upload: UploadedFile, kind: str, user: Any) -> Staged:
    """Read ``upload`` once into a held job's staged input, and preview it.

    Raises:
        ImportFileError: unknown format, no usable header, too large, too many
            rows, damaged gzip data. Nothing of the upload is kept then.
    """
    if upload.size is not None and upload.size > settings.ADMIN_IMPORT_MAX_BYTES:
        raise ImportFileError(TOO_LARGE.format(limit=settings.ADMIN_IMPORT_MAX_BYTES))
    try:
        detect_format(Path(upload.name or ""))
    except ReaderError as exc:
        raise ImportFileError(str(exc)) from exc
    directory = Path(settings.ADMIN_IMPORT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    sweep(directory)
    staged = Staged(
        token=secrets.token_urlsafe(32),
        kind=kind,
        user_id=user.pk,
        original_name=Path(upload.name or "").name[:200],
        created=time.time(),
    )
    try:
        if upload.file is None:
            raise ReaderError("the upload has no file")
        upload.seek(0)
        with RecordStream(upload.file, name=staged.original_name) as records:
            job = hold_job(operation=kind, rows=Admitted(records), created_by=user)
            staged.line_map = records.line_map()
        staged.job_id = str(job.pk)
        staged.preview = preview(staged, job)
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


class Admitted:
    """The upload's records as a job stages them, refused past ``ADMIN_IMPORT_MAX_ROWS``."""

    def __init__(self, records: RecordStream) -> None:
        self.records = records
        self.format, self.columns = records.format, records.columns

    def batches(self) -> Iterator[list[Any]]:
        """``RecordStream.batches``.

        Raises:
            ImportFileError: more rows than ``ADMIN_IMPORT_MAX_ROWS`` (the rest
                of the file is then only counted, to say how many).
        """
        limit = settings.ADMIN_IMPORT_MAX_ROWS
        for batch in self.records.batches():
            if self.records.records_read > limit:
                rows = self.records.records_read + self.records.count_rest()
                raise ImportFileError(TOO_MANY_ROWS.format(rows=rows, limit=limit))
            yield batch


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
    """Remove the upload: its held job and staged rows (if not released), its files."""
    if staged.job_id is not None:
        discard_job(staged.job_id)
    for path in (staged.meta_path, staged.claim_path):
        path.unlink(missing_ok=True)


def sweep(directory: Path) -> None:
    """Remove uploads older than a day with their held jobs, unless their import is running.

    A running import's sidecar receives its result when its job ends, however
    long ago it was uploaded. Jobs held for more than a day are deleted with
    their staged rows even without a sidecar (an upload abandoned half-way).
    """
    limit = time.time() - STALE_SECONDS
    for path in directory.iterdir():
        try:
            if path.stat().st_mtime >= limit:
                continue
            if path.suffix == ".json":
                meta = json.loads(path.read_text())
                if meta.get("state") == RUNNING:
                    continue
                if meta.get("job_id"):
                    discard_job(meta["job_id"])
            elif _is_running(directory, path.name[:TOKEN_LENGTH]):
                continue
            path.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError):
            continue
    discard_held_jobs(older_than=timedelta(seconds=STALE_SECONDS))


def _is_running(directory: Path, token: str) -> bool:
    try:
        return json.loads((directory / f"{token}.json").read_text()).get("state") == RUNNING
    except (OSError, ValueError, AttributeError):
        return False


# -- the preview -------------------------------------------------------------------


def preview(staged: Staged, job: Job) -> dict[str, Any]:
    """What the import would do, without writing: counts and the first bad lines.

    The counts are those of the first ``ADMIN_IMPORT_PREVIEW_ROWS`` rows
    ("rows") of the "rows_total" staged; "truncated" says there were more.
    """
    checked = check_job(job, rows=settings.ADMIN_IMPORT_PREVIEW_ROWS)
    listed = checked.errors[:LISTED_ERRORS]
    return {
        "rows": checked.read,
        "rows_total": job.rows_total,
        "truncated": job.rows_total > checked.read,
        "created": checked.created,
        "updated": checked.updated,
        "skipped": checked.skipped,
        "errors": staged.bad_rows(error.as_dict() for error in listed),
        "more_errors": checked.skipped - len(listed),
        "background": job.rows_total > settings.ADMIN_IMPORT_SYNC_MAX_ROWS,
    }


# -- the run -----------------------------------------------------------------------


def run(staged: Staged, user: Any) -> None:
    """Import the staged rows: now if few, else as a background job. Saves ``staged``.

    Only the request that claims the upload runs it; any other confirm of the
    same token returns at once, and its page shows the first one's progress
    (the state is "running" from the claim on) and then its result.
    """
    if staged.state != PREVIEW or not staged.claim():
        return
    job = None
    if staged.job_id is not None:
        job = Job.objects.filter(pk=staged.job_id, status=Job.Status.HELD).first()
    if job is None:
        # Swept (or discarded) meanwhile: nothing left to import.
        staged.claim_path.unlink(missing_ok=True)
        raise Http404("no such import")
    staged.state = RUNNING
    staged.save()
    try:
        if staged.preview.get("background"):
            release_job(job)
        else:
            staged.result = result_of(staged, run_held_job(job))
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


def result_of(staged: Staged, result: BatchResult) -> dict[str, Any]:
    """The result of a run in the request, its errors' indexes turned into lines."""
    listed = sorted(result.errors, key=lambda error: error.index)[:RESULT_ERRORS]
    return {
        "status": result.status,
        "read": result.read,
        "created": result.created,
        "updated": result.updated,
        "skipped": result.skipped,
        "log_ids": [result.log_id],
        "errors": staged.bad_rows(error.as_dict() for error in listed),
        "more_errors": max(result.skipped - len(listed), 0),
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


def job_status(staged: Staged) -> dict[str, Any] | None:
    """The released job's ``as_dict()``; once it has finished, the staged result is stored too.

    None while the job is held (a run in a request has no job to show).
    """
    if staged.job_id is None:
        return None
    job = Job.objects.filter(pk=staged.job_id).exclude(status=Job.Status.HELD).first()
    if job is None:
        return None
    status = job.as_dict()
    if status["result"] is not None and staged.state == RUNNING:
        finish_job(staged, status["result"], status["status"])
    return status


def finish_job(staged: Staged, result: dict[str, Any], status: str) -> None:
    """Store the job's result, its errors' indexes turned into lines: no file is read."""
    listed = sorted(result["errors"], key=lambda error: error["index"])[:RESULT_ERRORS]
    staged.result = {
        "status": status,
        "read": result["read"],
        "created": result["created"],
        "updated": result["updated"],
        "skipped": result["skipped"],
        "log_ids": result["log_ids"],
        "errors": staged.bad_rows(listed),
        "more_errors": max(result["skipped"] - len(listed), 0),
    }
    staged.state = DONE
    staged.save()
