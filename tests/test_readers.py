"""The readers: records split fast or one by one read the same, and parse to the same rows.

The files here are small, so ``BLOCK_SIZE`` and ``READ_SIZE`` are shrunk to
make reads and blocks end anywhere: inside a quoted field, between "\\r" and
"\\n", inside a line over the limit. Whatever the sizes, the rows and their
lines must be those of a one-block read, and those listed here.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from batching import readers
from batching.readers import (
    JSONL,
    LINE_TOO_LONG,
    NOT_UTF8,
    BadLine,
    RecordStream,
    RowStream,
    parse_record,
)

LIMIT = 60  # settings.IMPORT_MAX_LINE_LENGTH for these files
FIELD_LIMIT = 30  # csv.field_size_limit() for these files
BLOCK_SIZES = [7, 16, 29, 64, 1 << 20]

TOO_LONG = LINE_TOO_LONG.format(limit=LIMIT)
FIELD_TOO_LARGE = f"not valid CSV: field larger than field limit ({FIELD_LIMIT})"


def wrong_count(found: int) -> str:
    return f"expected 2 fields as in the header, found {found}"


def csv_plain(start: int, count: int, end: str = "\n") -> tuple[str, list[Any]]:
    return (
        "".join(f"{i},plain {i}{end}" for i in range(start, start + count)),
        [{"a": str(i), "b": f"plain {i}"} for i in range(start, start + count)],
    )


def jsonl_plain(start: int, count: int, end: str = "\n") -> tuple[str, list[Any]]:
    return (
        "".join(f'{{"i": {i}}}{end}' for i in range(start, start + count)),
        [{"i": i} for i in range(start, start + count)],
    )


def cycling(plain: Any, start: int, count: int) -> tuple[str, list[Any]]:
    """Plain rows ended by "\\n", "\\r\\n" and "\\r" in turn."""
    parts = [plain(i, 1, ["\n", "\r\n", "\r"][i % 3]) for i in range(start, start + count)]
    return "".join(text for text, _ in parts), [row for _, rows in parts for row in rows]


def spaced(part: tuple[str, list[Any]]) -> tuple[str, list[Any]]:
    """A part whose rows are each followed by a blank line."""
    text, rows = part
    return text, [(2 * offset, row) for offset, row in enumerate(rows)]


def build(parts: list[tuple[str | bytes, list[Any]]]) -> tuple[bytes, list[Any]]:
    """The file's bytes, and its rows: ``(line, row)``, or ``(line, reason)`` for a BadLine.

    A part's rows are one a line from its first line on, unless given with
    their own line as ``(offset, row)`` (a multi-line record, a bad line).
    """
    data = b""
    expected = []
    for text, rows in parts:
        raw = text if isinstance(text, bytes) else text.encode()
        first = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n") + 1
        for offset, row in enumerate(rows):
            if isinstance(row, tuple):
                offset, row = row
            expected.append((first + offset, row))
        data += raw
    return data, expected


def tricky_csv() -> tuple[bytes, list[Any]]:
    return build(
        [
            ("\ufeffa,b\r\n", []),  # a byte order mark, a CRLF header
            csv_plain(0, 6),
            ("\n", []),
            ('100,"with, comma"\n', [{"a": "100", "b": "with, comma"}]),
            csv_plain(6, 6, "\r\n"),
            ("\r\n", []),
            csv_plain(50, 6, "\r\n"),
            cycling(csv_plain, 60, 20),
            spaced(csv_plain(30, 4, "\n\r\n")),  # mixed line breaks, blank lines
            (
                "40,x\n41,y\r\n42,z\r43,w\n",
                [{"a": str(i), "b": b} for i, b in zip(range(40, 44), "xyzw", strict=True)],
            ),
            ('101,"two\r\nlines"\r\n', [{"a": "101", "b": "two\r\nlines"}]),
            ("\n\r\n", []),  # blank lines
            ("   \n", [wrong_count(1)]),  # white space is a field in CSV
            ("102,bare\r", [{"a": "102", "b": "bare"}]),
            csv_plain(12, 6),
            ('103,"a\nb\nc\n\nd"\n', [{"a": "103", "b": "a\nb\nc\n\nd"}]),
            (f"104,{'x' * 70}\n", [TOO_LONG]),
            (f"{'y' * 70}\r\n", [TOO_LONG]),
            csv_plain(18, 6),
            ("\n\n", []),
            csv_plain(80, 6),
            (b"105,\xff\xfe\n", [NOT_UTF8]),
            ("106,nul\x00here\n", [{"a": "106", "b": "nul\x00here"}]),
            ("107,too,many\n", [wrong_count(3)]),
            (f"108,{'z' * 35}\n", [FIELD_TOO_LARGE]),
            # Refused on its first line; the reader goes on on the next one.
            (f'109,"{"q" * 35}\nnext"\n', [FIELD_TOO_LARGE, (1, wrong_count(1))]),
            csv_plain(24, 6),
            ("110,last", [{"a": "110", "b": "last"}]),  # no final line break
        ]
    )


def tricky_jsonl() -> tuple[bytes, list[Any]]:
    return build(
        [
            ('\ufeff{"i": -1}\n', [{"i": -1}]),
            jsonl_plain(0, 6),
            ("\n  \t\n\r\n", []),  # blank and white-space-only lines
            spaced(jsonl_plain(30, 4, "\n\r\n")),  # mixed line breaks, blank lines
            ('{"j": 1}\n{"j": 2}\r\n{"j": 3}\r{"j": 4}\n', [{"j": j} for j in range(1, 5)]),
            ('  {"a": 2}\n', [{"a": 2}]),
            jsonl_plain(6, 6, "\r\n"),
            cycling(jsonl_plain, 60, 20),
            ('{"a": 3}\r', [{"a": 3}]),
            ("nope\n", ["not valid JSON: Expecting value (column 1)"]),
            ("[1, 2]\n", [[1, 2]]),  # any JSON value, as it is
            (f'{{"x": "{"x" * 70}"}}\n', [TOO_LONG]),
            jsonl_plain(12, 6),
            (b'{"a": "\xff"}\n', [NOT_UTF8]),
            ('{"a": "x\x00"}\n', ["not valid JSON: Invalid control character at (column 9)"]),
            ('{"a": 4}\n\n', [{"a": 4}]),
            jsonl_plain(18, 6),
            ('{"last": true}', [{"last": True}]),
        ]
    )


FILES = {"csv": tricky_csv, "jsonl": tricky_jsonl}


@pytest.fixture
def limits(settings):
    settings.IMPORT_MAX_LINE_LENGTH = LIMIT
    previous = csv.field_size_limit(FIELD_LIMIT)
    yield
    csv.field_size_limit(previous)


@pytest.fixture
def paths(monkeypatch):
    """Whether each block read took the fast path (True) or was read one by one."""
    taken: list[bool] = []
    split = RecordStream._split

    def counted(self: RecordStream, block: str) -> list[str] | None:
        records = split(self, block)
        taken.append(records is not None)
        return records

    monkeypatch.setattr(RecordStream, "_split", counted)
    return taken


def write(tmp_path: Path, format: str, gzipped: bool) -> tuple[Path, list[Any]]:
    data, expected = FILES[format]()
    path = tmp_path / f"rows.{format}{'.gz' if gzipped else ''}"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path, expected


def plain(row: Any) -> Any:
    """A row, or a BadLine's reason: what the expected rows list."""
    return row.reason if isinstance(row, BadLine) else row


def read_rows(path: Path) -> list[tuple[int, Any]]:
    with RowStream(path) as stream:
        rows = list(stream)
        assert stream.rows_yielded == stream.records_read == len(rows)
        lines = [stream.line_of(index) for index in range(len(rows))]
    for line, row in zip(lines, rows, strict=True):
        if isinstance(row, BadLine):
            assert row.line == line
    return [(line, plain(row)) for line, row in zip(lines, rows, strict=True)]


@pytest.mark.usefixtures("limits")
@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("format", ["csv", "jsonl"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_rows_and_lines_are_the_same_whatever_the_blocks(
    tmp_path, monkeypatch, paths, format, gzipped, block_size
):
    path, expected = write(tmp_path, format, gzipped)
    whole = read_rows(path)  # one block: the file is read one record at a time
    assert whole == expected
    monkeypatch.setattr(readers, "BLOCK_SIZE", block_size)
    monkeypatch.setattr(readers, "READ_SIZE", 5)
    paths.clear()
    assert read_rows(path) == whole
    if block_size < 64:
        assert set(paths) == {True, False}, "both paths taken"


@pytest.mark.usefixtures("limits")
@pytest.mark.parametrize("format", ["csv", "jsonl"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_parsing_the_split_records_gives_the_rows(tmp_path, monkeypatch, format, block_size):
    monkeypatch.setattr(readers, "BLOCK_SIZE", block_size)
    path, _ = write(tmp_path, format, gzipped=False)
    with RecordStream(path) as stream:
        records = [record for batch in stream.batches() for record in batch]
        assert stream.records_read == len(records)
        parsed = [
            record
            if isinstance(record, BadLine)
            else parse_record(stream.format, stream.columns, record, stream.line_of(index))
            for index, record in enumerate(records)
        ]
    with RowStream(path) as rows:
        expected = [(row.line, row.reason) if isinstance(row, BadLine) else row for row in rows]
    assert [(row.line, row.reason) if isinstance(row, BadLine) else row for row in parsed] == (
        expected
    )


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_a_record_is_its_text_as_in_the_file(tmp_path, monkeypatch, settings, block_size):
    """Inner line breaks kept as they are, the final one dropped, blank lines skipped."""
    settings.IMPORT_MAX_LINE_LENGTH = 20
    monkeypatch.setattr(readers, "BLOCK_SIZE", block_size)
    path = tmp_path / "rows.csv"
    path.write_bytes(b'a,b\r\n1,"x\r\ny\ny"\r\n\r\n2,z\n3,\xff\n4,' + b"w" * 30 + b"\n5,e\r")
    with RecordStream(path) as stream:
        assert (stream.format, stream.columns) == ("csv", ["a", "b"])
        records = [record for batch in stream.batches() for record in batch]
        lines = [stream.line_of(index) for index in range(len(records))]
    assert [plain(record) for record in records] == [
        '1,"x\r\ny\ny"',
        "2,z",
        NOT_UTF8,
        LINE_TOO_LONG.format(limit=20),
        "5,e",
    ]
    assert lines == [2, 6, 7, 8, 9]


@pytest.mark.parametrize("end", ["", "\n"])
def test_an_open_quote_at_the_end_keeps_its_line_break(tmp_path, end):
    """The csv module ends the field where the file ends: its last line break is inside it."""
    path = tmp_path / "rows.csv"
    path.write_text(f'a,b\n1,"open\nquote{end}', encoding="utf-8")
    with RecordStream(path) as stream:
        (record,) = (record for batch in stream.batches() for record in batch)
    assert record == f'1,"open\nquote{end}'
    assert parse_record("csv", ["a", "b"], record) == {"a": "1", "b": f"open\nquote{end}"}
    with RowStream(path) as stream:
        assert list(stream) == [{"a": "1", "b": f"open\nquote{end}"}]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_parsed_records_are_what_the_csv_module_reads_from_the_file(
    tmp_path, monkeypatch, block_size
):
    """A multi-line record's text alone parses to the fields of the file's csv reader."""
    monkeypatch.setattr(readers, "BLOCK_SIZE", block_size)
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b'a,b\r\n1,"x\r\ny"\r\n2,"q ""quoted"" \r\r\n"\n3,"\n\n"\r4,"a,b",\n5,"x"y\n'
        b'6,"\r\n"\r\n7,"end\r"\r\n'
    )
    with open(path, encoding="utf-8", newline="") as file:
        header, *fields = (record for record in csv.reader(file) if record)
    with RecordStream(path) as stream:
        assert stream.columns == header
        texts = [text for batch in stream.batches() for text in batch]
    assert len(texts) == len(fields)
    for text, expected in zip(texts, fields, strict=True):
        columns = [f"c{position}" for position in range(len(expected))]
        assert list(parse_record("csv", columns, text).values()) == expected


def simple_file(kind: str, end: str) -> tuple[str, list[str], list[Any]]:
    """(text, its records, its rows): 2,000 one-line records."""
    numbers = range(2000)
    if kind == "jsonl":
        records = [f'{{"i": {i}}}' for i in numbers]
        return "".join(f"{record}{end}" for record in records), records, [{"i": i} for i in numbers]
    # Quoted fields, even with a comma or a quote in them, are one line each.
    template = '{i},"a ""{i}"", b"' if kind == "quoted csv" else "{i},plain {i}"
    records = [template.format(i=i) for i in numbers]
    rows = [{"a": str(i), "b": next(csv.reader([record]))[1]} for i, record in enumerate(records)]
    return "".join(f"{line}{end}" for line in ["a,b", *records]), records, rows


@pytest.mark.parametrize("end", ["\n", "\r\n"])
@pytest.mark.parametrize("kind", ["csv", "quoted csv", "jsonl"])
def test_a_simple_file_takes_the_fast_path_only(tmp_path, monkeypatch, paths, kind, end):
    def refused(self: RecordStream) -> None:
        raise AssertionError("read one record at a time")

    monkeypatch.setattr(RecordStream, "_one_by_one", refused)
    monkeypatch.setattr(readers, "BLOCK_SIZE", 1000)
    text, records, rows = simple_file(kind, end)
    path = tmp_path / ("rows.jsonl" if kind == "jsonl" else "rows.csv")
    path.write_text(text, encoding="utf-8", newline="")
    with RecordStream(path) as stream:
        batches = list(stream.batches())
    assert len(batches) == len(paths) > 10 and all(paths)
    assert [record for batch in batches for record in batch] == records
    with RowStream(path) as stream:
        assert list(stream) == rows
        assert stream.line_map() == [(0, 1 if kind == "jsonl" else 2)]


def test_rows_read_before_a_damaged_gzip_end_are_whole(tmp_path, monkeypatch):
    """What the file holds before the damage is yielded, then the error; no row cut short."""
    monkeypatch.setattr(readers, "BLOCK_SIZE", 1 << 16)
    text, rows = csv_plain(0, 20_000)
    data = gzip.compress(f"a,b\n{text}".encode())
    path = tmp_path / "rows.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    read = []
    with RowStream(path) as stream, pytest.raises(EOFError):
        for row in stream:
            read.append(row)
    assert 0 < len(read) < len(rows)
    assert read == rows[: len(read)]


@pytest.mark.parametrize("size", range(1, 12))
def test_a_line_break_split_between_two_reads_is_one(tmp_path, monkeypatch, size):
    """A read that ends with "\\r" is followed by another before the line is told."""
    monkeypatch.setattr(readers, "BLOCK_SIZE", size)
    monkeypatch.setattr(readers, "READ_SIZE", size)
    path = tmp_path / "rows.csv"
    path.write_bytes(b'a,b\r\n1,"x"\r\n2,"y\r\nz"\r\n\r\n3,w\r\r\n4,v\r')
    assert read_rows(path) == [
        (2, {"a": "1", "b": "x"}),
        (3, {"a": "2", "b": "y\r\nz"}),
        (6, {"a": "3", "b": "w"}),
        (8, {"a": "4", "b": "v"}),
    ]


class Flaky(io.BytesIO):
    """An upload read 1,000 bytes at a time, whose third read fails (then goes on)."""

    reads = 0

    def read1(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == 3:
            raise OSError("the read failed")
        return super().read1(1000)


def test_after_a_read_error_nothing_more_is_read(tmp_path):
    """The rows read before it are yielded, then the error: no row cut short, none after."""
    text, rows = csv_plain(0, 5000)
    data = f"a,b\n{text}".encode()
    read = []
    with (
        RowStream(Flaky(data), name="rows.csv") as stream,
        pytest.raises(OSError, match="the read failed"),
    ):
        for row in stream:
            read.append(row)
    # Every whole line of the two reads before the error, the header aside.
    assert read == rows[: data[:2000].count(b"\n") - 1]


def test_a_pipe_is_read_as_it_comes():
    """The lines a pipe holds are yielded at once, without waiting for more."""
    read_end, write_end = os.pipe()
    pool = ThreadPoolExecutor(1)

    def soon(call: Any, *args: Any, **kwargs: Any) -> Any:
        return pool.submit(call, *args, **kwargs).result(timeout=10)

    try:
        os.write(write_end, b"a,b\n1,x\n2,y\n")
        with soon(RecordStream, os.fdopen(read_end, "rb"), name="rows.csv") as stream:
            batches = stream.batches()
            assert soon(next, batches) == ["1,x", "2,y"]
            os.write(write_end, b"3,z\n")
            assert soon(next, batches) == ["3,z"]
            os.close(write_end)
            write_end = -1
            assert soon(list, batches) == []
    finally:
        if write_end >= 0:
            os.close(write_end)  # a read still waiting ends
        pool.shutdown()


@pytest.mark.parametrize("block_size", [64, 1 << 20])
@pytest.mark.parametrize("format", ["csv", "jsonl"])
def test_a_line_over_the_limit_among_plain_lines(
    tmp_path, monkeypatch, settings, format, block_size
):
    settings.IMPORT_MAX_LINE_LENGTH = 30
    monkeypatch.setattr(readers, "BLOCK_SIZE", block_size)
    text, rows = (csv_plain if format == "csv" else jsonl_plain)(0, 20)
    long = "x" * 29 if format == "csv" else f'"{"x" * 27}"'  # 30 characters with its "\n"
    lines = text.splitlines(keepends=True)
    path = tmp_path / f"rows.{format}"
    header = "a,b\n" if format == "csv" else ""
    path.write_text(header + "".join(lines[:10]) + f"{long}x\n{long}\n" + "".join(lines[10:]))
    first = 2 if format == "csv" else 1
    too_long = LINE_TOO_LONG.format(limit=30)
    fits = wrong_count(1) if format == "csv" else "x" * 27
    assert read_rows(path) == [
        *((first + i, row) for i, row in enumerate(rows[:10])),
        (first + 10, too_long),
        (first + 11, fits),
        *((first + 12 + i, row) for i, row in enumerate(rows[10:])),
    ]


@pytest.mark.parametrize(
    "text", ["1" * 5000, "[" * 100_000 + "]" * 100_000], ids=["long-integer", "deep-nesting"]
)
def test_json_python_cannot_convert_is_a_bad_line_not_an_error(text):
    row = parse_record(JSONL, None, text, line=7)
    assert isinstance(row, BadLine) and row.line == 7
    assert row.reason.startswith("not valid JSON: ")
