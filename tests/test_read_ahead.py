"""The engine's read-ahead, on any database.

A toy operation creates categories by name and reports the names that exist.
A keyed one shows that the read-ahead leaves the keys to the run's thread.
"""

import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from batching import engine
from batching.engine import (
    BatchOperation,
    ChunkOutcome,
    Prepared,
    RowError,
    RowInvalid,
    RunContext,
    run_batch,
)
from batching.models import BatchProcessingLog
from products.models import Category

pytestmark = pytest.mark.django_db

NAME_TAKEN = "category {name} exists"


class Categories(BatchOperation):
    operation = BatchProcessingLog.Operation.PRODUCTS
    variant = BatchProcessingLog.Variant.OPTIMIZED

    def __init__(self, using: str = "default") -> None:
        super().__init__(using)
        self.events: list[tuple[str, int]] = []

    def prepare(self, raw):
        if not isinstance(raw, str):
            raise RowInvalid("row", "must be a name")
        return raw

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        self.events.append(("checked", len(rows)))
        taken = set(
            Category.objects.filter(name__in=[row.item for row in rows]).values_list(
                "name", flat=True
            )
        )
        outcome = ChunkOutcome()
        fresh = []
        for row in rows:
            if row.item in taken:
                message = NAME_TAKEN.format(name=row.item)
                outcome.errors.append(RowError(row.index, "row", message, "duplicate"))
            else:
                fresh.append(Category(name=row.item))
        Category.objects.bulk_create(fresh)
        outcome.written = outcome.created = len(fresh)
        return outcome


def recorded(names: list, events: list) -> Iterator:
    for index, name in enumerate(names):
        events.append(("read", index))
        yield name


def test_each_chunk_after_the_first_is_read_ahead_by_the_helper():
    operation = Categories()
    readers: list[str] = []

    def names() -> Iterator[str]:
        for name in recorded(["a", "b", "c", "d", "e", "f", "g"], operation.events):
            readers.append(threading.current_thread().name)
            yield name

    result = run_batch(operation, names(), chunk_size=3)

    assert (result.status, result.written) == ("completed", 7)
    main = threading.current_thread().name
    # The run's thread reads the first chunk, and the first row of each next
    # one (is there a chunk to read ahead?); the helper reads the rest of
    # each while the chunk before is written.
    helper = "batch-read-ahead_0"
    assert readers == [main] * 4 + [helper] * 2 + [main]
    assert [event for event in operation.events if event[0] == "checked"] == [
        ("checked", 3),
        ("checked", 3),
        ("checked", 1),
    ]
    assert result.log.chunks_committed == 3
    assert result.log.checkpoint_position == 7
    assert not [t for t in threading.enumerate() if t.name.startswith("batch-read-ahead")]


def test_a_chunk_read_ahead_names_its_refused_rows_without_a_rollback():
    Category.objects.create(name="taken")
    operation = Categories()

    result = run_batch(operation, iter(["a", "b", 1, "taken", "c", 2]), chunk_size=3)

    assert sorted(Category.objects.values_list("name", flat=True)) == ["a", "b", "c", "taken"]
    # In input order, though the second chunk's rows were prepared by the
    # helper while the first chunk committed.
    assert [(e.index, e.message) for e in result.errors] == [
        (2, "must be a name"),
        (5, "must be a name"),
        (3, NAME_TAKEN.format(name="taken")),
    ]
    assert (result.log.chunks_committed, result.log.chunks_rolled_back) == (2, 0)


def test_an_input_that_fails_while_read_ahead_fails_the_run_after_the_chunk_before():
    def names() -> Iterator[str]:
        yield from ["a", "b"]
        raise OSError("the file went away")

    with pytest.raises(OSError, match="went away"):
        run_batch(Categories(), names(), chunk_size=2)

    assert sorted(Category.objects.values_list("name", flat=True)) == ["a", "b"]
    log = BatchProcessingLog.objects.get()
    assert (log.status, log.checkpoint_position, log.rows_written) == ("failed", 2, 2)


class InterruptedAfterCommit(Categories):
    def committed(self, rows: list[Prepared]) -> None:
        # An error here is only logged (the chunk is committed); an interrupt
        # arriving at this moment still ends the run.
        raise KeyboardInterrupt


@pytest.mark.django_db(transaction=True)  # on_commit callbacks run only on a real commit
def test_a_failing_run_stops_its_read_ahead_before_it_returns():
    resume = threading.Event()
    read: list[str] = []

    def names() -> Iterator[str]:
        for name in ["a", "b", "c", "d", "e", "f"]:
            if name == "d":
                # The helper reads here while the run fails; it goes on
                # only once the run has asked it to stop.
                resume.wait(timeout=0.5)
            read.append(name)
            yield name

    with pytest.raises(KeyboardInterrupt):
        run_batch(InterruptedAfterCommit(), names(), chunk_size=2)

    assert not [t for t in threading.enumerate() if t.name.startswith("batch-read-ahead")]
    # It stopped after its current row instead of reading its whole chunk
    # ("c" was read by the run, to know whether the first chunk was the last).
    assert read == ["a", "b", "c", "d"]


def test_a_run_of_one_chunk_starts_no_helper(monkeypatch):
    started: list[object] = []
    monkeypatch.setattr(engine, "ReadAhead", lambda *args: started.append(args))

    result = run_batch(Categories(), iter(["a", "b", "c"]), chunk_size=3)

    assert (result.status, result.written, started) == ("completed", 3, [])


def test_an_input_of_only_invalid_rows_commits_its_checkpoint():
    operation = Categories()
    result = run_batch(operation, iter([1, 2, 3]), chunk_size=2)
    assert (result.status, result.read, result.skipped) == ("partial", 3, 3)
    assert operation.events == []
    assert result.log.checkpoint_position == 3


class KeyedCategories(BatchOperation):
    """Categories by name; a repeated name is refused."""

    operation = BatchProcessingLog.Operation.PRODUCTS
    variant = BatchProcessingLog.Variant.OPTIMIZED

    def __init__(self, using: str = "default") -> None:
        super().__init__(using)
        self.prepared_in: list[tuple[str, str]] = []

    def prepare(self, raw):
        self.prepared_in.append((raw, threading.current_thread().name))
        return raw

    def key(self, item):
        return item

    def write(self, rows: list[Prepared], run: RunContext) -> ChunkOutcome:
        Category.objects.bulk_create([Category(name=row.item) for row in rows])
        return ChunkOutcome(written=len(rows), created=len(rows))


def test_a_keyed_operation_is_read_ahead_and_its_keys_compared_across_chunks():
    operation = KeyedCategories()

    result = run_batch(operation, iter(["a", "b", "a", "c", "b"]), chunk_size=2)

    assert sorted(Category.objects.values_list("name", flat=True)) == ["a", "b", "c"]
    assert [(e.index, e.code) for e in result.errors] == [(2, "duplicate"), (4, "duplicate")]
    assert "first seen at row 1" in result.errors[1].message
    main = threading.current_thread().name
    # The first chunk is parsed by the run's thread, the later ones by the
    # helper (the second while the first is parsed and written).
    threads = Counter(thread for _, thread in operation.prepared_in)
    assert threads == {main: 2, "batch-read-ahead_0": 3}
    assert result.log.chunks_committed == 3


def test_the_helper_offers_the_gil_to_the_run_every_few_rows(monkeypatch):
    """A chunk read ahead gives the run's thread its turn every ``YIELD_EVERY`` rows."""
    monkeypatch.setattr(engine, "YIELD_EVERY", 4)
    offered: list[str] = []
    monkeypatch.setattr(
        engine, "offer_gil", lambda: offered.append(threading.current_thread().name)
    )
    names = [f"category {number}" for number in range(19)]
    result = run_batch(Categories(), iter(names), chunk_size=10)

    assert (result.status, result.written) == ("completed", 19)
    # The second chunk's rows 1 to 9 are the helper's (the run's thread read
    # its first): at the helper's 1st, 5th and 9th row.
    assert offered == ["batch-read-ahead_0"] * 3
