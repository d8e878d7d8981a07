"""Readers for import files: CSV or JSON Lines, optionally gzipped; every import reads here.

``RecordStream`` splits a file into records, as text, a block at a time;
``parse_record`` reads one record into a row; ``RowStream`` does both. A line
that cannot be read becomes a ``BadLine`` and the stream goes on. A block of
plain records (one a line, no blank or overlong line, no bad byte, no quoted
line break) is split with one ``str.split``; any other is read record by
record. Memory stays a few blocks and one bounded record. Blank lines are
skipped deterministically, so a resume skips exactly its checkpoint's rows.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import partial
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Self, cast

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
# A JSON Lines line that starts with white space (a blank one among them).
SPACE_AFTER_LINE_BREAK = re.compile(r"\n\s")

BLOCK_SIZE = 1 << 20
# The file is read ahead in reads of this many bytes (as ``open()`` would).
READ_SIZE = io.DEFAULT_BUFFER_SIZE


class ReaderError(ValueError):
    """The file cannot be read as a whole (unknown format, no header row)."""


class InputTooLarge(ReaderError):
    """A gzipped file inflates to more than ``settings.IMPORT_MAX_DECOMPRESSED_BYTES``."""


class LineTooLong(Exception):
    """Raised by ``Lines`` for a line over the bound; the reader turns it into a ``BadLine``."""


class BadLine(Mapping[str, Any]):
    """A line that could not be read, yielded in place of its row: a Mapping (it passes
    the parsers' "row must be an object" check) whose every field raises ``RowInvalid``."""

    __slots__ = ("line", "reason")

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason

    @property
    def error(self) -> RowInvalid:
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
    """The decompressed bytes of a gzip file, refused once more than ``limit`` are read."""

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
    """The physical lines of a file, decoded as ``open(encoding="utf-8-sig",
    errors="surrogateescape", newline="")`` would.

    ``limit`` bounds a record (``new_record()`` starts the budget a multi-line CSV
    record's lines share). A line over it raises ``LineTooLong`` and the next call
    drops its rest in bounded pieces: a class, not a generator, stays usable after
    raising. The fast path takes whole blocks (``block()``, ``take()``) or has one
    read line by line (``read_on()``).
    """

    def __init__(self, file: IO[bytes], limit: int) -> None:
        self._read = getattr(file, "read1", file.read)
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")
        self.limit = limit
        self.number = 0  # physical lines read so far, the dropped ones too
        self.taken: list[str] = []  # the lines of the current record
        self.ended = False  # the file has been read to its end
        self._budget = limit
        self._skipping = False
        self._text = ""  # read ahead, from self._at on
        self._at = 0
        self._until = 0  # read_on(): the end of the block read line by line
        self._eof = False
        self._error: Exception | None = None  # a read error, raised by the next read

    def new_record(self) -> None:
        self._budget = self.limit
        self.taken = []

    def record(self) -> str:
        """The lines read since ``new_record()``, without the last line break (unless the
        file ended the record, in an open quote: the break is inside a field)."""
        text = "".join(self.taken)
        return text if self.ended else text.removesuffix("\n").removesuffix("\r")

    @property
    def idle(self) -> bool:
        """Past the block given to ``read_on()``, between records: ``block()`` may go on."""
        return self._at >= self._until and not self._skipping

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        if self._skipping:
            self._skipping = False
            while (rest := self._readline(BLOCK_SIZE)) and not rest.endswith(("\n", "\r")):
                pass
        line = self._readline(self._budget + 1)
        if not line:
            self.ended = True
            raise StopIteration
        self.number += 1
        if len(line) > self._budget:
            # A whole line of exactly budget + 1 characters ends with its break.
            self._skipping = not line.endswith(("\n", "\r"))
            self._budget = self.limit
            raise LineTooLong(self.number)
        self._budget -= len(line)
        self.taken.append(line)
        return line

    def block(self) -> str:
        """Whole lines read ahead (only when none is left), up to about ``BLOCK_SIZE``
        characters; "" at the end; with no line break within the limit, the text up to it."""
        while True:
            text, at = self._text, self._at
            if (first := text.find("\n", at, at + self.limit + 1)) >= 0:
                return text[at : max(first, text.rfind("\n", at, at + BLOCK_SIZE)) + 1]
            ahead = len(text) - at
            if ahead > self.limit or self._eof:
                return text[at : at + self.limit + 1]
            self._fill(BLOCK_SIZE - ahead if ahead < BLOCK_SIZE else self.limit + 1 - ahead)

    def take(self, block: str, lines: int) -> None:
        """Pass over ``block`` (from ``block()``), its ``lines`` lines read by the fast path."""
        self._at += len(block)
        self.number += lines

    def read_on(self, block: str) -> None:
        """Have ``block`` (from ``block()``) read line by line: ``idle`` again once past it."""
        self._until = self._at + len(block)

    def rest(self) -> Iterator[str]:
        """The rest of the file, in blocks; read to its end."""
        while True:
            if self._at < len(self._text):
                yield self._text[self._at :]
                self._at = len(self._text)
            if self._eof:
                return
            self._fill(BLOCK_SIZE)

    def _fill(self, size: int) -> None:
        """Read ahead ``size`` bytes, in reads of ``READ_SIZE``; fewer when a read comes short.

        A read error after some bytes is raised by the next call, once those are used.
        """
        if self._error is not None:
            raise self._error
        pieces = [self._text[self._at :]]
        read = 0
        try:
            while read < size and not self._eof:
                data = self._read(wanted := min(READ_SIZE, size - read))
                self._eof = not data
                pieces.append(self._decoder.decode(data, final=self._eof))
                read += len(data)
                if len(data) < wanted:
                    break
        except Exception as exc:
            if not read:
                raise
            self._error = exc
        finally:
            self._text = "".join(pieces)
            self._until -= self._at
            self._at = 0

    def _readline(self, size: int) -> str:
        """``readline(size)`` of the decoded file: up to "\\n", "\\r\\n" or "\\r", or ``size``."""
        parts = []
        while True:
            text, at = self._text, self._at
            end = min(at + size, len(text))
            newline = text.find("\n", at, end)
            stop = end if newline < 0 else newline + 1
            if (cr := text.find("\r", at, stop)) >= 0:
                stop = cr + 2 if cr + 1 == newline else cr + 1
            if stop < len(text) or newline >= 0 or stop - at == size or self._eof:
                self._at = stop
                parts.append(text[at:stop])
                return "".join(parts)
            # The line goes on past what was read ahead; a "\\r" read last may start a "\\r\\n".
            keep = cr if cr >= 0 else stop
            parts.append(text[at:keep])
            size -= keep - at
            self._at = keep
            self._fill(READ_SIZE)


def one_record_a_line(lines: list[str]) -> bool:
    """Whether the csv module reads each of ``lines`` as one record (no quoted line
    break would join two, leaving fewer records than lines and the "" added)."""
    try:
        last = deque(enumerate(csv.reader(chain(lines, [""])), 1), maxlen=1)
    except csv.Error:
        return False
    return last[0][0] == len(lines) + 1


def count_lines[T: (str, bytes)](blocks: Iterable[T], newline: T) -> int:
    """The lines in ``blocks`` (non-empty): their line breaks, and a last line without one."""
    lines, last = 0, newline
    for block in blocks:
        lines += block.count(newline)
        last = block[-1:]
    return lines if last == newline else lines + 1


def line_at(line_map: Sequence[Sequence[int]], index: int) -> int:
    """The line of record ``index``, from a ``line_map()`` (or its JSON)."""
    position = bisect_right(line_map, index, key=itemgetter(0)) - 1
    if position < 0:
        raise IndexError(f"row {index} has not been read")
    return index + line_map[position][1]


def parse_record(
    format: str, columns: Sequence[str] | None, text: str, line: int = 0
) -> Mapping[str, Any] | BadLine:
    """What one record of ``RecordStream.batches()`` reads as, or a ``BadLine`` on ``line``:
    any JSON value (the row parser rejects a non-object), or the CSV fields by ``columns``."""
    if format == JSONL:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            return BadLine(line, NOT_JSON.format(error=exc.msg, column=exc.colno))
        except (ValueError, RecursionError) as exc:
            # An integer too long to convert, or nesting past the recursion limit.
            return BadLine(line, NOT_JSON.format(error=exc, column=1))
    assert columns is not None, "a CSV record is read by its header's columns"
    try:
        fields = next(csv.reader((text,)), [])
    except csv.Error as exc:
        return BadLine(line, NOT_CSV.format(error=exc))
    if len(fields) != len(columns):
        return BadLine(line, WRONG_FIELD_COUNT.format(expected=len(columns), found=len(fields)))
    return dict(zip(columns, fields, strict=True))


class RecordStream:
    """The records of one CSV or JSON Lines file, split, not parsed; a context manager.

    Opened (a CSV header read) on construction: a missing file (``OSError``) or a bad
    header (``ReaderError``) fails before any run. ``path`` may be a binary file object
    (an upload) named by ``name``: it is read from where it stands, and closing the
    stream closes it. Reading may raise ``InputTooLarge``, and for a
    damaged gzip file ``EOFError``, ``zlib.error`` or ``gzip.BadGzipFile``.
    """

    def __init__(
        self, path: str | Path | IO[bytes], *, format: str | None = None, name: str | None = None
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
        self.records_read = 0
        # line_of(): (start, offset): line = index + offset for indexes from start on.
        self._line_map: list[tuple[int, int]] = []
        self._file = self._open()
        self._lines = Lines(self._file, self.max_line)
        # Read line by line, a CSV record is what the csv module reads; a JSON Lines one, a line.
        self._records: Iterator[object] = self._lines
        self.columns: list[str] | None = None
        if self.format == CSV:
            self._records = csv.reader(self._lines)
            try:
                self.columns = self._header()
            except BaseException:
                self._file.close()
                raise

    def _open(self) -> IO[bytes]:
        file = self.path if self.source is None else self.source
        if self.gzipped:
            gz = gzip.open(file, "rb")  # noqa: SIM115 - closed with the file
            return io.BufferedReader(
                Inflated(gz, settings.IMPORT_MAX_DECOMPRESSED_BYTES, self.name)
            )
        return open(self.path, "rb") if self.source is None else self.source

    def _header(self) -> list[str]:
        try:
            header = next(self._records, None)
        except csv.Error as exc:
            raise ReaderError(f"{self.name}: {NOT_CSV.format(error=exc)}") from exc
        except LineTooLong as exc:
            message = HEADER_TOO_LONG.format(name=self.name, limit=self.max_line)
            raise ReaderError(message) from exc
        if not isinstance(header, list) or not any(name.strip() for name in header):
            raise ReaderError(NO_HEADER.format(name=self.name))
        names = [name.strip() for name in header]
        for position, name in enumerate(names, start=1):
            if not name:
                raise ReaderError(BLANK_COLUMN.format(name=self.name, position=position))
            if name in names[: position - 1]:
                raise ReaderError(DUPLICATE_COLUMN.format(name=self.name, column=name))
        if any(UNDECODABLE.search(name) for name in names):
            raise ReaderError(f"{self.name}: the header is {NOT_UTF8}")
        return names

    def batches(self) -> Iterator[list[str | BadLine]]:
        """The records in order, in lists (one per block read): each its text without its
        final line break, or a ``BadLine`` at its first line. Records read before a read
        error are yielded before it is raised."""
        lines = self._lines
        while block := lines.block():
            if (records := self._split(block)) is not None:
                self._count(lines.number + 1, len(records))
                lines.take(block, len(records))
                yield cast(list[str | BadLine], records)
                continue
            lines.read_on(block)
            batch: list[str | BadLine] = []
            try:
                for start, record in self._one_by_one():
                    self._count(start, 1)
                    batch.append(record)
            except Exception:
                if batch:
                    yield batch
                raise
            if batch:
                yield batch

    def _split(self, block: str) -> list[str] | None:
        """The records of a block that takes the fast path, one a line; None for any other."""
        newline = "\r\n" if "\r" in block else "\n"
        if not block.endswith(newline) or (
            newline == "\r\n" and not block.count("\r") == block.count("\n") == block.count("\r\n")
        ):
            return None  # mixed or bare "\r" line breaks, or a last line cut or unended
        if self.format == CSV:
            if newline * 2 in block or block.startswith(newline):
                return None
        elif block[:1].isspace() or SPACE_AFTER_LINE_BREAK.search(block):
            return None
        if not block.isascii() and UNDECODABLE.search(block):
            return None
        records = block.split(newline)
        records.pop()  # "" after the last line break
        if max(map(len, records)) + len(newline) > self.max_line:
            return None
        if self.format == CSV and '"' in block and not one_record_a_line(records):
            return None
        return records

    def _one_by_one(self) -> Iterator[tuple[int, str | BadLine]]:
        """(first line, record) of the block given to ``read_on()``, until ``Lines`` is idle."""
        lines = self._lines
        while not lines.idle:
            start = lines.number + 1
            lines.new_record()
            try:
                next(self._records)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, BadLine(start, NOT_CSV.format(error=exc))
            except LineTooLong:
                yield start, BadLine(start, LINE_TOO_LONG.format(limit=self.max_line))
            else:
                text = lines.record()
                if text.strip() if self.format == JSONL else text:  # else a blank line
                    yield start, BadLine(start, NOT_UTF8) if UNDECODABLE.search(text) else text

    def _count(self, line: int, records: int) -> None:
        """``records`` more records read, one a line from ``line`` on."""
        offset = line - self.records_read
        if not self._line_map or self._line_map[-1][1] != offset:
            self._line_map.append((self.records_read, offset))
        self.records_read += records

    def line_of(self, index: int) -> int:
        """The line on which the record at ``index`` (0-based, already read) starts."""
        return line_at(self._line_map, index)

    def line_map(self) -> list[tuple[int, int]]:
        """(first index, line - index) from that index on, for ``line_at``: the records read."""
        return list(self._line_map)

    def count_rest(self) -> int:
        """Read the rest of the file unsplit (the decompressed cap holds); its lines."""
        return count_lines(self._lines.rest(), "\n")

    def estimate_total(self) -> int | None:
        """About how many records the file holds, from its line breaks; None: gzipped or a pipe."""
        if self.gzipped or self.source is not None or not self.path.is_file():
            return None
        with open(self.path, "rb") as raw:
            lines = count_lines(iter(partial(raw.read, BLOCK_SIZE), b""), b"\n")
        header = 1 if self.format == CSV else 0
        return max(lines - header, 0)

    def close(self) -> None:
        self._file.close()
        if self.source is not None:
            self.source.close()  # a GzipFile leaves the file it was given open

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RowStream(RecordStream, Iterator[Mapping[str, Any]]):
    """Rows of one CSV or JSON Lines file, read lazily: ``parse_record`` of each record.

    ``rows_yielded`` counts the rows yielded; the splitter may be a block further.
    """

    rows_yielded = 0
    _rows: Iterator[Mapping[str, Any]] | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Mapping[str, Any]:
        if self._rows is None:
            self._rows = self._parsed()
        return next(self._rows)

    def _parsed(self) -> Iterator[Mapping[str, Any]]:
        format, columns = self.format, self.columns
        for batch in self.batches():
            for record in batch:
                if isinstance(record, BadLine):
                    row: Mapping[str, Any] = record
                else:
                    row = parse_record(format, columns, record)
                    if isinstance(row, BadLine):  # its line, found only when needed
                        row = BadLine(self.line_of(self.rows_yielded), row.reason)
                self.rows_yielded += 1
                yield row
