"""A job's input, staged once in the database, read by its partitions by range (docs/jobs.md).

Records are COPYed unparsed (``StagedRecord``); workers parse them and stage
their keys (``StagedKey``). A record whose key came earlier stands in as a
``RepeatedKey``; one that cannot be staged as text as a ``Refused``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import batched
from typing import Any, Protocol, runtime_checkable

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import OuterRef, Subquery

from batching.engine import BatchOperation, RowInvalid
from batching.portable import insert_rows
from batching.postgres import copy_escape, copy_rows, copy_text, is_postgresql
from batching.readers import JSONL, BadLine, parse_record
from batching.registry import operation_class
from jobs.models import Job, JobPartition, StagedKey, StagedRecord

STAGE_BATCH = 5_000
FIELDS = ("job", "number", "record", "refused")
# A NUL character in a row's JSON text (not an escaped backslash before "u0000").
NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
NUL_IN_ROW = "must not contain NUL characters"

# One encoder for every row: json.dumps(cls=...) would build one per call.
encode = DjangoJSONEncoder().encode


@dataclass(frozen=True, slots=True)
class RepeatedKey:
    """Stands in for a row whose key was first seen at ``first`` (job input index)."""

    first: int


@dataclass(frozen=True, slots=True)
class Refused:
    """A row its submitter refused before staging; given in ``rows`` in its place."""

    field: str
    message: str
    code: str = "invalid"


@runtime_checkable
class Records(Protocol):
    """Records to stage as they are: a file's (``batching.readers.RecordStream``)."""

    format: str
    columns: list[str] | None

    def batches(self) -> Iterator[list[Any]]:
        """The records in order, in lists: text, or a ``BadLine`` or ``Refused``."""
        ...


class JsonRows:
    """Rows given as dicts, staged as JSON Lines records."""

    format = JSONL
    columns: list[str] | None = None

    def __init__(self, rows: Iterable[Any]) -> None:
        self.rows = rows

    def batches(self) -> Iterator[list[Any]]:
        records = (row if isinstance(row, Refused) else encode(row) for row in self.rows)
        yield from map(list, batched(records, STAGE_BATCH))


def stage(job: Job, rows: Iterable[Any] | Records, *, using: str = "default") -> int:
    """Stage ``rows`` (dicts, or a file's ``Records``) as ``job``'s input; return the count.

    Sets (unsaved) the job's ``input_format`` and ``columns``. In the caller's transaction.
    """
    source = rows if isinstance(rows, Records) else JsonRows(rows)
    job.input_format, job.columns = source.format, source.columns
    batches = _stageable(job, source)
    if is_postgresql(using):
        blocks: Iterator[str] = (copy_block(job.pk, *batch) for batch in batches)
        if source is rows:  # a file; dict rows may come from the database: read here
            blocks = made_ahead(blocks)
        return copy_text(StagedRecord, FIELDS, blocks, using=using)
    count = 0
    for start, batch, _ in batches:
        rows = [(number, *_columns(record)) for number, record in enumerate(batch, start)]
        insert_rows(StagedRecord, FIELDS[1:], rows, constants={"job": job.pk}, using=using)
        count += len(batch)
        del batch, rows
    return count


def made_ahead[T](items: Iterator[T]) -> Iterator[T]:
    """``items``, each next one made in a helper thread while the caller uses this one
    (COPY waits on the database meanwhile); at most three are held."""
    done: Any = object()
    with ThreadPoolExecutor(1, "stage-ahead") as helper:
        upcoming = helper.submit(next, items, done)
        while (item := upcoming.result()) is not done:
            upcoming = helper.submit(next, items, done)
            yield item


def _stageable(job: Job, source: Records) -> Iterator[tuple[int, list[str | Refused], bool]]:
    """(first number, records, plain) for each batch of ``source``.

    Plain: one-line texts with nothing COPY escapes and no NUL (the common case).
    Otherwise each record that cannot be staged as text is refused.
    """
    start = 0
    for batch in source.batches():
        try:
            body = "\n".join(batch)
        except TypeError:  # a BadLine or Refused among the texts
            body = "\\"
        plain = body.count("\n") == len(batch) - 1 and not any(
            character in body for character in "\\\t\r\x00"
        )
        del body  # nothing of a batch is held while the next one is read
        if not plain:
            batch = [_refused(job, record) or record for record in batch]
        yield start, batch, plain
        start += len(batch)
        del batch


def _columns(record: str | Refused) -> tuple[str, dict[str, str] | None]:
    """(record, refused) as staged."""
    if isinstance(record, Refused):
        return "", asdict(record)
    return record, None


def copy_block(job_id: Any, start: int, batch: Sequence[str | Refused], plain: bool) -> str:
    """The batch (numbered from ``start``) as lines of COPY's text format (``FIELDS``)."""
    prefix = f"{job_id}\t"
    if plain:
        lines = enumerate(batch, start)
        return "".join([f"{prefix}{number}\t{text}\t\\N\n" for number, text in lines])
    escaped = []
    for number, (record, refused) in enumerate(map(_columns, batch), start):
        value = "\\N" if refused is None else copy_escape(encode(refused))
        escaped.append(f"{prefix}{number}\t{copy_escape(record)}\t{value}\n")
    return "".join(escaped)


def _refused(job: Job, record: str | BadLine | Refused) -> Refused | None:
    """Why a record cannot be staged as text; None if it can."""
    if isinstance(record, Refused):
        return record
    if isinstance(record, BadLine):
        error = record.error
        return Refused(error.field, error.message, error.code)
    if "\x00" not in record and not (job.input_format == JSONL and NUL.search(record)):
        return None  # no NUL, or (JSON) an escaped backslash before "u0000"
    row = parse_record(job.input_format, job.columns, record)
    if isinstance(row, BadLine):
        return _refused(job, row)
    try:
        operation_class(job.operation)().prepare(row)
    except RowInvalid as exc:
        return Refused(exc.field, exc.message, exc.code)
    return Refused("row", NUL_IN_ROW)


def key_partitions(
    partition: JobPartition, *, alive: Callable[[], Any] = lambda: None, using: str = "default"
) -> int:
    """Stage the keys of ``partition``'s records, then of every earlier partition's
    not keyed yet; return how many partitions this call keyed.

    Each under its row's lock, in its own transaction: of two workers keying one,
    the second finds it keyed (none waits for an absent one). ``alive`` is called after each.
    """
    job = partition.job
    operation = operation_class(job.operation)()
    if operation.key_field is None:
        return 0
    earlier = JobPartition.objects.using(using).filter(
        job=job, number__lt=partition.number, keyed=False
    )
    own = [] if partition.keyed else [partition.pk]
    pending = [*own, *earlier.order_by("number").values_list("pk", flat=True)]
    keyed = 0
    for pk in pending:
        with transaction.atomic(using=using):
            locked = (
                JobPartition.objects.using(using)
                .select_for_update()
                .filter(pk=pk, keyed=False)
                .values_list("start", "size")
                .first()
            )
            if locked is None:
                continue  # keyed meanwhile, by its own worker or another
            start, size = locked
            _stage_keys(job, operation, start, start + size, using)
            JobPartition.objects.using(using).filter(pk=pk).update(keyed=True)
            keyed += 1
        alive()
    return keyed


def _stage_keys(job: Job, operation: BatchOperation, start: int, stop: int, using: str) -> None:
    """Stage the keys of records ``start`` to ``stop - 1`` (one read, one write)."""
    records = (
        StagedRecord.objects.using(using)
        .filter(job=job, number__gte=start, number__lt=stop, refused__isnull=True)
        .order_by("number")
        .values_list("number", "record")
    )
    keys = []
    for number, record in records.iterator(chunk_size=STAGE_BATCH):
        row = parse_record(job.input_format, job.columns, record)
        try:
            key = operation.key(operation.prepare(row))
        except RowInvalid:
            continue  # no key: its run reports why
        if key is not None:  # as the engine: a row without a key repeats nothing
            keys.append((job.pk, number, encode(key)))
    insert = copy_rows if is_postgresql(using) else insert_rows
    insert(StagedKey, ("job", "number", "key"), keys, using=using)


def discard_keys(job_id: Any, *, using: str = "default") -> int:
    """Delete a job's staged keys, a partition's range at a time; return how many."""
    keys = StagedKey.objects.using(using).filter(job=job_id)
    ranges = JobPartition.objects.using(using).filter(job=job_id).values_list("start", "size")
    return sum(keys.filter(number__gte=s, number__lt=s + size).delete()[0] for s, size in ranges)


def staged_input(job: Job, start: int, stop: int) -> list[Any]:
    """Records ``start`` to ``stop - 1`` of a job's input, parsed, in order (one query).

    A row whose key came before (as far as keys are staged) is a ``RepeatedKey``.
    """
    key = StagedKey.objects.filter(job=OuterRef("job"), number=OuterRef("number")).values("key")
    first = (
        StagedKey.objects.filter(job=job.pk, key=OuterRef("key"), number__lt=OuterRef("number"))
        .order_by("number")
        .values("number")
    )
    rows = (
        StagedRecord.objects.filter(job=job.pk, number__gte=start, number__lt=stop)
        .annotate(key=Subquery(key[:1]))
        .annotate(first=Subquery(first[:1]))
        .order_by("number")
        .values_list("record", "refused", "first")
    )
    return [_as_input(job, record, refused, first) for record, refused, first in rows]


def _as_input(job: Job, record: str, refused: dict[str, str] | None, first: int | None) -> Any:
    if refused is not None:
        return Refused(**refused)
    if first is not None:
        return RepeatedKey(first)
    return parse_record(job.input_format, job.columns, record)


def partition_input(partition: JobPartition) -> Iterator[Any]:
    """The partition's rows (``staged_input``): one query, when the run first reads."""
    yield from staged_input(partition.job, partition.start, partition.start + partition.size)


def discard(partition: JobPartition) -> int:
    """Delete the partition's staged records (one DELETE, in the caller's transaction); how many."""
    deleted, _ = StagedRecord.objects.filter(
        job=partition.job_id,
        number__gte=partition.start,
        number__lt=partition.start + partition.size,
    ).delete()
    return deleted
