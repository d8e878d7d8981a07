"""Running bulk services from several threads at once, and injecting faults.

Threads stand in for concurrent workers: Django gives each thread its own
database connection, so each worker has its own session and its own
transactions, exactly as separate processes would. A worker connects first
and then waits on a ``threading.Barrier``, so all of them issue their first
chunk together instead of one finishing before the next has connected.

Every worker closes its connection in a ``finally``: a connection left open
would keep its pool slot (and, if a test failed mid-chunk, its locks) and
make the test database's teardown wait on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection

from batching.engine import BatchOperation, ChunkOutcome, Prepared, RunContext

# Generous: a worker that takes this long is stuck on a lock, not slow.
JOIN_TIMEOUT = 120.0


def require_postgresql() -> None:
    """Skip unless the tests run on PostgreSQL (row locks, concurrent writers).

    SQLite serialises writers on one file lock, so threads there prove nothing
    about row locking; the threaded tests are PostgreSQL's.
    """
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: concurrent writers and row locks")


@contextmanager
def live_session() -> Iterator[psycopg.Connection]:
    """A session of its own, outside Django: a customer's checkout, a staff
    member's save, or another run's transaction held open by the test."""
    params = connection.settings_dict
    with psycopg.connect(
        dbname=params["NAME"],
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        user=params["USER"] or None,
        password=params["PASSWORD"] or None,
    ) as session:
        yield session


def run_together[T](work: Sequence[Callable[[], T]]) -> list[T]:
    """Run each callable in its own thread, all released at once; results in order.

    The first exception raised by any worker is re-raised here, so a worker's
    failure fails the test instead of vanishing with its thread.
    """
    barrier = threading.Barrier(len(work))
    results: list[Any] = [None] * len(work)
    errors: list[BaseException | None] = [None] * len(work)

    def worker(position: int, job: Callable[[], T]) -> None:
        try:
            connection.ensure_connection()
            barrier.wait(timeout=JOIN_TIMEOUT)
            results[position] = job()
        except BaseException as exc:
            errors[position] = exc
            barrier.abort()  # release the others rather than leave them waiting
        finally:
            connection.close()

    threads = [
        threading.Thread(target=worker, args=(position, job), name=f"bulk-worker-{position}")
        for position, job in enumerate(work)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        pytest.fail(f"workers still running after {JOIN_TIMEOUT}s: {', '.join(stuck)}")
    # A worker that failed aborts the barrier; report its error, not the others'.
    first = next(
        (exc for exc in errors if exc and not isinstance(exc, threading.BrokenBarrierError)),
        next((exc for exc in errors if exc), None),
    )
    if first is not None:
        raise first
    return results


class DriverError(Exception):
    """Stands in for a psycopg error: the engine reads only its ``sqlstate``."""

    def __init__(self, sqlstate: str | None, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


type FaultPlan = Callable[[int], BaseException | None]


class FaultyWrite:
    """What ``inject_faults`` installed: the size of each call's rows, in order."""

    def __init__(self) -> None:
        self.calls: list[int] = []


def inject_faults(
    monkeypatch: pytest.MonkeyPatch, operation: type[BatchOperation], plan: FaultPlan
) -> FaultyWrite:
    """Replace ``operation``'s write for the rest of the test: do the real work, then maybe fail.

    The fault is raised *after* the real write, so the chunk's rows are
    already in its transaction when it fails: a test that finds them exactly
    once afterwards proves the rollback, not merely that nothing was written.
    ``plan`` maps the 1-based call number to the exception to raise (or None).
    """
    original = operation.write
    faulty = FaultyWrite()

    def write(op: BatchOperation, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        faulty.calls.append(len(rows))
        outcome = original(op, rows, run)
        error = plan(len(faulty.calls))
        if error is not None:
            raise error
        return outcome

    monkeypatch.setattr(operation, "write", write)
    return faulty


class _RecordingClock:
    """The ``time`` module as the engine sees it, with ``sleep`` recorded, not slept."""

    def __init__(self, delays: list[float]) -> None:
        self.sleep = delays.append

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The engine's backoff delays, recorded instead of slept.

    Only ``batching.engine``'s view of ``time`` is replaced: patching
    ``time.sleep`` itself would also record the sleeps of any other thread
    (a connection pool's, pytest's) in the same process.
    """
    delays: list[float] = []
    monkeypatch.setattr("batching.engine.time", _RecordingClock(delays))
    return delays


def transient_error(sqlstate: str | None, message: str) -> OperationalError:
    """An ``OperationalError`` as Django raises it: the driver's error as its cause."""
    error = OperationalError(message)
    error.__cause__ = DriverError(sqlstate, message)
    return error
