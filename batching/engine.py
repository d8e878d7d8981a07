"""The one engine that runs every bulk operation, naive or optimized.

Transaction design
------------------
A run reads its input lazily, ``chunk_size`` rows at a time, and never holds
more than two chunks: the one it writes and the next, read ahead (below).
Each row first goes through the operation's ``prepare`` (pure Python: shape,
types, ranges, duplicate keys within the input); rows that fail are reported
by index and never reach the database.

The prepared rows of a chunk are written by the operation's ``write`` inside
one ``transaction.atomic()``. The same transaction records the chunk's
checkpoint (the input position it ends at) and the run's counters on the
``BatchProcessingLog`` row, so the checkpoint can never claim work that was
rolled back, nor miss work that was committed.

When the database rejects a chunk (an integrity or data error from a row that
passed validation), the chunk is rolled back and re-run in halves until the
failing rows are isolated: every good row is committed and every bad row is
reported with the database's reason. ``write`` is therefore re-runnable on any
subset of a chunk: it prefetches what it needs afresh each time.

Transient failures (deadlock, serialization failure, a lost connection, a
locked SQLite database) are retried per chunk with exponential backoff and
jitter, up to ``settings.BULK_RETRY_ATTEMPTS`` times; then the run ends as
failed. Chunks committed before keep their work.

Every chunk after the first is read ahead: once a chunk's rows are read, a
helper thread (one per run) reads the next chunk and runs ``prepare`` on its
rows while the chunk's statements and COMMIT wait on the database (see
``ReadAhead``). Only the input and ``prepare`` run in the helper; duplicate
keys, errors and the database stay with the run's thread.

Duplicate keys are found across the whole input from a dict of every key seen,
unless the operation finds keys written by earlier chunks itself
(``keys_in_database``: the catalogue import, the price update and the score
refresh mark each row they write with their run and input row); then the
engine compares keys within a chunk only, and a run's memory does not grow
with its input. Either way a repeat is named in one place: the run's
``RunContext``, which the engine keeps (the run's log id, the chunk's repeated
rows) and hands to each ``write``, not attributes set on the operation.

The log row costs the run no commit of its own: it is inserted by the first
chunk's transaction and finished by the last chunk's checkpoint (the run
reads one row ahead to know the chunk is the last), so a one-chunk run
commits once. It costs no statement of its own either, unless the operation
marks its rows with the run (``keys_in_database``) and needs the row's id
before it writes: otherwise the first checkpoint is the INSERT, and a
one-chunk run writes its log row with one statement. A chunk that rolls
back takes the row's INSERT with it; the
next attempt inserts it again, and a run that commits no chunk at all (an
empty input, a failure) inserts it when it ends, with how it ended: a
failing chunk never takes the trace of its own failure with it. Its
counters, errors and checkpoint are only ever those of committed chunks: a
run that fails midway is finished with the figures its last checkpoint
wrote, never with the rows it read but did not commit.

Locks late and short (PostgreSQL). Every chunk transaction opens with one
statement (``batching.postgres.begin_chunk``): foreign keys checked by each
statement, not inside COMMIT, and a ``lock_timeout``, so a chunk that waits
on a live transaction's row lock gives up (``55P03``, retried with backoff
like any transient failure) instead of making the live traffic queue behind
it. Operations write their own rows first and change the rows the live shop
writes last. Each chunk's timeline (``products.services.optimized``):

    views    BEGIN; SET; read users+products; COPY views; UPDATE view_count
             (locks products, pk order); checkpoint; COMMIT
    orders   BEGIN; SET; read products+references+users; INSERT orders
             (reference order) and lines; UPDATE stock, guarded (locks
             products, pk order);
             checkpoint; COMMIT. Overtaken: ChunkConflict, retried; a
             reference committed first is then read as taken, and after
             the stock guard refused the run locks products first
    scores   BEGIN; SET; read users+products; upsert scores; checkpoint; COMMIT
             (no product locked)
    import   BEGIN; SET; read categories; upsert products (locks the rows it
             updates); checkpoint; COMMIT
    prices   BEGIN; SET; one UPDATE locking the products by sku in pk order;
             checkpoint; COMMIT

The foreign-key checks of the rows written take ``FOR KEY SHARE`` on the
products they reference, which no checkout or price save waits for.

Side effects of a committed chunk (``committed``: cache invalidation) run
after its COMMIT and can never fail the run: an error there is logged and
counted on the log row (``after_commit_failures``), and the chunk stays
committed. A stale cache entry it leaves behind lives at most
``CACHE_TIMEOUT``.

Stopping on request. Whoever wants a run to stop (a job's cancel) sets
``stop_requested`` on its log row. The run reads the flag in the WHERE of the
checkpoint UPDATE it already sends at the end of each chunk but the last: when
that UPDATE matches no row, a second one records the checkpoint with the run
ended as ``cancelled``, in the same transaction. So the chunk that was being
written commits, no later chunk starts, and an uncancelled run pays no query
for the check. A run resumed while its flag is set (a stop requested before
it started) ends as cancelled at once. Resuming a cancelled run clears the
flag: the request it honoured is spent.

A dry run (``dry_run``) says what a run would do without writing: the same
``prepare`` and duplicate-key rule, then the operation's ``check`` on each
chunk's valid rows, which makes the reads its ``write`` makes (are the
references there? which keys exist?) and writes nothing. No transaction, no
log row. Nothing is written, so no mark finds a key an earlier chunk had: a
dry run compares keys across the whole input, as a run of an operation
without ``keys_in_database`` does.

A run that raises (an unexpected error, an interrupt) hands its log row to
the caller on the exception (``run_log_of``), so a caller that must not run
the same input twice (an idempotent API request, a confirmed import) can tell
whether anything was committed.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

# SQLSTATEs worth retrying: the same work can succeed on a second attempt.
UNIQUE_VIOLATION = "23505"
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown
        "08000",  # connection_exception
        "08003",  # connection_does_not_exist
        "08006",  # connection_failure
    }
)

# What the end of a run writes on its log row; the figures of the committed
# work (rows, errors, checkpoint) are written by each chunk's checkpoint.
ENDING_FIELDS = [
    "status",
    "error_summary",
    "finished_at",
    "heartbeat_at",
    "duration_seconds",
    "query_count",
    "chunks_rolled_back",
    "chunks_retried",
    "chunks_rerun",
    "after_commit_failures",
]

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
    """A chunk's write found its decisions overtaken by a concurrent writer.

    Raised by ``write`` (inside the chunk's transaction, which then rolls
    back); the engine retries the chunk like a transient failure, with
    backoff, and the operation decides afresh.
    """


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
        self.written += other.written
        self.created += other.created
        self.updated += other.updated
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
            "read": self.read,
            "written": self.written,
            "created": self.created,
            "updated": self.updated,
            "skipped": self.skipped,
            "errors": [error.as_dict() for error in self.errors],
            "query_count": self.query_count,
            "duration": self.duration,
        }


@dataclass(slots=True)
class DryRun(ChunkOutcome):
    """What a run would do with an input (``dry_run``): the outcome its chunks'
    ``check`` found (errors sorted by row index), and the rows read. Nothing
    was written."""

    read: int = 0

    @property
    def skipped(self) -> int:
        return len(self.errors)


@dataclass(slots=True)
class Prepared:
    """A validated row and its input position.

    Built once per row: a plain slotted dataclass costs about half as much to
    build as a frozen one.
    """

    index: int
    item: Any


@dataclass(slots=True)
class RunContext:
    """What a run hands its operation's ``write``: the run's id, and where repeats are named.

    One per run, owned by the engine. ``log_id`` is the run's
    BatchProcessingLog id, set once the row exists (for an operation with
    ``keys_in_database``, before its first ``write``): the mark the rows it
    writes carry. ``first_rows`` maps each repeated row of the chunk so far
    to the row its key first came in; the engine starts it afresh with each
    chunk whose keys it compares within the chunk only (``keys_in_database``).
    Every duplicate key of a run is named here, by the engine and the
    operation alike.
    """

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

        ``marks`` maps a key found in the database to the run that last wrote
        it and that run's input row (see ``BatchOperation.keys_in_database``).
        """
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
        """The errors of the rows whose key an earlier row of this run wrote.

        ``first_rows`` maps each key this run has written (as its marks say)
        to the input row that wrote it; a row that wrote its key itself is
        not a repeat.
        """
        return [
            self.repeated(row.index, first_rows[row_key])
            for row in rows
            if first_rows.get(row_key := key(row), row.index) != row.index
        ]


class BatchOperation(ABC):
    """What one chunk of one operation does; the engine decides how chunks run.

    Subclasses implement ``prepare`` (validate one raw row, raise RowInvalid)
    and ``write`` (apply a list of prepared rows; it runs inside a transaction
    the engine opens and may be re-run on any subset after a rollback).
    ``key`` names the input key that must not repeat within one input.

    The engine writes nothing onto an operation: ``write`` is handed the
    run's ``RunContext`` (its log id, the mark of the rows it writes, and the
    methods that name a repeated key), and passes it to whatever it calls.
    """

    operation: ClassVar[str]
    variant: ClassVar[str]
    key_field: ClassVar[str | None] = None
    # True when ``write`` recognises a key written by an earlier chunk of the
    # run itself (from a mark the run leaves on the rows it writes, with its
    # context's ``log_id``; ``RunContext.not_written_yet`` and ``repeats_in``):
    # the engine then compares keys within a chunk only and remembers none
    # across chunks, so its memory stays flat at any size.
    keys_in_database: ClassVar[bool] = False
    # Tables ``write`` inserts into that its own rows reference by foreign key
    # (orders, for their items): on PostgreSQL the engine refreshes their
    # statistics after a run's first chunk if they still say empty
    # (``postgres.analyze_if_empty``).
    fills: ClassVar[tuple[type[Model], ...]] = ()
    # The setting that gives this operation's chunk size where large volumes
    # enter (the import commands, job partitions): ``volume_chunk_size``.
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
        """What ``write`` would do with ``rows``, without writing (``dry_run``).

        It makes the reads ``write`` makes, through the same code, and returns
        the counts and the row errors ``write`` would; it runs outside any
        transaction and must write nothing. Operations without a dry run
        raise NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__qualname__} has no dry run")

    def committed(self, rows: list[Prepared]) -> None:
        """Called once the transaction that wrote ``rows`` has committed.

        The place for side effects that must not outlive a rollback (cache
        invalidation): a piece the engine rolls back never gets here. It must
        not query the database: it runs outside the chunk's transaction.
        """
        return


class QueryCounter:
    """Counts the statements run on one connection (an ``execute_wrapper``)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


def sqlstate_of(exc: BaseException) -> str | None:
    cause = exc.__cause__ or exc
    return getattr(cause, "sqlstate", None)


def is_unique_violation(exc: BaseException) -> bool:
    """Whether a unique index refused the row (``23505``; SQLite's ``SQLITE_CONSTRAINT_UNIQUE``)."""
    cause = exc.__cause__ or exc
    return (
        sqlstate_of(exc) == UNIQUE_VIOLATION
        or getattr(cause, "sqlite_errorname", None) == "SQLITE_CONSTRAINT_UNIQUE"
    )


def is_transient(exc: BaseException) -> bool:
    """Deadlocks, serialization failures, lost connections, a locked SQLite file, conflicts."""
    if isinstance(exc, ChunkConflict) or sqlstate_of(exc) in TRANSIENT_SQLSTATES:
        return True
    if isinstance(exc, InterfaceError):
        return True  # the connection is gone: a new one may work
    if isinstance(exc, OperationalError) and sqlstate_of(exc) is None:
        # psycopg raises OperationalError without a SQLSTATE when the
        # server closes the connection; SQLite says "database is locked".
        text = str(exc).lower()
        return any(
            marker in text for marker in ("locked", "closed", "terminat", "connection", "server")
        )
    return False


def describe_database_error(exc: DatabaseError) -> tuple[str, str]:
    """(field, message) for a database's rejection of one row."""
    cause = exc.__cause__
    diag = getattr(cause, "diag", None)
    column = getattr(diag, "column_name", None) if diag else None
    constraint = getattr(diag, "constraint_name", None) if diag else None
    primary = getattr(diag, "message_primary", None) if diag else None
    detail = getattr(diag, "message_detail", None) if diag else None
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
    """The run's input, which can tell whether another row follows by reading it ahead.

    An error the input raises while a row is read ahead is raised by the
    next ``next()``, where the run would have met it anyway.
    """

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
# Sleeping releases the GIL, and the run's thread takes it if it waits. Bound
# now: tests replace this module's ``time`` to record the backoff's sleeps.
offer_gil = partial(time.sleep, 0)


class ReadAhead:
    """The input's next chunk, read and parsed in the run's helper thread while a chunk is written.

    The run's thread reads a chunk's rows whole before writing them, so from
    then on the input is free: the helper reads the next chunk and runs the
    operation's ``prepare`` on each row while the chunk's statements and its
    COMMIT wait on the database (with the GIL released). Only the input and
    ``prepare`` (pure Python) run in the helper: the database, duplicate keys
    and errors stay with the run's thread, which takes each parsed row (an
    item or its ``RowInvalid``) in order. The helper is one thread for the
    whole run (``executor``): handing it a chunk costs no thread start.

    The helper gives the GIL up every ``YIELD_EVERY`` rows. Otherwise, when a
    statement's answer arrives, the run's thread waits for the helper's turn
    to end (the interpreter's switch interval, 5 ms) before it can go on: a
    catalogue import of 200,000 rows in chunks of 5,000 waited 0.7 s so, 15%
    of its time. Parsing is off the critical path; the run's thread is on it.
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
        # The run's id and the repeats it names, handed to every ``write``.
        self.context = RunContext(key_field=operation.key_field)
        self.connection = connections[operation.using]
        self.resume_log = self._resumable_log(resume) if resume is not None else None
        if chunk_size is None:
            chunk_size = self.resume_log.chunk_size if self.resume_log else settings.BULK_CHUNK_SIZE
        self.chunk_size = chunk_size
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.counter = QueryCounter()
        self.errors: list[RowError] = []
        self.totals = ChunkOutcome()
        # How many of ``errors`` belong to committed chunks (the rest may be rolled back).
        self.committed_errors = 0
        self.seen: dict[Hashable, int] = {}
        self.chunk_errors_from = 0  # where this chunk's errors start in ``errors``
        # The run's input, and its next chunk while it is read ahead.
        self.input = Lookahead(iter(()))
        self.read_ahead: ReadAhead | None = None
        self.helper: ThreadPoolExecutor | None = None
        # The last chunk's checkpoint also finished the log row.
        self.finished = False
        # Resumed with a stop requested before it started: it ends at once.
        self.stop_pending = False
        # A dry run (``dry_run``): nothing written, keys compared across the input.
        self.dry = False

    def _resumable_log(self, resume: int | BatchProcessingLog) -> BatchProcessingLog:
        log_id = resume.pk if isinstance(resume, BatchProcessingLog) else resume
        log = BatchProcessingLog.objects.using(self.op.using).filter(pk=log_id).first()
        if log is None:
            raise ResumeError(RESUME_NOT_FOUND.format(log_id=log_id))
        if log.operation != self.op.operation or log.variant != self.op.variant:
            raise ResumeError(
                RESUME_WRONG_KIND.format(
                    log_id=log_id,
                    variant=log.variant,
                    operation=log.operation,
                    expected=f"{self.op.variant} {self.op.operation}",
                )
            )
        if log.status == BatchProcessingLog.Status.RUNNING:
            # Two live processes must never import the same rows.
            raise ResumeError(RESUME_STILL_RUNNING.format(log_id=log_id, worker=log.worker))
        if log.status not in (
            BatchProcessingLog.Status.INTERRUPTED,
            BatchProcessingLog.Status.FAILED,
            BatchProcessingLog.Status.CANCELLED,
        ):
            raise ResumeError(RESUME_FINISHED.format(log_id=log_id, status=log.status))
        return log

    # -- the run -----------------------------------------------------------

    def run(self, rows: Iterable[Any]) -> BatchResult:
        started = self.started = time.perf_counter()
        with self.connection.execute_wrapper(self.counter):
            log = self._start_log()
            self.context.log_id = log.pk
            failure: BaseException | None = None
            try:
                if not self.stop_pending:
                    self._run_chunks(log, iter(rows))
            except TransientFailure as exc:
                failure = exc
                logger.warning("batch run #%s failed: %s", log.pk, exc)
            except BaseException as exc:
                self._finish_log(log, started, failure=exc)
                exc.batch_log = log  # type: ignore[attr-defined]  # see run_log_of
                raise
            self._finish_log(log, started, failure=failure)
        # The committed figures: after a failure, the rows of the chunk that
        # failed are neither read nor skipped (a resume reads them again).
        return BatchResult(
            log=log,
            read=log.rows_read,
            written=log.rows_written,
            created=log.rows_created,
            updated=log.rows_updated,
            skipped=log.rows_skipped,
            errors=self.errors[: self.committed_errors],
            # As the log recorded it: a caller's transaction's RELEASE of the
            # last chunk's savepoint is not the run's.
            query_count=log.query_count - self._earlier_queries,
            duration=log.duration_seconds or 0.0,
        )

    def dry_run(self, rows: Iterable[Any]) -> DryRun:
        """What ``run`` would do with ``rows``, writing nothing; see the module docstring."""
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

    def _run_chunks(self, log: BatchProcessingLog, rows: Iterator[Any]) -> None:
        position = 0
        if self.resume_log is not None and self.op.keys_in_database:
            # The committed prefix's keys are marked in the database: skip it.
            position = sum(1 for _ in islice(rows, log.checkpoint_position))
        elif self.resume_log is not None:
            # Re-read the committed prefix only to remember its keys, so a
            # duplicate after the checkpoint is still recognised as one.
            for prefix in chunked(islice(rows, log.checkpoint_position), self.chunk_size):
                self._prepare_chunk(position, prefix, errors=[])
                position += len(prefix)
        rows = self.input = Lookahead(rows)
        try:
            while not self.finished:  # the last chunk, or a stop requested, ended the run
                start = position
                prepare: Callable[[Any], Any] | None = None
                if self.read_ahead is not None:
                    # Read and parsed while the chunk before committed.
                    rows_of_chunk, prepare = self.read_ahead.take(), parsed_already
                    self.read_ahead = None
                else:
                    if rows.exhausted():
                        return
                    rows_of_chunk = list(self._chunk_of(rows))
                if not rows.exhausted():
                    # The input is free until the next chunk, which has a row at
                    # least: the helper reads it meanwhile. (A run of one chunk
                    # starts no thread.)
                    self.helper = self.helper or ThreadPoolExecutor(1, "batch-read-ahead")
                    self.read_ahead = ReadAhead(self.helper, self._chunk_of(rows), self.op.prepare)
                position += len(rows_of_chunk)
                prepared = self._prepare_chunk(
                    start, rows_of_chunk, errors=self.errors, prepare=prepare
                )
                self._write_chunk(log, prepared, start=start, end=position)
        finally:
            if self.read_ahead is not None:
                self.read_ahead.stop()
            if self.helper is not None:
                self.helper.shutdown()

    def _input_ended(self) -> bool:
        """Whether no row follows the chunk being written.

        A chunk read ahead is only ever started with a row in it; without one,
        the input is asked here (the helper is not reading it then).
        """
        return self.read_ahead is None and self.input.exhausted()

    def _write_chunk(
        self, log: BatchProcessingLog, prepared: list[Prepared], *, start: int, end: int
    ) -> None:
        completed = self._write_isolating(log, prepared, checkpoint=end, first=start, final=True)
        if not completed:
            # The chunk's last piece was not committed (all rows invalid or
            # rejected): record its counters and checkpoint on their own.
            self._commit_with_retries(log, [], checkpoint=end, first=start, final=True)

    def _prepare_chunk(
        self,
        start: int,
        chunk: list[Any],
        *,
        errors: list[RowError],
        prepare: Callable[[Any], Any] | None = None,
    ) -> list[Prepared]:
        """The chunk's valid rows; each invalid or repeated row is added to ``errors``."""
        return list(self._prepare_rows(start, chunk, errors, prepare))

    def _prepare_rows(
        self,
        start: int,
        chunk: Iterable[Any],
        errors: list[RowError],
        prepare: Callable[[Any], Any] | None = None,
    ) -> Iterator[Prepared]:
        """Each valid row of ``chunk`` as it is prepared; invalid or repeated ones go to ``errors``.

        Every input row goes through this loop, so what it looks up once per
        row is looked up once per chunk instead. ``prepare`` replaces the
        operation's (``parsed_already``, for a chunk a ``ReadAhead`` parsed).
        """
        prepare = prepare or self.op.prepare
        # The base class has no key: skip a call per row that returns None.
        key_of = self.op.key if type(self.op).key is not BatchOperation.key else None
        if self.op.keys_in_database and not self.dry:
            self.seen = {}  # this chunk's keys only: earlier ones are the write's to find
            self.context.first_rows = {}
            self.chunk_errors_from = len(errors)
        seen = self.seen
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
            yield Prepared(index, item)

    def _write_isolating(
        self,
        log: BatchProcessingLog,
        rows: list[Prepared],
        *,
        checkpoint: int,
        first: int,
        final: bool,
    ) -> bool:
        """Commit ``rows``, halving on database rejections.

        ``final`` marks the piece that completes the chunk (the last half of
        each split); its commit counts the chunk as committed, and the return
        value says whether it was.
        """
        if not rows:
            return False
        try:
            self._commit_with_retries(log, rows, checkpoint=checkpoint, first=first, final=final)
            return True
        except (IntegrityError, DataError) as exc:
            log.chunks_rolled_back += 1
            if len(rows) == 1:
                field_name, message = describe_database_error(exc)
                self.errors.append(RowError(rows[0].index, field_name, message, "database"))
                return False
            middle = len(rows) // 2
            left, right = rows[:middle], rows[middle:]
            log.chunks_rerun += 2
            self._write_isolating(
                log, left, checkpoint=left[-1].index + 1, first=first, final=False
            )
            return self._write_isolating(
                log, right, checkpoint=checkpoint, first=first, final=final
            )

    def _commit_with_retries(
        self,
        log: BatchProcessingLog,
        rows: list[Prepared],
        *,
        checkpoint: int,
        first: int,
        final: bool,
    ) -> None:
        attempts = settings.BULK_RETRY_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                self._commit(log, rows, checkpoint=checkpoint, final=final)
                return
            except (IntegrityError, DataError):
                raise
            except (DatabaseError, InterfaceError, ChunkConflict) as exc:
                # InterfaceError (the connection is gone) is not a DatabaseError.
                if not is_transient(exc):
                    raise
                log.chunks_rolled_back += 1
                if self.connection.in_atomic_block:
                    # Inside a caller's transaction the chunk cannot be
                    # retried on its own: the caller owns the rollback.
                    raise
                self.connection.close_if_unusable_or_obsolete()
                if attempt == attempts:
                    raise TransientFailure(
                        RUN_FAILED_TRANSIENT.format(start=first, attempts=attempts, error=exc)
                    ) from exc
                log.chunks_retried += 1
                delay = backoff_delay(attempt)
                logger.info("retrying chunk at row %s in %.3fs after: %s", first, delay, exc)
                time.sleep(delay)

    def _commit(
        self,
        log: BatchProcessingLog,
        rows: list[Prepared],
        *,
        checkpoint: int,
        final: bool,
    ) -> None:
        creates_log = log.pk is None
        failures = log.after_commit_failures
        try:
            saved, outcome, errors = self._commit_chunk(
                log, rows, checkpoint=checkpoint, final=final
            )
        except BaseException:
            if creates_log:  # its INSERT was rolled back with the chunk
                log.pk = self.context.log_id = None
                log._state.adding = True
            raise
        # Only now, after the commit, does the run own what the chunk did.
        self.totals.merge(ChunkOutcome(outcome.written, outcome.created, outcome.updated))
        self.errors.extend(outcome.errors)
        self.committed_errors = len(errors)
        for name, value in saved.items():
            setattr(log, name, value)
        self.finished = "status" in saved
        if self.finished and log.after_commit_failures != failures:
            # The run's last side effects failed after its final checkpoint: one more UPDATE.
            self._save_quietly(log, ["after_commit_failures"])
        if creates_log and not self.finished and self.op.fills:
            self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        """After the first chunk: fresh statistics for a table the run fills from empty.

        Only on PostgreSQL, between chunks (no lock is held), and it never
        fails the run: a missed ANALYZE costs speed, not rows.
        """
        if not is_postgresql(self.op.using):
            return
        try:
            analyzed = analyze_if_empty(self.op.fills, using=self.op.using)
        except DatabaseError:
            logger.warning("batch run: could not analyze %s", self.op.fills, exc_info=True)
        else:
            if analyzed:
                logger.info("batch run: analyzed %s, filled from empty", ", ".join(analyzed))

    def _commit_chunk(
        self,
        log: BatchProcessingLog,
        rows: list[Prepared],
        *,
        checkpoint: int,
        final: bool,
    ) -> tuple[dict[str, Any], ChunkOutcome, list[RowError]]:
        """One chunk's transaction; see the module docstring for its lock timeline."""
        with transaction.atomic(using=self.op.using):
            if is_postgresql(self.op.using):
                begin_chunk(self.op.using)
            if log.pk is None and self.op.keys_in_database:
                # Its marks name the run: the row is created before the write.
                log.save(using=self.op.using)
                self.context.log_id = log.pk
            outcome = self.op.write(rows, self.context) if rows else ChunkOutcome()
            if self.op.keys_in_database:
                self._name_first_rows()
            if rows:
                transaction.on_commit(partial(self._after_commit, log, rows), using=self.op.using)
            totals = ChunkOutcome(
                written=self.totals.written + outcome.written,
                created=self.totals.created + outcome.created,
                updated=self.totals.updated + outcome.updated,
            )
            errors = self.errors + outcome.errors
            if not final:
                # A piece of a split chunk: the rows after it are not committed yet.
                errors = [error for error in errors if error.index < checkpoint]
            # The last chunk's checkpoint also finishes the run: one commit less.
            last = final and self._input_ended()
            saved = self._save_checkpoint(
                log, totals, errors, checkpoint, committed=int(final), last=last
            )
        return saved, outcome, errors

    def _after_commit(self, log: BatchProcessingLog, rows: list[Prepared]) -> None:
        """The operation's side effects of a committed chunk; they never fail the run.

        The chunk is committed whatever happens here: an error (a cache that
        is down) is logged and counted on the log row, saved with the next
        checkpoint or the end of the run.
        """
        try:
            self.op.committed(rows)
        except Exception:
            log.after_commit_failures += 1
            logger.exception(
                "batch run #%s: a side effect after the commit of rows %s-%s failed",
                log.pk,
                rows[0].index,
                rows[-1].index,
            )

    def _name_first_rows(self) -> None:
        """Make a repeat within the chunk name its key's first row in the whole run.

        The engine compares keys within a chunk: when rows j and i of a chunk
        share a key, i is reported as a repeat of j. If the write then finds
        j's key written by an earlier chunk (row f), j is a repeat of f, and
        so is i.
        """
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
            self._resumed_skipped = log.rows_skipped
            # Cost and time of the earlier attempts, as their checkpoints left them.
            self._earlier_queries = log.query_count
            self._earlier_duration = log.duration_seconds or 0.0
            log.resume_count += 1
            log.worker = worker
            log.heartbeat_at = now
            log.finished_at = None
            fields = ["status", "resume_count", "worker", "heartbeat_at", "finished_at"]
            if self.resume_log.status == BatchProcessingLog.Status.CANCELLED:
                # Resuming a cancelled run asks it to go on: its stop request is spent.
                log.stop_requested = False
                fields.append("stop_requested")
            else:
                self.stop_pending = log.stop_requested
            log.status = BatchProcessingLog.Status.RUNNING
            log.save(update_fields=fields)
            return log
        self._resumed_skipped = 0
        self._earlier_queries = 0
        self._earlier_duration = 0.0
        # Saved by the first chunk's transaction, or by the end of a run that
        # commits none (see _commit_chunk).
        return BatchProcessingLog(
            operation=self.op.operation,
            variant=self.op.variant,
            chunk_size=self.chunk_size,
            started_at=now,
            heartbeat_at=now,
            database_vendor=self.connection.vendor,
            worker=worker,
        )

    def _capped_errors(self, log: BatchProcessingLog, errors: list[RowError]) -> list[dict]:
        cap = settings.BULK_LOG_MAX_ROW_ERRORS
        earlier = log.row_errors if self.resume_log is not None else []
        kept = list(earlier[:cap]) if self.resume_log is not None else []
        kept.extend(error.as_dict() for error in errors[: max(cap - len(kept), 0)])
        return kept

    def _save_checkpoint(
        self,
        log: BatchProcessingLog,
        totals: ChunkOutcome,
        errors: list[RowError],
        checkpoint: int,
        *,
        committed: int,
        last: bool,
    ) -> dict[str, Any]:
        """Record the chunk's checkpoint and the run's figures in its transaction.

        Returns the figures that describe committed work, which the log
        object takes once the transaction has committed; for the ``last``
        chunk of the input, or a run asked to stop, also how the run ended.

        A chunk boundary with input left after it (``committed`` and not
        ``last``) is where a requested stop is honoured: the UPDATE's WHERE
        reads ``stop_requested``, so the check costs no query of its own.
        """
        figures = {
            "checkpoint_position": checkpoint,
            "rows_written": totals.written,
            "rows_created": totals.created,
            "rows_updated": totals.updated,
            "rows_skipped": self._resumed_skipped + len(errors),
            "row_errors": self._capped_errors(log, errors),
            "chunks_committed": log.chunks_committed + committed,
        }
        if last:
            figures.update(self._ending(figures, errors, failure=None))
        progress = self._progress(log)
        if log.pk is None:
            # The first checkpoint creates the row: one statement, not two. A
            # copy takes the figures, so a rollback leaves the log object as
            # the committed work left it. (Nobody can have asked it to stop.)
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
                progress = self._progress(log)
                checkpoints.update(**(progress | figures))
        # Not the chunk counters: the log object holds them, and a side effect
        # after this COMMIT may still count its failure there.
        return {name: progress[name] for name in ("query_count", "duration_seconds")} | figures

    def _progress(self, log: BatchProcessingLog) -> dict[str, Any]:
        """The run's cost and liveness so far, for a checkpoint UPDATE."""
        return {
            "chunks_rolled_back": log.chunks_rolled_back,
            "chunks_retried": log.chunks_retried,
            "chunks_rerun": log.chunks_rerun,
            "after_commit_failures": log.after_commit_failures,
            # So far, this checkpoint's own UPDATE included: a killed run's
            # cost and time still count when it is resumed.
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
        """How the run ended: its status, summary, end time and speed."""
        finished = timezone.now()
        duration = self._earlier_duration + (time.perf_counter() - self.started)
        if cancelled and failure is None:
            status = BatchProcessingLog.Status.CANCELLED
            summary = CANCELLED_AT.format(position=figures["checkpoint_position"])
        elif isinstance(failure, KeyboardInterrupt | SystemExit):
            status = BatchProcessingLog.Status.INTERRUPTED
            summary = f"interrupted by {type(failure).__name__}; resume with its id"
        elif failure is not None:
            status = BatchProcessingLog.Status.FAILED
            summary = f"{type(failure).__name__}: {failure}"[:2000]
        elif figures["rows_skipped"]:
            status = BatchProcessingLog.Status.PARTIAL
            summary = summarize(errors)
        else:
            status = BatchProcessingLog.Status.COMPLETED
            summary = ""
        return {
            "status": status,
            "error_summary": summary,
            "finished_at": finished,
            "heartbeat_at": finished,
            "duration_seconds": duration,
        }

    def _finish_log(
        self, log: BatchProcessingLog, started: float, *, failure: BaseException | None
    ) -> None:
        """Record how the run ended, unless its last chunk's checkpoint did.

        The row's figures are those its last checkpoint committed (see
        ``_commit``); only how the run ended is added here.
        """
        if self.finished:
            return
        figures = {"checkpoint_position": log.checkpoint_position, "rows_skipped": log.rows_skipped}
        for name, value in self._ending(
            figures,
            self.errors[: self.committed_errors],
            failure=failure,
            cancelled=self.stop_pending,
        ).items():
            setattr(log, name, value)
        # The final save counts itself, so query_count covers the whole run.
        log.query_count = self._earlier_queries + self.counter.count + 1
        if self.connection.in_atomic_block and self.connection.needs_rollback:
            # The caller's transaction is broken: its rollback would take the
            # log with it, so nothing more can be written through it here.
            return
        # No chunk committed: the row is created now, with how the run ended.
        # Otherwise not the figures: the checkpoints wrote them with the chunks.
        self._save_quietly(log, ENDING_FIELDS if log.pk is not None else None)

    def _save_quietly(self, log: BatchProcessingLog, fields: list[str] | None) -> None:
        try:
            log.save(using=self.op.using, update_fields=fields)
        except Error:
            # The database is unreachable: the run's outcome cannot be stored,
            # but must not hide the failure that brought us here.
            logger.exception("could not record the end of batch run #%s", log.pk)


def run_log_of(exc: BaseException) -> BatchProcessingLog | None:
    """The log row of the batch run that ``exc`` ended, if a run raised it.

    Its figures are those of the committed chunks: ``checkpoint_position``
    beyond where the run started means some of its input is in the database.
    """
    return getattr(exc, "batch_log", None)


def worker_name() -> str:
    """How a log row names the process running it: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def summarize(errors: list[RowError]) -> str:
    """'12 rows skipped: 10 not_found, 2 invalid'."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error.code] = counts.get(error.code, 0) + 1
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
    """Run ``operation`` over ``rows``; see the module docstring for the design."""
    return BatchRun(operation, chunk_size=chunk_size, resume=resume).run(rows)


def dry_run(
    operation: BatchOperation, rows: Iterable[Any], *, chunk_size: int | None = None
) -> DryRun:
    """What ``run_batch`` would do with ``rows``, writing nothing (see the module docstring).

    The operation must implement ``check``.
    """
    return BatchRun(operation, chunk_size=chunk_size).dry_run(rows)
