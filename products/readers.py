"""Streaming readers for import files: CSV or JSON Lines, optionally gzipped.

A ``RowStream`` yields one row at a time and holds one line (one CSV record)
at a time, so a file of any size is imported in the memory of one chunk. The
format comes from the name (``.csv``, ``.jsonl``/``.ndjson``, each optionally
``.gz``) unless given.

Bad lines do not stop the stream. A line that cannot be parsed (invalid JSON,
a CSV record with the wrong number of fields, bytes that are not UTF-8) is
yielded as a ``BadLine``; the service rejects it like any invalid row, with the
reader's reason, and goes on with the next line.

Limits
------
Whatever the file holds, a stream holds at most one bounded line in memory
and inflates a bounded number of bytes; every import (the admin's, the
commands', the benchmark's) reads through here, so they share these limits:

- A line longer than ``settings.IMPORT_MAX_LINE_LENGTH`` characters (a CSV
  record: all its lines together, line breaks included) is a ``BadLine``. It
  is read in bounded pieces and dropped, never held whole: a gigabyte with no
  line break costs a megabyte, not a gigabyte.
- A gzipped file is refused with ``InputTooLarge`` (a ``ReaderError``) once it
  has inflated to more than ``settings.IMPORT_MAX_DECOMPRESSED_BYTES``, which
  stops a "gzip bomb" (a small file of gigabytes of zeros) where it starts.
  A plain file is not capped here: its size on disk is what it is (the admin
  caps uploads with ``ADMIN_IMPORT_MAX_BYTES``).

Row indexes and line numbers
----------------------------
The services report rows by their 0-based index in the stream. Blank lines
are skipped and a quoted CSV field may span several lines, so the line of a
row is not always ``index + 2`` (CSV) or ``index + 1`` (JSON Lines).
``RowStream.line_of(index)`` gives the exact line where a row starts. It keeps
one entry per change of the gap between index and line (one per blank line or
multi-line record, none for a regular file), not one per row: ``line_map()``
hands that table over, so whoever keeps only the errors' indexes (the admin's
import) tells their lines later without reading the file again (``line_at``).

Skipping blank lines is deterministic, so the same file always yields the
same rows at the same indexes: a resumed run skips exactly the rows that its
checkpoint counts.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from django.conf import settings

from batching.engine import RowInvalid

CSV = "csv"
JSONL = "jsonl"
FORMATS = (CSV, JSONL)
EXTENSIONS = {".csv": CSV, ".jsonl": JSONL, ".ndjson": JSONL}

UNKNOWN_EXTENSION = (
    "cannot tell the format of {name}: name it .csv, .jsonl or .ndjson (optionally .gz) "
    "or pass --format"
)
UNKNOWN_FORMAT = "unknown format {format!r}: choose one of {choices}"
NO_HEADER = "{name} has no header row (the first line must name the columns)"
BLANK_COLUMN = "{name}: column {position} of the header has no name"
DUPLICATE_COLUMN = "{name}: the header names column {column!r} twice"
WRONG_FIELD_COUNT = "expected {expected} fields as in the header, found {found}"
NOT_CSV = "not valid CSV: {error}"
NOT_JSON = "not valid JSON: {error} (column {column})"
NOT_UTF8 = "not valid UTF-8 text"
LINE_TOO_LONG = (
    "longer than {limit:,} characters (settings.IMPORT_MAX_LINE_LENGTH); the line is skipped"
)
HEADER_TOO_LONG = (
    "{name}: the header is longer than {limit:,} characters (settings.IMPORT_MAX_LINE_LENGTH)"
)
TOO_LARGE_DECOMPRESSED = (
    "{name} is larger than {limit:,} bytes once decompressed "
    "(settings.IMPORT_MAX_DECOMPRESSED_BYTES)"
)

# Bytes that are not UTF-8 are decoded with "surrogateescape" into lone
# surrogates rather than raising: one bad line must not end the stream.
UNDECODABLE = re.compile(r"[\udc80-\udcff]")

BLOCK_SIZE = 1 << 20


class ReaderError(ValueError):
    """The file cannot be read as a whole (unknown format, no header row)."""


class InputTooLarge(ReaderError):
    """A gzipped file inflates to more than ``settings.IMPORT_MAX_DECOMPRESSED_BYTES``."""


class LineTooLong(Exception):
    """Raised by ``Lines`` for a line over the bound; the reader turns it into a ``BadLine``."""


class BadLine(Mapping[str, Any]):
    """A line that could not be parsed, yielded in place of its row.

    It is a Mapping so that it passes the row parsers' "row must be an object"
    check; reading any field then raises ``RowInvalid`` with the reader's
    reason. The engine records that like any invalid row, so the run's result,
    its log and the command all show the real cause ("not valid JSON: ...")
    at the right index, with no side channel between reader and command.
    """

    __slots__ = ("line", "reason")

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason

    @property
    def error(self) -> RowInvalid:
        """What reading any field raises: the reader's reason, on the whole row."""
        return RowInvalid("row", self.reason, "unreadable")

    def __getitem__(self, key: str) -> Any:
        raise self.error

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"BadLine(line={self.line}, reason={self.reason!r})"


def detect_format(path: Path, format: str | None = None) -> tuple[str, bool]:
    """(format, gzipped) from ``format`` or the file name; ``.gz`` always means gzip."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    gzipped = suffixes[-1:] == [".gz"]
    if gzipped:
        suffixes.pop()
    if format is not None:
        if format not in FORMATS:
            raise ReaderError(UNKNOWN_FORMAT.format(format=format, choices=", ".join(FORMATS)))
        return format, gzipped
    base = suffixes[-1] if suffixes else ""
    if base not in EXTENSIONS:
        raise ReaderError(UNKNOWN_EXTENSION.format(name=path.name))
    return EXTENSIONS[base], gzipped


class Inflated(io.RawIOBase):
    """The decompressed bytes of a gzip file (``gzip.open``), refused past ``limit``.

    Counted as they are read, so the file is never inflated further than the
    limit (plus one block): the cap costs nothing and needs no first pass.
    """

    def __init__(self, file: gzip.GzipFile, limit: int, name: str) -> None:
        self._gzip = file
        self.limit = limit
        self.name = name
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._gzip.readinto(buffer)
        self.total += count
        if self.total > self.limit:
            raise InputTooLarge(TOO_LARGE_DECOMPRESSED.format(name=self.name, limit=self.limit))
        return count

    def close(self) -> None:
        self._gzip.close()
        super().close()


class Lines(Iterator[str]):
    """The physical lines of a text file, each read in at most ``limit`` characters.

    ``limit`` bounds a record, not only a line: the reader calls
    ``new_record()`` before each row, and the lines of a multi-line CSV record
    share one budget. A line over the budget raises ``LineTooLong``; the next
    call first reads past the rest of that line in bounded pieces and drops
    them. The iterator stays usable after raising (a class, not a generator,
    for that), so the csv module's reader goes on with the next line.
    """

    def __init__(self, file: IO[str], limit: int) -> None:
        self._file = file
        self.limit = limit
        self.number = 0  # physical lines read so far, the dropped ones too
        self._budget = limit
        self._skipping = False

    def new_record(self) -> None:
        self._budget = self.limit

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        if self._skipping:
            self._skipping = False
            while (rest := self._file.readline(BLOCK_SIZE)) and not rest.endswith(("\n", "\r")):
                pass
        line = self._file.readline(self._budget + 1)
        if not line:
            raise StopIteration
        self.number += 1
        if len(line) > self._budget:
            # A whole line of exactly budget + 1 characters ends with its break.
            self._skipping = not line.endswith(("\n", "\r"))
            self._budget = self.limit
            raise LineTooLong(self.number)
        self._budget -= len(line)
        return line


def line_at(line_map: Sequence[Sequence[int]], index: int) -> int:
    """The line of row ``index``, from a ``RowStream.line_map()`` (or its JSON)."""
    position = bisect_right(line_map, index, key=itemgetter(0)) - 1
    if position < 0:
        raise IndexError(f"row {index} has not been read")
    return index + line_map[position][1]


class RowStream(Iterator[Mapping[str, Any]]):
    """Rows of one CSV or JSON Lines file, read lazily; see the module docstring.

    The file is opened (and a CSV header read) on construction, so a missing
    file or a bad header fails before any run starts. Use it as a context
    manager to close the file. ``path`` may also be a binary file object
    (an upload): it is read from where it stands, ``name`` then names its
    format, and closing the stream closes it.

    Reading it may raise ``InputTooLarge`` (see Limits above), and for a
    damaged gzip file ``EOFError``, ``zlib.error`` or ``gzip.BadGzipFile``.

    Raises:
        OSError: the file cannot be opened.
        ReaderError: unknown format or a CSV file without a usable header.
    """

    def __init__(
        self,
        path: str | Path | IO[bytes],
        *,
        format: str | None = None,
        name: str | None = None,
    ) -> None:
        self.source: IO[bytes] | None = None
        if isinstance(path, (str, Path)):
            self.path = Path(path)
        else:
            self.source, self.path = path, Path(name or "")
        # How messages name the file.
        self.name = name or self.path.name
        self.format, self.gzipped = detect_format(self.path, format)
        self.max_line = settings.IMPORT_MAX_LINE_LENGTH
        self.rows_yielded = 0
        # line_of(): (start, offset): line = index + offset for indexes from start on.
        self._line_map: list[tuple[int, int]] = []
        self._file = self._open()
        try:
            self._rows = self._csv_rows() if self.format == CSV else self._jsonl_rows()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> IO[str]:
        # utf-8-sig drops the byte order mark spreadsheets put before the
        # header; newline="" lets the csv module see quoted line breaks.
        options: dict[str, Any] = {
            "encoding": "utf-8-sig",
            "errors": "surrogateescape",
            "newline": "",
        }
        if self.gzipped:
            if self.source is None:
                gz = gzip.open(self.path, "rb")  # noqa: SIM115 - closed with the text file
            else:
                gz = gzip.GzipFile(fileobj=self.source, mode="rb")
            inflated = Inflated(gz, settings.IMPORT_MAX_DECOMPRESSED_BYTES, self.name)
            return io.TextIOWrapper(io.BufferedReader(inflated), **options)
        if self.source is not None:
            return io.TextIOWrapper(self.source, **options)
        return open(self.path, **options)

    # -- iteration -------------------------------------------------------------

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Mapping[str, Any]:
        return next(self._rows)

    def _emit(self, line: int, row: Mapping[str, Any]) -> Mapping[str, Any]:
        offset = line - self.rows_yielded
        if not self._line_map or self._line_map[-1][1] != offset:
            self._line_map.append((self.rows_yielded, offset))
        self.rows_yielded += 1
        return row

    def _csv_rows(self) -> Iterator[Mapping[str, Any]]:
        """Read the header now; return a generator of the records after it."""
        lines = Lines(self._file, self.max_line)
        reader = csv.reader(lines)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise ReaderError(f"{self.name}: {NOT_CSV.format(error=exc)}") from exc
        except LineTooLong as exc:
            message = HEADER_TOO_LONG.format(name=self.name, limit=self.max_line)
            raise ReaderError(message) from exc
        if not header or not any(name.strip() for name in header):
            raise ReaderError(NO_HEADER.format(name=self.name))
        names = [name.strip() for name in header]
        seen: set[str] = set()
        for position, name in enumerate(names, start=1):
            if not name:
                raise ReaderError(BLANK_COLUMN.format(name=self.name, position=position))
            if name in seen:
                raise ReaderError(DUPLICATE_COLUMN.format(name=self.name, column=name))
            seen.add(name)
        if any(UNDECODABLE.search(name) for name in names):
            raise ReaderError(f"{self.name}: the header is {NOT_UTF8}")

        def records() -> Iterator[Mapping[str, Any]]:
            # lines.number counts physical lines read so far (reader.line_num
            # leaves out a line dropped as too long), so a record starts on the
            # line after the previous record ended.
            while True:
                start = lines.number + 1
                lines.new_record()
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield self._emit(start, BadLine(start, NOT_CSV.format(error=exc)))
                    continue
                except LineTooLong:
                    reason = LINE_TOO_LONG.format(limit=self.max_line)
                    yield self._emit(start, BadLine(start, reason))
                    continue
                if not record:
                    continue  # a blank line
                if UNDECODABLE.search("".join(record)):
                    yield self._emit(start, BadLine(start, NOT_UTF8))
                elif len(record) != len(names):
                    reason = WRONG_FIELD_COUNT.format(expected=len(names), found=len(record))
                    yield self._emit(start, BadLine(start, reason))
                else:
                    yield self._emit(start, dict(zip(names, record, strict=True)))

        return records()

    def _jsonl_rows(self) -> Iterator[Mapping[str, Any]]:
        # A JSON value that is not an object is yielded as it is: the row
        # parser rejects it with its own "row must be an object" message.
        lines = Lines(self._file, self.max_line)
        while True:
            lines.new_record()
            try:
                line = next(lines)
            except StopIteration:
                return
            except LineTooLong:
                reason = LINE_TOO_LONG.format(limit=self.max_line)
                yield self._emit(lines.number, BadLine(lines.number, reason))
                continue
            number = lines.number
            if not line.strip():
                continue  # a blank line, typically the last one
            if UNDECODABLE.search(line):
                yield self._emit(number, BadLine(number, NOT_UTF8))
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                reason = NOT_JSON.format(error=exc.msg, column=exc.colno)
                yield self._emit(number, BadLine(number, reason))
                continue
            yield self._emit(number, value)

    # -- positions ---------------------------------------------------------------

    def line_of(self, index: int) -> int:
        """The line on which the row at ``index`` (0-based, already read) starts."""
        return line_at(self._line_map, index)

    def line_map(self) -> list[tuple[int, int]]:
        """(first index, line - index) from that index on, for ``line_at``: the rows read so far."""
        return list(self._line_map)

    def count_rest(self) -> int:
        """Read the rest of the file without parsing it; the number of lines in it.

        Inflating the rest enforces the decompressed cap on the whole file
        (``InputTooLarge``) at the cost of the decompression alone; its lines
        are about the rows left (see ``estimate_total``). The stream is
        exhausted afterwards.
        """
        lines = 0
        last = "\n"
        while block := self._file.read(BLOCK_SIZE):
            lines += block.count("\n")
            last = block[-1]
        return lines if last == "\n" else lines + 1

    def estimate_total(self) -> int | None:
        """About how many rows the file holds, from a fast count of its line breaks.

        Blank lines and multi-line CSV records make it an estimate, good for a
        progress bar only. None for a gzipped file (it would mean decompressing
        it twice) or anything that is not a regular file (a pipe).
        """
        if self.gzipped or self.source is not None or not self.path.is_file():
            return None
        lines = 0
        last = b"\n"
        with open(self.path, "rb") as raw:
            while block := raw.read(BLOCK_SIZE):
                lines += block.count(b"\n")
                last = block[-1:]
        if last != b"\n":
            lines += 1  # the last line has no line break
        header = 1 if self.format == CSV else 0
        return max(lines - header, 0)

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        self._file.close()
        if self.source is not None:
            self.source.close()  # a GzipFile leaves the file it was given open

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
