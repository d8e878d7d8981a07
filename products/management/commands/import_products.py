"""``manage.py import_products PATH``: stream a CSV or JSON Lines file into the catalogue.

Memory holds one chunk whatever the file's size; bad lines are reported by line
number and skipped. ``import_product_views`` shares ``ImportCommand``.
"""

from __future__ import annotations

import time
import zlib
from argparse import ArgumentParser
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from django.core.management.base import BaseCommand, CommandError

from batching.engine import BatchResult, ResumeError, run_batch, run_log_of
from batching.liveness import mark_interrupted_runs
from batching.models import BatchProcessingLog
from batching.readers import FORMATS, ReaderError, RecordStream, RowStream
from batching.registry import operation_class
from common.cli import Progress, positive_int

MAX_REPORTED_LINES = 20  # bad lines printed; the rest are counted

NO_SUCH_FILE = "{path}: no such file"
UNREADABLE = "cannot read {path}: {error}"
READ_FAILED = (
    "cannot read {path} after row {row:,}: {error}. The run is marked failed; "
    "fix the file and continue it with --resume {log_id}"
)
STILL_RUNNING = (
    "run #{log_id} is still running (worker {worker}, last heartbeat {heartbeat}): "
    "resume it only once its process has stopped"
)
INTERRUPTED = "interrupted: continue run #{log_id} with --resume {log_id}"
RUN_FAILED = "run #{log_id} failed: {summary}. Continue it with --resume {log_id}"
NOT_WITH_BACKGROUND = "--background runs the optimized service on the workers: drop {options}"
SUBMITTED = (
    "Submitted job {job}: {rows:,} rows in {partitions:,} partitions. Workers run it "
    "(manage.py db_worker); follow it at /api/jobs/{job} or in the admin."
)


class ImportCommand(BaseCommand):
    """Stream a file through one registered bulk operation; subclasses name the operation."""

    noun: ClassVar[str]
    operation: ClassVar[str]  # a BatchProcessingLog.Operation value

    def add_arguments(self, parser: ArgumentParser) -> None:
        operation = operation_class(self.operation)
        parser.add_argument(
            "path",
            type=Path,
            help="The file to import: CSV with a header row, or JSON Lines (one object a line); "
            ".csv, .jsonl or .ndjson, optionally gzipped (.gz).",
        )
        parser.add_argument(
            "--format",
            type=str,
            choices=FORMATS,
            help="The file's format when its name does not tell (default: from the extension).",
        )
        parser.add_argument(
            "--chunk-size",
            type=positive_int,
            metavar="N",
            help=f"Rows per transaction (default: settings.{operation.volume_chunk_setting}, "
            f"{operation.volume_chunk_size():,}, for files: the live shop waits at most tens of "
            "milliseconds for a chunk of it; a resumed run keeps its chunk size).",
        )
        parser.add_argument(
            "--resume",
            type=int,
            metavar="LOG_ID",
            help="Continue the interrupted or failed run with this BatchProcessingLog id after "
            "its checkpoint; pass the same file.",
        )
        parser.add_argument(
            "--naive",
            action="store_true",
            help="Use the naive (N+1) service instead of the optimized one, for comparison.",
        )
        parser.add_argument(
            "--background",
            action="store_true",
            help="Stage the file as a background job and return at once: its partitions run on "
            "the workers (manage.py db_worker), which report bad lines at their rows.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["path"]
        if options["background"]:
            clashing = [name for name in ("resume", "chunk_size") if options[name] is not None]
            clashing += ["naive"] if options["naive"] else []
            if clashing:
                options_text = ", ".join("--" + name.replace("_", "-") for name in clashing)
                raise CommandError(NOT_WITH_BACKGROUND.format(options=options_text))
            self.submit(path, options["format"])
            return
        verbosity: int = options["verbosity"]
        resume: int | None = options["resume"]
        Variant = BatchProcessingLog.Variant
        variant = Variant.NAIVE if options["naive"] else Variant.OPTIMIZED
        operation = operation_class(self.operation, variant)
        chunk_size: int | None = options["chunk_size"]
        if chunk_size is None and resume is None:  # a resumed run keeps its chunk size
            chunk_size = operation_class(self.operation).volume_chunk_size()
        with self.open_stream(RowStream, path, options["format"]) as stream:
            resumed_at = self.check_resumable(resume) if resume is not None else 0
            progress = None
            if verbosity >= 1 and self.stdout.isatty():
                progress = Progress(self.stdout, stream.estimate_total())
            rows = self.watch(stream, progress, announce=verbosity >= 1, resume=resume)
            started = time.perf_counter()
            try:
                result = run_batch(operation(), rows, chunk_size=chunk_size, resume=resume)
            except ResumeError as exc:
                raise CommandError(str(exc)) from exc
            except KeyboardInterrupt as exc:
                log = run_log_of(exc)
                if log is not None and log.pk is not None:
                    self.stderr.write(INTERRUPTED.format(log_id=log.pk))
                raise
            except (OSError, EOFError, zlib.error, ReaderError) as exc:
                # A file broken half-way: the engine marked the run failed, checkpoint kept.
                log_id = getattr(run_log_of(exc), "pk", None) or "ID"
                row = stream.rows_yielded
                message = READ_FAILED.format(path=path, row=row, error=exc, log_id=log_id)
                raise CommandError(message) from exc
            finally:
                if progress is not None:
                    progress.finish()
            elapsed = time.perf_counter() - started
            if verbosity >= 1:
                self.report(stream, result, resumed_at=resumed_at, elapsed=elapsed)
            if verbosity >= 2:
                log = result.log
                self.stdout.write(
                    f"{result.query_count:,} queries; chunks: {log.chunks_committed:,} committed, "
                    f"{log.chunks_rolled_back:,} rolled back, {log.chunks_retried:,} retried."
                )
        if result.status == BatchProcessingLog.Status.FAILED:
            raise CommandError(
                RUN_FAILED.format(log_id=result.log_id, summary=result.log.error_summary)
            )

    def check_resumable(self, log_id: int) -> int:
        """Mark dead runs interrupted, refuse a live one (two processes would import the same
        rows); return the checkpoint. The run's existence and kind are the engine's check."""
        mark_interrupted_runs()
        log = (
            BatchProcessingLog.objects.filter(pk=log_id)
            .only("status", "worker", "heartbeat_at", "checkpoint_position")
            .first()
        )
        if log is None:
            return 0
        if log.status == BatchProcessingLog.Status.RUNNING:
            raise CommandError(
                STILL_RUNNING.format(log_id=log_id, worker=log.worker, heartbeat=log.heartbeat_at)
            )
        return log.checkpoint_position

    def open_stream[S: RecordStream](self, reader: type[S], path: Path, format: str | None) -> S:
        try:
            return reader(path, format=format)
        except FileNotFoundError as exc:
            raise CommandError(NO_SUCH_FILE.format(path=path)) from exc
        except OSError as exc:
            raise CommandError(UNREADABLE.format(path=path, error=exc.strerror or exc)) from exc
        except ReaderError as exc:
            raise CommandError(str(exc)) from exc

    def submit(self, path: Path, format: str | None) -> None:
        """Stage the file's records unparsed as a job: the workers parse them."""
        from jobs.services import submit_job

        with self.open_stream(RecordStream, path, format) as records:
            job = submit_job(operation=self.operation, rows=records)
        partitions = -(-job.rows_total // job.partition_size)
        self.stdout.write(SUBMITTED.format(job=job.pk, rows=job.rows_total, partitions=partitions))

    def watch(
        self, stream: RowStream, progress: Progress | None, *, announce: bool, resume: int | None
    ) -> Iterator[Mapping[str, Any]]:
        """The rows as the engine reads them, announcing the run on the first one (a new
        run's id is told at the end, or by the error that stops it)."""
        rows: Iterable[Mapping[str, Any]] = progress.track(stream) if progress else stream
        for position, row in enumerate(rows):
            if position == 0 and announce:
                action, run = (
                    ("Importing", "") if resume is None else ("Resuming", f" as run #{resume}")
                )
                self.stdout.write(f"{action} {self.noun} from {stream.path}{run}")
            yield row

    def report(
        self, stream: RowStream, result: BatchResult, *, resumed_at: int, elapsed: float
    ) -> None:
        errors = sorted(result.errors, key=lambda error: error.index)
        for error in errors[:MAX_REPORTED_LINES]:
            line = stream.line_of(error.index)
            self.stdout.write(f"line {line}: {error.field}: {error.message}", self.style.WARNING)
        if len(errors) > MAX_REPORTED_LINES:
            more = len(errors) - MAX_REPORTED_LINES
            self.stdout.write(f"... and {more:,} more bad lines", self.style.WARNING)
        log = result.log
        completed = log.status == BatchProcessingLog.Status.COMPLETED
        self.stdout.write(
            f"Run #{log.pk} {log.status}: {log.rows_read:,} rows read, "
            f"{log.rows_created:,} created, {log.rows_updated:,} updated, "
            f"{log.rows_skipped:,} skipped.",
            self.style.SUCCESS if completed else self.style.WARNING,
        )
        # This invocation's own figures: a resumed run's totals include earlier rows.
        rows = result.read - resumed_at
        rate = rows / elapsed if elapsed > 0 else 0.0
        start = f"Resumed at row {resumed_at:,}: " if resumed_at else ""
        self.stdout.write(f"{start}{rows:,} rows in {elapsed:.2f} s ({rate:,.0f} rows/s).")


class Command(ImportCommand):
    help = (
        "Create or update products by sku from a CSV or JSON Lines file (columns: sku, name, "
        "category, price, stock_quantity, is_active). Bad lines are reported and skipped."
    )
    noun = "products"
    operation = BatchProcessingLog.Operation.PRODUCTS
