"""The one engine that runs every bulk operation, naive or optimized.

The design is in docs/architecture.md ("The engine"), stopping in
docs/operations-history.md, each operation's lock timeline in its class docstring.
``write`` may be re-run on any subset of a chunk after a rollback, so it reads
what it needs afresh each time. A run's log row only ever holds the figures of
committed chunks.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import socket
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from typing import Any, ClassVar

from django.conf import settings
from django.db import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    transaction,
)
from django.db.models import Model
from django.utils import timezone

from batching.models import BatchProcessingLog
from batching.postgres import analyze_if_empty, begin_chunk, is_postgresql

logger = logging.getLogger(__name__)

UNIQUE_VIOLATION = "23505"
# Worth retrying: serialization failure, deadlock, lock timeout, admin shutdown, lost connection.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57P01", "08000", "08003", "08006"})

# The run's costs, kept on the log object and written by each checkpoint and the run's end.
COUNTERS = ("chunks_rolled_back", "chunks_retried", "chunks_rerun", "after_commit_failures")
# How a run ended (``_ending``); with its cost, what its end writes (checkpoints wrote the rest).
ENDING = ("status", "error_summary", "finished_at", "heartbeat_at", "duration_seconds")
ENDING_FIELDS = [*ENDING, "query_count", *COUNTERS]
# A run's row figures: ``BatchResult``'s, and the log's ``rows_*`` fields.
WRITTEN = ("written", "created", "updated")
FIGURES = ("read", *WRITTEN, "skipped")

DUPLICATE_IN_INPUT = "duplicate {field} in this input (first seen at row {first})"
RUN_FAILED_TRANSIENT = "chunk at row {start} failed after {attempts} attempts: {error}"
RESUME_NOT_FOUND = "no batch run #{log_id} to resume"
RESUME_WRONG_KIND = "run #{log_id} is a {variant} {operation} run, not {expected}"
RESUME_FINISHED = "run #{log_id} has already finished ({status})"
CANCELLED_AT = "cancelled on request after row {position}; resume with its id"
RESUME_STILL_RUNNING = (
    "run #{log_id} is still running (worker {worker}); "
    "if its process died, mark it interrupted first (manage.py mark_interrupted_runs)"
)


class RowInvalid(Exception):
    """Raised by ``prepare`` for a row that cannot be processed."""

    def __init__(self, field: str, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.code = code


class ChunkConflict(Exception):
    """Raised by ``write`` when a concurrent writer overtook its decisions: the chunk is retried."""


class ResumeError(ValueError):
    """The run asked for cannot be resumed."""


@dataclass(frozen=True, slots=True)
class RowError:
    """Why one input row was skipped. ``index`` is its 0-based position."""

    index: int
    field: str
    message: str
    code: str = "invalid"

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict, which deep-copies: this runs for each error of every answer.
        return {
            "index": self.index,
            "field": self.field,
            "message": self.message,
            "code": self.code,
        }


@dataclass(slots=True)
class ChunkOutcome:
    """What ``write`` did with a list of prepared rows."""

    written: int = 0
    created: int = 0
    updated: int = 0
    errors: list[RowError] = field(default_factory=list)

    def merge(self, other: ChunkOutcome) -> None:
        for name in WRITTEN:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)


@dataclass(slots=True)
class BatchResult:
    """The outcome of one run; ``log`` is its BatchProcessingLog row."""

    log: BatchProcessingLog
    read: int
    written: int
    created: int
    updated: int
    skipped: int
    errors: list[RowError]
    query_count: int
    duration: float

    @property
    def status(self) -> str:
        return self.log.status

    @property
    def log_id(self) -> int:
        return self.log.pk

    def as_dict(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "operation": self.log.operation,
            "variant": self.log.variant,
            "status": self.status,
            **{name: getattr(self, name) for name in FIGURES},
            "errors": [error.as_dict() for error in self.errors],
            "query_count": self.query_count,
            "duration": self.duration,
        }


@dataclass(slots=True)
class DryRun(ChunkOutcome):
    """What a run would do with an input (``dry_run``), errors sorted by row; nothing written."""

    read: int = 0

    @property
    def skipped(self) -> int:
        return len(self.errors)


@dataclass(slots=True)
class Prepared:
    """A validated row and its input position (not frozen: built once per row, it is cheaper)."""

    index: int
    item: Any


@dataclass(slots=True)
class RunContext:
    """What a run hands its operation's ``write``: ``log_id``, the mark its rows carry
    (set before the first ``write`` with ``keys_in_database``), and ``first_rows``: each
    repeated row's first row with its key (per chunk with ``keys_in_database``)."""

    key_field: str | None = None
    log_id: int | None = None
    first_rows: dict[int, int] = field(default_factory=dict)

    def repeated(self, index: int, first: int) -> RowError:
        """The error of row ``index``, whose key row ``first`` already had."""
        self.first_rows[index] = first
        message = DUPLICATE_IN_INPUT.format(field=self.key_field, first=first)
        return RowError(index, self.key_field or "row", message, "duplicate")

    def first_row_in_run(self, run_id: int | None, row: int | None) -> int | None:
        """The row of this run that wrote a key marked ``(run_id, row)``; None if another run."""
        return row if run_id is not None and run_id == self.log_id else None

    def not_written_yet[K: Hashable](
        self,
        rows: list[Prepared],
        key: Callable[[Prepared], K],
        marks: Mapping[K, tuple[int | None, int]],
        errors: list[RowError],
    ) -> list[Prepared]:
        """The rows whose key this run has not written yet; the others go to ``errors``.
        ``marks`` maps a key found in the database to (run, input row) of its last write."""
        fresh = []
        for row in rows:
            mark = marks.get(key(row))
            first = self.first_row_in_run(*mark) if mark is not None else None
            if first is not None:
                errors.append(self.repeated(row.index, first))
            else:
                fresh.append(row)
        return fresh

    def repeats_in(
        self,
        rows: list[Prepared],
        key: Callable[[Prepared], Hashable],
        first_rows: Mapping[Hashable, int],
    ) -> list[RowError]:
        """The errors of the rows whose key an earlier row of this run wrote;
        ``first_rows`` maps each key this run wrote (its marks) to the row that wrote it."""
        return [
            self.repeated(row.index, first_rows[row_key])
            for row in rows
            if first_rows.get(row_key := key(row), row.index) != row.index
        ]


class BatchOperation(ABC):
    """What one chunk of one operation does; the engine decides how chunks run.

    ``prepare`` validates one raw row (raises RowInvalid); ``write`` applies
    prepared rows in the engine's transaction, given the run's ``RunContext``;
    ``key`` gives the input key that must not repeat.
    """

    operation: ClassVar[str]
    variant: ClassVar[str]
    key_field: ClassVar[str | None] = None
    # ``write`` finds keys earlier chunks wrote, from the run's marks on its rows
    # (``RunContext``): the engine compares keys within a chunk only, memory stays flat.
    keys_in_database: ClassVar[bool] = False
    # Tables ``write`` fills that its own rows reference (orders, for their items):
    # analyzed after the first chunk on PostgreSQL while still empty (``analyze_if_empty``).
    fills: ClassVar[tuple[type[Model], ...]] = ()
    # The chunk size setting where large volumes enter (import commands, job partitions).
    volume_chunk_setting: ClassVar[str] = "BULK_VOLUME_CHUNK_SIZE"

    def __init__(self, using: str = "default") -> None:
        self.using = using

    @classmethod
    def volume_chunk_size(cls) -> int:
        """Rows per chunk where large volumes enter; the service's default stays 1,000."""
        return int(getattr(settings, cls.volume_chunk_setting))

    @abstractmethod
    def prepare(self, raw: Any) -> Any: ...

    def weight(self, raw: Any) -> int:
        """How much of a chunk's ``chunk_size`` one raw row takes: 1, or an order's lines."""
        return 1

    def key(self, item: Any) -> Hashable | None:
        return None

    @abstractmethod
    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome: ...

    def check(self, rows: list[Prepared]) -> ChunkOutcome:
        """What ``write`` would do with ``rows`` (``dry_run``, no transaction): its reads only."""
        raise NotImplementedError(f"{type(self).__qualname__} has no dry run")

    def committed(self, rows: list[Prepared]) -> None:
        """Called after the transaction that wrote ``rows`` committed (cache invalidation),
        outside it: it must not query the database."""
        return


class QueryCounter:
    """Counts the statements run on one connection (an ``execute_wrapper``)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


def sqlstate_of(exc: BaseException) -> str | None:
    return getattr(exc.__cause__ or exc, "sqlstate", None)


def is_unique_violation(exc: BaseException) -> bool:
    """Whether a unique index refused the row (``23505``; SQLite's ``SQLITE_CONSTRAINT_UNIQUE``)."""
    cause = exc.__cause__ or exc
    return (
        sqlstate_of(exc) == UNIQUE_VIOLATION
        or getattr(cause, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_UNIQUE"
    )


def is_transient(exc: BaseException) -> bool:
    """Deadlocks, serialization failures, lost connections, a locked SQLite file, conflicts."""
    if isinstance(exc, ChunkConflict | InterfaceError) or sqlstate_of(exc) in TRANSIENT_SQLSTATES:
        return True  # InterfaceError: the connection is gone, a new one may work
    if isinstance(exc, OperationalError) and sqlstate_of(exc) is None:
        # psycopg's closed connection has no SQLSTATE; SQLite says "database is locked".
        text = str(exc).lower()
        return any(
            marker in text for marker in ("locked", "closed", "terminat", "connection", "server")
        )
    return False


def describe_database_error(exc: DatabaseError) -> tuple[str, str]:
    """(field, message) for a database's rejection of one row."""
    diag = getattr(exc.__cause__, "diag", None)
    column, constraint, primary, detail = (
        getattr(diag, name, None) if diag else None
        for name in ("column_name", "constraint_name", "message_primary", "message_detail")
    )
    message = primary or str(exc).strip().splitlines()[0]
    if detail:
        message = f"{message} ({detail})"
    return column or constraint or "row", f"rejected by the database: {message}"


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter, in seconds, for the given retry (1-based)."""
    base = settings.BULK_RETRY_BASE_DELAY * (2 ** (attempt - 1))
    return min(settings.BULK_RETRY_MAX_DELAY, base) * random.uniform(0.5, 1.5)


def chunked(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def one_chunk(rows: Iterator[Any], size: int, weight: Callable[[Any], int]) -> Iterator[Any]:
    """The next rows of ``rows`` until their weights reach ``size``; reads no row beyond."""
    total = 0
    for raw in rows:
        yield raw
        total += weight(raw)
        if total >= size:
            return


class Lookahead:
    """The run's input, which tells whether a row follows by reading it ahead (an error
    met reading ahead is raised by the next ``next()``)."""

    def __init__(self, rows: Iterator[Any]) -> None:
        self.rows = rows
        self.ahead: list[Any] = []
        self.failure: Exception | None = None

    def __iter__(self) -> Lookahead:
        return self

    def __next__(self) -> Any:
        if self.ahead:
            return self.ahead.pop()
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        return next(self.rows)

    def exhausted(self) -> bool:
        if not self.ahead and self.failure is None:
            try:
                self.ahead.extend(islice(self.rows, 1))
            except Exception as exc:
                self.failure = exc
        return not self.ahead and self.failure is None


class TransientFailure(Exception):
    """A chunk still failed transiently after every retry."""


def parsed_already(item: Any) -> Any:
    """``prepare`` for a row a ``ReadAhead`` parsed: its item, or its error raised again."""
    if isinstance(item, RowInvalid):
        raise item
    return item


# Rows the read-ahead helper parses between offering the GIL to the run's thread.
YIELD_EVERY = 32
# Sleeping releases the GIL. Bound now: tests replace this module's ``time``.
offer_gil = partial(time.sleep, 0)


class ReadAhead:
    """The input's next chunk, read and parsed by the run's helper thread while a chunk is written.

    Only the input and ``prepare`` run there (each row an item or its ``RowInvalid``).
    Offering the GIL every ``YIELD_EVERY`` rows spares the run's thread a switch interval.
    """

    def __init__(
        self, executor: ThreadPoolExecutor, chunk: Iterator[Any], prepare: Callable[[Any], Any]
    ) -> None:
        self.parsed: list[Any] = []
        self.failure: BaseException | None = None
        self.stopped = False
        self.future = executor.submit(self._read, chunk, prepare)

    def _read(self, chunk: Iterator[Any], prepare: Callable[[Any], Any]) -> None:
        append = self.parsed.append
        try:
            for number, raw in enumerate(chunk):
                if self.stopped:
                    return
                if not number % YIELD_EVERY:
                    offer_gil()
                try:
                    append(prepare(raw))
                except RowInvalid as exc:
                    append(exc)
        except BaseException as exc:  # raised again in the run's thread by take()
            self.failure = exc

    def take(self) -> list[Any]:
        """The chunk's parsed rows, in input order."""
        self.future.result()
        if self.failure is not None:
            raise self.failure
        return self.parsed

    def stop(self) -> None:
        """Let the helper end before its next row (the run is failing)."""
        self.stopped = True
        self.future.result()


class BatchRun:
    """One run of one operation over one input; see the module docstring."""

    def __init__(
        self,
        operation: BatchOperation,
        *,
        chunk_size: int | None = None,
        resume: int | BatchProcessingLog | None = None,
    ) -> None:
        self.op = operation
        self.context = RunContext(key_field=operation.key_field)
        self.connection = connections[operation.using]
        self.resume_log = self._resumable_log(resume) if resume is not None else None
        default = self.resume_log.chunk_size if self.resume_log else settings.BULK_CHUNK_SIZE
        self.chunk_size = default if chunk_size is None else chunk_size
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.counter = QueryCounter()
        self.errors: list[RowError] = []
        self.totals = ChunkOutcome()
        # How many of ``errors`` belong to committed chunks (the rest may be rolled back).
        self.committed_errors = 0
        self.seen: dict[Hashable, int] = {}
        self.chunk_errors_from = 0  # where this chunk's errors start in ``errors``
        self.input = Lookahead(iter(()))
        self.read_ahead: ReadAhead | None = None
        self.helper: ThreadPoolExecutor | None = None
        self.finished = False  # a checkpoint also finished the log row
        self.stop_pending = False  # resumed with a stop requested before it started
        # A dry run writes no marks, so it compares keys across the whole input.
        self.dry = False
        self.chunk_start = 0  # the input position of the chunk being written
        # A resumed run's skipped rows, queries and time before this attempt.
        self._resumed_skipped = self._earlier_queries = 0
        self._earlier_duration = 0.0

    def _resumable_log(self, resume: int | BatchProcessingLog) -> BatchProcessingLog:
        log_id = resume.pk if isinstance(resume, BatchProcessingLog) else resume
        log = BatchProcessingLog.objects.using(self.op.using).filter(pk=log_id).first()
        if log is None:
            raise ResumeError(RESUME_NOT_FOUND.format(log_id=log_id))
        if (log.operation, log.variant) != (self.op.operation, self.op.variant):
            kind = {"variant": log.variant, "operation": log.operation}
            expected = f"{self.op.variant} {self.op.operation}"
            raise ResumeError(RESUME_WRONG_KIND.format(log_id=log_id, expected=expected, **kind))
        Status = BatchProcessingLog.Status
        if log.status == Status.RUNNING:  # two live processes must never import the same rows
            raise ResumeError(RESUME_STILL_RUNNING.format(log_id=log_id, worker=log.worker))
        if log.status not in (Status.INTERRUPTED, Status.FAILED, Status.CANCELLED):
            raise ResumeError(RESUME_FINISHED.format(log_id=log_id, status=log.status))
        return log

    def run(self, rows: Iterable[Any]) -> BatchResult:
        self.started = time.perf_counter()
        with self.connection.execute_wrapper(self.counter):
            log = self.log = self._start_log()
            self.context.log_id = log.pk
            failure: BaseException | None = None
            try:
                if not self.stop_pending:
                    self._run_chunks(iter(rows))
            except TransientFailure as exc:
                failure = exc
                logger.warning("batch run #%s failed: %s", log.pk, exc)
            except BaseException as exc:
                self._finish_log(failure=exc)
                exc.batch_log = log  # type: ignore[attr-defined]  # see run_log_of
                raise
            self._finish_log(failure=failure)
        # The committed figures: a failed chunk's rows count as not read (a resume reads them).
        return BatchResult(
            log=log,
            **{name: getattr(log, f"rows_{name}") for name in FIGURES},
            errors=self.errors[: self.committed_errors],
            # As the log recorded it: a caller's RELEASE of the last savepoint is not the run's.
            query_count=log.query_count - self._earlier_queries,
            duration=log.duration_seconds or 0.0,
        )

    def dry_run(self, rows: Iterable[Any]) -> DryRun:
        """What ``run`` would do with ``rows``, writing nothing."""
        self.dry = True
        result = DryRun()
        rows = iter(rows)
        while chunk := list(self._chunk_of(rows)):
            prepared = self._prepare_chunk(result.read, chunk, errors=result.errors)
            result.read += len(chunk)
            if prepared:
                result.merge(self.op.check(prepared))
        result.errors.sort(key=lambda error: error.index)
        return result

    def _chunk_of(self, rows: Iterator[Any]) -> Iterator[Any]:
        """The next chunk's raw rows, read lazily: ``chunk_size`` rows, or weight."""
        if type(self.op).weight is BatchOperation.weight:
            return islice(rows, self.chunk_size)
        return one_chunk(rows, self.chunk_size, self.op.weight)

    def _run_chunks(self, rows: Iterator[Any]) -> None:
        position = 0
        if self.resume_log is not None and self.op.keys_in_database:
            # The committed prefix's keys are marked in the database: skip it.
            position = sum(1 for _ in islice(rows, self.log.checkpoint_position))
        elif self.resume_log is not None:
            # Re-read the committed prefix only to remember its keys.
            for prefix in chunked(islice(rows, self.log.checkpoint_position), self.chunk_size):
                self._prepare_chunk(position, prefix, errors=[])
                position += len(prefix)
        rows = self.input = Lookahead(rows)
        try:
            while not self.finished:  # the last chunk, or a stop requested, ended the run
                start = self.chunk_start = position
                prepare: Callable[[Any], Any] | None = None
                if self.read_ahead is not None:  # read and parsed while the last chunk committed
                    rows_of_chunk, prepare = self.read_ahead.take(), parsed_already
                    self.read_ahead = None
                else:
                    if rows.exhausted():
                        return
                    rows_of_chunk = list(self._chunk_of(rows))
                if not rows.exhausted():
                    # The helper reads the next chunk meanwhile (a one-chunk run starts no thread).
                    self.helper = self.helper or ThreadPoolExecutor(1, "batch-read-ahead")
                    self.read_ahead = ReadAhead(self.helper, self._chunk_of(rows), self.op.prepare)
                position += len(rows_of_chunk)
                prepared = self._prepare_chunk(
                    start, rows_of_chunk, errors=self.errors, prepare=prepare
                )
                if not self._write_isolating(prepared, checkpoint=position, final=True):
                    # No piece of the chunk committed: its counters and checkpoint alone.
                    self._commit_with_retries([], checkpoint=position, final=True)
        finally:
            if self.read_ahead is not None:
                self.read_ahead.stop()
            if self.helper is not None:
                self.helper.shutdown()

    def _input_ended(self) -> bool:
        """Whether no row follows the chunk being written (a read-ahead has a row at least)."""
        return self.read_ahead is None and self.input.exhausted()

    def _prepare_chunk(
        self,
        start: int,
        chunk: Iterable[Any],
        *,
        errors: list[RowError],
        prepare: Callable[[Any], Any] | None = None,
    ) -> list[Prepared]:
        """The chunk's valid rows; invalid or repeated ones go to ``errors``. ``prepare``
        replaces the operation's (``parsed_already``: a ``ReadAhead`` parsed it)."""
        prepare = prepare or self.op.prepare
        # The base class has no key: skip a call per row that returns None.
        key_of = self.op.key if type(self.op).key is not BatchOperation.key else None
        if self.op.keys_in_database and not self.dry:
            self.seen = {}  # this chunk's keys only: earlier ones are the write's to find
            self.context.first_rows = {}
            self.chunk_errors_from = len(errors)
        seen = self.seen
        prepared = []
        for index, raw in enumerate(chunk, start):
            try:
                item = prepare(raw)
            except RowInvalid as exc:
                errors.append(RowError(index, exc.field, exc.message, exc.code))
                continue
            if key_of is not None and (key := key_of(item)) is not None:
                first = seen.setdefault(key, index)
                if first != index:
                    errors.append(self.context.repeated(index, first))
                    continue
            prepared.append(Prepared(index, item))
        return prepared

    def _write_isolating(self, rows: list[Prepared], *, checkpoint: int, final: bool) -> bool:
        """Commit ``rows``, halving on database rejections; whether the ``final`` piece
        (each split's last half, which completes the chunk) committed."""
        if not rows:
            return False
        try:
            self._commit_with_retries(rows, checkpoint=checkpoint, final=final)
            return True
        except (IntegrityError, DataError) as exc:
            self.log.chunks_rolled_back += 1
            if len(rows) == 1:
                field_name, message = describe_database_error(exc)
                self.errors.append(RowError(rows[0].index, field_name, message, "database"))
                return False
            left, right = rows[: len(rows) // 2], rows[len(rows) // 2 :]
            self.log.chunks_rerun += 2
            self._write_isolating(left, checkpoint=left[-1].index + 1, final=False)
            return self._write_isolating(right, checkpoint=checkpoint, final=final)

    def _commit_with_retries(self, rows: list[Prepared], *, checkpoint: int, final: bool) -> None:
        first, attempts = self.chunk_start, settings.BULK_RETRY_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._commit(rows, checkpoint=checkpoint, final=final)
                return
            except (DatabaseError, InterfaceError, ChunkConflict) as exc:
                # InterfaceError (the connection is gone) is not a DatabaseError. A rejected
                # row (IntegrityError, DataError) is never transient: ``_write_isolating`` halves.
                if not is_transient(exc):
                    raise
                self.log.chunks_rolled_back += 1
                if self.connection.in_atomic_block:
                    raise  # in a caller's transaction, the caller owns the rollback
                self.connection.close_if_unusable_or_obsolete()
                if attempt == attempts:
                    raise TransientFailure(
                        RUN_FAILED_TRANSIENT.format(start=first, attempts=attempts, error=exc)
                    ) from exc
                self.log.chunks_retried += 1
                delay = backoff_delay(attempt)
                logger.info("retrying chunk at row %s in %.3fs after: %s", first, delay, exc)
                time.sleep(delay)

    def _commit(self, rows: list[Prepared], *, checkpoint: int, final: bool) -> None:
        log = self.log
        creates_log = log.pk is None
        failures = log.after_commit_failures
        try:
            saved, totals, outcome = self._commit_chunk(rows, checkpoint=checkpoint, final=final)
        except BaseException:
            if creates_log:  # its INSERT was rolled back with the chunk
                log.pk = self.context.log_id = None
                log._state.adding = True
            raise
        # Only now, after the commit, does the run own what the chunk did.
        self.totals = replace(totals, errors=[])  # the errors stay in ``errors``
        self.errors.extend(outcome.errors)
        self.committed_errors = len(totals.errors)
        for name, value in saved.items():
            setattr(log, name, value)
        self.finished = "status" in saved
        if self.finished and log.after_commit_failures != failures:
            # The last side effects failed after the final checkpoint: one more UPDATE.
            self._save_quietly(["after_commit_failures"])
        if creates_log and not self.finished and self.op.fills and is_postgresql(self.op.using):
            self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        """After the first chunk (no lock held): analyze a table filled from empty; never fails."""
        try:
            analyzed = analyze_if_empty(self.op.fills, using=self.op.using)
        except DatabaseError:
            logger.warning("batch run: could not analyze %s", self.op.fills, exc_info=True)
        else:
            if analyzed:
                logger.info("batch run: analyzed %s, filled from empty", ", ".join(analyzed))

    def _commit_chunk(
        self, rows: list[Prepared], *, checkpoint: int, final: bool
    ) -> tuple[dict[str, Any], ChunkOutcome, ChunkOutcome]:
        """One chunk's transaction: the write, then its checkpoint on the log row. Returns
        the figures saved, the run's totals with its errors so far, the chunk's outcome."""
        log = self.log
        with transaction.atomic(using=self.op.using):
            if is_postgresql(self.op.using):
                begin_chunk(self.op.using)
            if log.pk is None and self.op.keys_in_database:
                log.save(using=self.op.using)  # the rows' marks name the run: create it first
                self.context.log_id = log.pk
            outcome = self.op.write(rows, self.context) if rows else ChunkOutcome()
            if self.op.keys_in_database:
                self._name_first_rows()
            if rows:
                transaction.on_commit(partial(self._after_commit, rows), using=self.op.using)
            written, created, updated = (
                getattr(self.totals, f) + getattr(outcome, f) for f in WRITTEN
            )
            totals = ChunkOutcome(written, created, updated, self.errors + outcome.errors)
            if not final:
                # A piece of a split chunk: the rows after it are not committed yet.
                totals.errors = [error for error in totals.errors if error.index < checkpoint]
            last = final and self._input_ended()  # the last checkpoint also ends the run
            saved = self._save_checkpoint(totals, checkpoint, committed=int(final), last=last)
        return saved, totals, outcome

    def _after_commit(self, rows: list[Prepared]) -> None:
        """The operation's side effects of a committed chunk: a failure is logged and counted."""
        try:
            self.op.committed(rows)
        except Exception:
            self.log.after_commit_failures += 1
            logger.exception(
                "batch run #%s: a side effect after the commit of rows %s-%s failed",
                self.log.pk,
                rows[0].index,
                rows[-1].index,
            )

    def _name_first_rows(self) -> None:
        """Make a repeat within the chunk name its key's first row in the whole run: if
        row i repeats j and the write finds j's key written by an earlier row f, both repeat f."""
        context = self.context
        first_rows = context.first_rows
        for position in range(self.chunk_errors_from, len(self.errors)):
            error = self.errors[position]
            first = first_rows.get(error.index)
            if first is not None and first in first_rows:
                self.errors[position] = context.repeated(error.index, first_rows[first])

    # -- the log row ---------------------------------------------------------

    def _start_log(self) -> BatchProcessingLog:
        now = timezone.now()
        worker = worker_name()
        if self.resume_log is not None:
            log = self.resume_log
            self.totals = ChunkOutcome(log.rows_written, log.rows_created, log.rows_updated)
            self._resumed_skipped, self._earlier_queries = log.rows_skipped, log.query_count
            self._earlier_duration = log.duration_seconds or 0.0
            log.resume_count += 1
            log.worker = worker
            log.heartbeat_at = now
            log.finished_at = None
            fields = ["status", "resume_count", "worker", "heartbeat_at", "finished_at"]
            if log.status == BatchProcessingLog.Status.CANCELLED:
                # Resuming a cancelled run asks it to go on: its stop request is spent.
                log.stop_requested = False
                fields.append("stop_requested")
            else:
                self.stop_pending = log.stop_requested
            log.status = BatchProcessingLog.Status.RUNNING
            log.save(update_fields=fields)
            return log
        # Saved by the first chunk's transaction, or by the end of a run that commits none.
        return BatchProcessingLog(
            operation=self.op.operation,
            variant=self.op.variant,
            chunk_size=self.chunk_size,
            started_at=now,
            heartbeat_at=now,
            database_vendor=self.connection.vendor,
            worker=worker,
        )

    def _save_checkpoint(
        self, totals: ChunkOutcome, checkpoint: int, *, committed: int, last: bool
    ) -> dict[str, Any]:
        """Record the chunk's checkpoint and the run's figures in its transaction; return
        them (with how the run ended, for the ``last`` chunk or a stop) for the log object.

        A committed chunk with input after it honours a requested stop: the UPDATE's
        WHERE reads ``stop_requested``, at no query of its own.
        """
        log, errors = self.log, totals.errors
        cap = settings.BULK_LOG_MAX_ROW_ERRORS
        kept = list(log.row_errors[:cap]) if self.resume_log is not None else []
        kept.extend(error.as_dict() for error in errors[: max(cap - len(kept), 0)])
        figures = {
            "checkpoint_position": checkpoint,
            **{f"rows_{name}": getattr(totals, name) for name in WRITTEN},
            "rows_skipped": self._resumed_skipped + len(errors),
            "row_errors": kept,
            "chunks_committed": log.chunks_committed + committed,
        }
        if last:
            figures.update(self._ending(figures, errors, failure=None))
        progress = self._progress()
        if log.pk is None:
            # The first checkpoint creates the row. A copy takes the figures, so a
            # rollback leaves the log object as the committed work left it.
            row = copy.copy(log)
            for name, value in (progress | figures).items():
                setattr(row, name, value)
            row.save(using=self.op.using, force_insert=True)
            log.pk = self.context.log_id = row.pk
            log._state.adding = False
        else:
            checkpoints = BatchProcessingLog.objects.using(self.op.using).filter(pk=log.pk)
            if not committed or last:
                checkpoints.update(**(progress | figures))
            elif not checkpoints.filter(stop_requested=False).update(**(progress | figures)):
                # A stop was requested: this chunk commits, and the run ends with it.
                figures.update(self._ending(figures, errors, failure=None, cancelled=True))
                progress = self._progress()
                checkpoints.update(**(progress | figures))
        # Not the chunk counters: a side effect after this COMMIT may still count there.
        return {name: progress[name] for name in ("query_count", "duration_seconds")} | figures

    def _progress(self) -> dict[str, Any]:
        """The run's cost and liveness so far, for a checkpoint UPDATE."""
        return {name: getattr(self.log, name) for name in COUNTERS} | {
            # This UPDATE included: a killed run's cost and time count when it is resumed.
            "query_count": self._earlier_queries + self.counter.count + 1,
            "duration_seconds": self._earlier_duration + (time.perf_counter() - self.started),
            "heartbeat_at": timezone.now(),
        }

    def _ending(
        self,
        figures: Mapping[str, Any],
        errors: list[RowError],
        *,
        failure: BaseException | None,
        cancelled: bool = False,
    ) -> dict[str, Any]:
        """How the run ended: its status, summary, end time and duration."""
        finished = timezone.now()
        duration = self._earlier_duration + (time.perf_counter() - self.started)
        Status = BatchProcessingLog.Status
        if cancelled and failure is None:
            status = Status.CANCELLED
            summary = CANCELLED_AT.format(position=figures["checkpoint_position"])
        elif isinstance(failure, KeyboardInterrupt | SystemExit):
            status = Status.INTERRUPTED
            summary = f"interrupted by {type(failure).__name__}; resume with its id"
        elif failure is not None:
            status, summary = Status.FAILED, f"{type(failure).__name__}: {failure}"[:2000]
        elif figures["rows_skipped"]:
            status, summary = Status.PARTIAL, summarize(errors)
        else:
            status, summary = Status.COMPLETED, ""
        return dict(zip(ENDING, (status, summary, finished, finished, duration), strict=True))

    def _finish_log(self, *, failure: BaseException | None) -> None:
        """Record how the run ended, unless its last checkpoint did; figures stay as committed."""
        log = self.log
        if self.finished:
            return
        figures = {"checkpoint_position": log.checkpoint_position, "rows_skipped": log.rows_skipped}
        committed = self.errors[: self.committed_errors]
        ending = self._ending(figures, committed, failure=failure, cancelled=self.stop_pending)
        for name, value in ending.items():
            setattr(log, name, value)
        # The final save counts itself, so query_count covers the whole run.
        log.query_count = self._earlier_queries + self.counter.count + 1
        if self.connection.in_atomic_block and self.connection.needs_rollback:
            return  # the caller's broken transaction would take the log with it
        # No chunk committed: the row is created now, with how the run ended.
        self._save_quietly(ENDING_FIELDS if log.pk is not None else None)

    def _save_quietly(self, fields: list[str] | None) -> None:
        try:
            self.log.save(using=self.op.using, update_fields=fields)
        except Error:
            # The outcome cannot be stored, but must not hide the failure that brought us here.
            logger.exception("could not record the end of batch run #%s", self.log.pk)


def run_log_of(exc: BaseException) -> BatchProcessingLog | None:
    """The log row of the batch run that ``exc`` ended, if a run raised it (committed figures)."""
    return getattr(exc, "batch_log", None)


def worker_name() -> str:
    """How a log row names the process running it: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def summarize(errors: list[RowError]) -> str:
    """'12 rows skipped: 10 not_found, 2 invalid'."""
    counts = Counter(error.code for error in errors)
    parts = ", ".join(f"{count} {code}" for code, count in sorted(counts.items()))
    noun = "row" if len(errors) == 1 else "rows"
    return f"{len(errors)} {noun} skipped: {parts}"


def run_batch(
    operation: BatchOperation,
    rows: Iterable[Any],
    *,
    chunk_size: int | None = None,
    resume: int | BatchProcessingLog | None = None,
) -> BatchResult:
    """Run ``operation`` over ``rows`` (docs/architecture.md, "The engine")."""
    return BatchRun(operation, chunk_size=chunk_size, resume=resume).run(rows)


def dry_run(
    operation: BatchOperation, rows: Iterable[Any], *, chunk_size: int | None = None
) -> DryRun:
    """What ``run_batch`` would do with ``rows``, writing nothing (the operation's ``check``)."""
    return BatchRun(operation, chunk_size=chunk_size).dry_run(rows)
