"""Imports uploaded in the admin: staged once, previewed without writing, confirmed.

The flow is in docs/admin-and-reports.md ("Imports in the admin"): a held job
holds the rows, a JSON sidecar ``<token>.json`` the rest, and ``<token>.claim``,
created exclusively, lets one confirm run (released only if it committed nothing).
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
from operator import itemgetter
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.http import Http404

from batching.engine import run_log_of
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
COUNTS = ("read", "created", "updated", "skipped")

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
        """True for exactly one caller, however many confirm at once (``O_CREAT | O_EXCL``)."""
        try:
            with open(self.claim_path, "x"):
                return True
        except FileExistsError:
            return False

    def bad_rows(self, errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Row errors (``RowError.as_dict()``) as bad lines, by line."""
        rows = [(line_at(self.line_map, e["index"]), e["field"], e["message"]) for e in errors]
        return [
            {"line": n, "field": f, "message": m} for n, f, m in sorted(rows, key=itemgetter(0))
        ]


def stage(upload: UploadedFile, kind: str, user: Any) -> Staged:
    """Read ``upload`` once into a held job's staged input, and preview it.

    ImportFileError (format, header, size, rows, damaged gzip) keeps nothing of it.
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
        """``RecordStream.batches``; ImportFileError past the limit (the rest is only counted)."""
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
    """Remove uploads older than a day with their held jobs, unless their import is running;
    and jobs held for more than a day, even without a sidecar."""
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


def preview(staged: Staged, job: Job) -> dict[str, Any]:
    """A dry run of the first ``ADMIN_IMPORT_PREVIEW_ROWS`` staged rows: counts, first bad lines."""
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


def run(staged: Staged, user: Any) -> None:
    """Import the staged rows: now if few, else as a background job. Saves ``staged``.

    Only the request that claims the upload runs it; another confirm returns at once.
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
            result = run_held_job(job).as_dict()
            staged.result = summary(staged, result["status"], result, [result["log_id"]])
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
        counts = {name: getattr(log, f"rows_{name}") for name in COUNTS}
        staged.result = summary(staged, log.status, counts, [log.pk], detail=log.error_summary)
        staged.state = DONE
        staged.save()
        if not isinstance(exc, Exception):
            raise
        logger.exception("import %s failed after committing rows (run #%s)", staged.token, log.pk)
        return
    staged.save()


def summary(
    staged: Staged, status: str, result: dict[str, Any], log_ids: list[int], **extra: Any
) -> dict[str, Any]:
    """A finished run for the page: its counts and first errors, their indexes made lines."""
    listed = sorted(result.get("errors", []), key=itemgetter("index"))[:RESULT_ERRORS]
    return {
        "status": status,
        **{name: result[name] for name in COUNTS},
        "log_ids": log_ids,
        **extra,
        "errors": staged.bad_rows(listed),
        "more_errors": max(result["skipped"] - len(listed), 0),
    }


def job_status(staged: Staged) -> dict[str, Any] | None:
    """The released job's ``as_dict()`` (None while held); once finished, its result is
    stored, its errors put on their lines by the line map."""
    if staged.job_id is None:
        return None
    job = Job.objects.filter(pk=staged.job_id).exclude(status=Job.Status.HELD).first()
    if job is None:
        return None
    status = job.as_dict()
    if (result := status["result"]) is not None and staged.state == RUNNING:
        staged.result = summary(staged, status["status"], result, result["log_ids"])
        staged.state = DONE
        staged.save()
    return status
