"""A job's input, staged once in the database, read by its partitions by range.

The submitting process streams the input through: each row is written as it
is read (COPY on PostgreSQL, batches of ``STAGE_BATCH`` elsewhere), so its
memory stays flat whatever the input's size, and the partitions name ranges
of row numbers instead of carrying copies. Every worker that reaches the
database reaches the input.

Keys repeated across partitions are found here too: each row's key (the
operation's own ``prepare`` and ``key``) is staged beside it, and one window
query afterwards marks every row whose key came before with the number where
it first came. Rows that fail ``prepare`` are staged with an empty key; their run
reports them.

A submitter that knows a row is bad before staging it (a line its reader
could not parse, which is no JSON to stage) passes a ``Refused`` in its
place: its error is staged, and the run reports it at the row's index like
any invalid row, so the indexes of the staged input are those of the input.
A row holding a NUL character, which PostgreSQL's ``jsonb`` cannot store, is
staged refused too, with the error the operation's ``prepare`` gives it (the
one its run would report), on every database alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import F, Window
from django.db.models.functions import FirstValue
from psycopg.types.json import Jsonb

from batching.engine import BatchOperation, RowInvalid, chunked
from batching.postgres import copy_rows, is_postgresql
from jobs.models import Job, JobPartition, StagedRow

STAGE_BATCH = 5_000
FIELDS = ("job", "number", "data", "key", "refused")
# A NUL character in the JSON text of a row (an escaped backslash before
# "u0000" is not one).
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


def stage(job: Job, op: BatchOperation, rows: Iterable[Any], *, using: str = "default") -> int:
    """Stage ``rows`` as ``job``'s input, in a stream; return how many there were.

    Runs inside the caller's transaction: a submit that fails stages nothing.
    """
    staged = _keyed(job, op, rows)
    if is_postgresql(using):
        count = copy_rows(
            StagedRow,
            FIELDS,
            (
                # The row's JSON text is made once, by _keyed.
                (job, number, Jsonb(text, dumps=str), key, refused and Jsonb(refused))
                for job, number, _, text, key, refused in staged
            ),
            using=using,
        )
    else:
        count = 0
        queryset = StagedRow.objects.using(using)
        for batch in chunked(staged, STAGE_BATCH):
            queryset.bulk_create(
                StagedRow(job_id=job_id, number=number, data=data, key=key, refused=refused)
                for job_id, number, data, _, key, refused in batch
            )
            count += len(batch)
    if op.key_field is not None:
        mark_repeats(job, using=using)
    return count


def _keyed(job: Job, op: BatchOperation, rows: Iterable[Any]) -> Iterator[tuple]:
    """(job, number, data, its JSON text, key, refused) for each row."""
    keyed = op.key_field is not None
    job_id = job.pk
    for number, raw in enumerate(rows):
        text = "" if isinstance(raw, Refused) else encode(raw)
        if "\\u0000" in text and NUL.search(text):
            raw = _refusal(op, raw)
        if isinstance(raw, Refused):
            yield job_id, number, {}, "{}", "", asdict(raw)
            continue
        if not keyed:
            key = ""
        else:
            try:
                key = encode(op.key(op.prepare(raw)))
            except RowInvalid:
                key = ""  # staged without one: its run reports why
        yield job_id, number, raw, text, key, None


def _refusal(op: BatchOperation, raw: Any) -> Refused:
    """A row that cannot be staged as it is: refused with the error its run would report."""
    try:
        op.prepare(raw)
    except RowInvalid as exc:
        return Refused(exc.field, exc.message, exc.code)
    return Refused("row", NUL_IN_ROW)


def mark_repeats(job: Job, *, using: str = "default") -> int:
    """Set ``first`` on every staged row whose key came earlier; return how many.

    One query sorts the keyed rows by key (a window over them); only the
    repeats travel back, and they are updated in batches.
    """
    rows = (
        StagedRow.objects.using(using)
        .filter(job=job)
        .exclude(key="")
        .annotate(
            first_number=Window(FirstValue("number"), partition_by=[F("key")], order_by="number")
        )
        .filter(first_number__lt=F("number"))
        .values_list("pk", "first_number")
    )
    repeats = [StagedRow(pk=pk, first=first) for pk, first in rows.iterator(chunk_size=STAGE_BATCH)]
    StagedRow.objects.using(using).bulk_update(repeats, ["first"], batch_size=STAGE_BATCH)
    return len(repeats)


def staged_input(job_id: Any, start: int, stop: int) -> list[Any]:
    """Rows ``start`` to ``stop - 1`` of a job's input, in order, as its runs take them.

    One query. A row whose key came before stands in as a ``RepeatedKey``, a
    refused one as its ``Refused`` (``jobs.tasks.partition_operation``
    reports both).
    """
    rows = (
        StagedRow.objects.filter(job=job_id, number__gte=start, number__lt=stop)
        .order_by("number")
        .values_list("data", "first", "refused")
    )
    return [_as_input(data, first, refused) for data, first, refused in rows]


def _as_input(data: Any, first: int | None, refused: dict[str, str] | None) -> Any:
    if refused is not None:
        return Refused(**refused)
    return data if first is None else RepeatedKey(first)


def partition_input(partition: JobPartition) -> Iterator[Any]:
    """The partition's rows (``staged_input``): one query, when the run first reads."""
    yield from staged_input(partition.job_id, partition.start, partition.start + partition.size)


def discard(partition: JobPartition) -> int:
    """Delete the partition's staged rows (it ended, never to run again); return how many.

    One DELETE of at most ``JOB_PARTITION_ROWS`` rows, in the caller's transaction.
    """
    deleted, _ = StagedRow.objects.filter(
        job=partition.job_id,
        number__gte=partition.start,
        number__lt=partition.start + partition.size,
    ).delete()
    return deleted
