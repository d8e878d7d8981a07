"""The import commands and their streaming readers.

Commands are driven with ``call_command(..., stdout=StringIO())``; a StringIO
is not a terminal, so no progress bar is drawn unless a test asks for one
with ``TerminalIO``. Query counts follow tests/test_services.py: inside the
test transaction each chunk is a savepoint (SAVEPOINT + RELEASE).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import socket
import subprocess
import sys
import tracemalloc
from decimal import Decimal
from io import BytesIO, StringIO
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, connection
from django.utils import timezone

from batching.models import BatchProcessingLog
from batching.readers import BadLine, ReaderError, RowStream, detect_format, line_at
from products.models import Product, ProductView
from products.services import rows as r
from products.services.optimized import OptimizedProducts
from tests.factories import CategoryFactory, ProductFactory, UserFactory, gzip_bomb
from tests.test_services import LOG_QUERIES, per_chunk

pytestmark = pytest.mark.django_db

HEADER = ["sku", "name", "category", "price", "stock_quantity", "is_active"]


class TerminalIO(StringIO):
    """A StringIO that says it is a terminal, so the progress bar is drawn."""

    def isatty(self) -> bool:
        return True


def product_row(i: int, **changes: str) -> dict[str, str]:
    row = {
        "sku": f"IMP-{i:05d}",
        "name": f"Imported {i}",
        "category": f"Category {i % 3}",
        "price": f"{i}.50",
        "stock_quantity": str(i * 2),
        "is_active": "true" if i % 2 else "false",
    }
    row.update(changes)
    return row


def write_csv(path: Path, rows: list[dict[str, str]], *, header: list[str] = HEADER) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as out:
        out.write("".join(f"{line}\n" for line in lines))
    return path


def run(command: str, *args: str, **options) -> str:
    out = StringIO()
    call_command(command, *map(str, args), stdout=out, stderr=StringIO(), **options)
    return out.getvalue()


def products_by_sku() -> dict[str, tuple]:
    return {
        sku: rest
        for sku, *rest in Product.objects.values_list(
            "sku", "name", "category__name", "price", "stock_quantity", "is_active"
        )
    }


def expected_product(i: int) -> list:
    return [f"Imported {i}", f"Category {i % 3}", Decimal(f"{i}.50"), i * 2, bool(i % 2)]


def only_log() -> BatchProcessingLog:
    (log,) = BatchProcessingLog.objects.all()
    return log


# -- imports ---------------------------------------------------------------------


class TestImportProducts:
    def test_csv_creates_and_updates(self, tmp_path):
        category = CategoryFactory(name="Old")
        ProductFactory(sku="IMP-00002", name="Old name", category=category, price="1.00")
        path = write_csv(tmp_path / "products.csv", [product_row(i) for i in range(1, 6)])

        out = run("import_products", path)

        assert products_by_sku() == {f"IMP-{i:05d}": expected_product(i) for i in range(1, 6)}
        log = only_log()
        assert (log.status, log.rows_read, log.rows_created, log.rows_updated) == (
            "completed",
            5,
            4,
            1,
        )
        assert log.operation == BatchProcessingLog.Operation.PRODUCTS
        assert log.variant == BatchProcessingLog.Variant.OPTIMIZED
        assert f"Importing products from {path}\n" in out
        assert f"Run #{log.pk} completed" in out
        assert f"Run #{log.pk} completed: 5 rows read, 4 created, 1 updated, 0 skipped." in out

    def test_jsonl_with_json_types_and_blank_lines(self, tmp_path):
        rows = [
            json.dumps(
                {
                    "sku": f"IMP-{i:05d}",
                    "name": f"Imported {i}",
                    "category": f"Category {i % 3}",
                    "price": i + 0.5,
                    "stock_quantity": i * 2,
                    "is_active": bool(i % 2),
                }
            )
            for i in range(1, 4)
        ]
        path = write_lines(tmp_path / "products.jsonl", [rows[0], "", rows[1], "   ", rows[2], ""])

        out = run("import_products", path)

        assert products_by_sku() == {f"IMP-{i:05d}": expected_product(i) for i in range(1, 4)}
        assert only_log().rows_read == 3
        assert not [line for line in out.splitlines() if line.startswith("line ")]

    def test_gzipped_csv(self, tmp_path):
        path = write_csv(tmp_path / "products.csv.gz", [product_row(i) for i in range(1, 8)])
        run("import_products", path, verbosity=0)
        assert products_by_sku() == {f"IMP-{i:05d}": expected_product(i) for i in range(1, 8)}

    def test_gzipped_ndjson_and_format_option(self, tmp_path):
        lines = [json.dumps(product_row(i)) for i in range(1, 4)]
        run("import_products", write_lines(tmp_path / "a.ndjson.gz", lines), verbosity=0)
        run("import_products", write_lines(tmp_path / "b.txt", lines[:1]), format="jsonl")
        assert Product.objects.count() == 3
        assert BatchProcessingLog.objects.filter(checkpoint_position=1, rows_updated=1).count() == 1

    def test_naive_variant(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(i) for i in range(1, 4)])
        run("import_products", path, naive=True, verbosity=0)
        assert only_log().variant == BatchProcessingLog.Variant.NAIVE
        assert products_by_sku() == {f"IMP-{i:05d}": expected_product(i) for i in range(1, 4)}

    @pytest.mark.parametrize(("count", "chunk_size"), [(10, 4), (12, 4), (3, 1000)])
    def test_queries_per_chunk(self, tmp_path, django_assert_num_queries, count, chunk_size):
        for name in ("Category 0", "Category 1", "Category 2"):
            CategoryFactory(name=name)
        path = write_csv(tmp_path / "p.csv", [product_row(i) for i in range(count)])
        # Per chunk, as the service: categories, one upsert (+ existing skus,
        # except on PostgreSQL, whose upsert tells created from updated).
        chunks = math.ceil(count / chunk_size)
        writes = 2 if connection.vendor == "postgresql" else 3
        with django_assert_num_queries(LOG_QUERIES + chunks * per_chunk(writes)):
            run("import_products", path, chunk_size=chunk_size, verbosity=0)
        with django_assert_num_queries(LOG_QUERIES + chunks * per_chunk(writes)):
            run("import_products", path, chunk_size=chunk_size)
        assert Product.objects.count() == count

    def test_a_file_is_imported_in_volume_chunks_unless_told(self, tmp_path, settings):
        """The catalogue's volume default; --chunk-size wins (a resume keeps its own)."""
        assert settings.BULK_CATALOGUE_CHUNK_SIZE == 3000
        settings.BULK_CATALOGUE_CHUNK_SIZE = 4
        path = write_csv(tmp_path / "p.csv", [product_row(i) for i in range(10)])
        run("import_products", path, verbosity=0)
        log = only_log()
        assert (log.chunk_size, log.chunks_committed) == (4, 3)
        run("import_products", path, chunk_size=3, verbosity=0)
        assert BatchProcessingLog.objects.latest("pk").chunk_size == 3

    def test_verbosity_0_prints_nothing_but_imports(self, tmp_path):
        rows = [product_row(1), product_row(2, price="abc")]
        path = write_csv(tmp_path / "products.csv", rows)
        out, err = StringIO(), StringIO()
        call_command("import_products", str(path), verbosity=0, stdout=out, stderr=err)
        assert out.getvalue() == ""
        assert err.getvalue() == ""
        assert list(Product.objects.values_list("sku", flat=True)) == ["IMP-00001"]

    def test_verbosity_2_adds_the_costs(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        out = run("import_products", path, verbosity=2)
        log = only_log()
        assert f"{log.query_count} queries; chunks: 1 committed, 0 rolled back" in out

    def test_progress_bar_on_a_terminal(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(i) for i in range(50)])
        out = TerminalIO()
        call_command("import_products", str(path), stdout=out)
        text = out.getvalue()
        only_log()
        # The last redraw shows the whole file: 50 of the 50 counted rows.
        assert f"\r[{'#' * 30}] 100%  50/50 rows  " in text
        assert "rows/s  0:00 left" in text
        assert text.count("\n") == 4  # announcement, bar, summary, figures
        assert Product.objects.count() == 50

    def test_progress_without_total_for_gzip(self, tmp_path):
        path = write_csv(tmp_path / "products.csv.gz", [product_row(i) for i in range(5)])
        out = TerminalIO()
        call_command("import_products", str(path), stdout=out)
        assert "\r5 rows  " in out.getvalue()
        assert "left" not in out.getvalue()


class TestBadLines:
    def test_reported_by_line_number_and_good_rows_imported(self, tmp_path):
        path = tmp_path / "products.csv"
        path.write_text(
            "sku,name,category,price,stock_quantity,is_active\n"  # line 1
            "IMP-00001,Imported 1,Category 1,1.50,2,true\n"  # 2
            "IMP-00002,Imported 2,Category 2,cheap,4,false\n"  # 3: bad price
            "\n"  # 4: blank, skipped
            'IMP-00003,"Imported\n3",Category 0,3.50,6,true\n'  # 5-6: one record
            "IMP-00004,Imported 4,Category 1\n"  # 7: too few fields
            "IMP-00005,Imported 5,Category 2,5.50,-1,true\n"  # 8: negative stock
            "IMP-00001,Again,Category 1,1.50,2,true\n"  # 9: repeated sku
            "IMP-00006,Imported 6,Category 0,6.50,12,false\n",  # 10
            encoding="utf-8",
        )

        out = run("import_products", path, chunk_size=2)

        assert sorted(products_by_sku()) == ["IMP-00001", "IMP-00003", "IMP-00006"]
        assert Product.objects.get(sku="IMP-00003").name == "Imported\n3"
        lines = out.splitlines()
        assert lines[1:5] == [
            f"line 3: price: {r.NOT_DECIMAL}",
            "line 7: row: expected 6 fields as in the header, found 3",
            f"line 8: stock_quantity: {r.NEGATIVE}",
            "line 9: sku: duplicate sku in this input (first seen at row 0)",
        ]
        log = only_log()
        assert log.status == BatchProcessingLog.Status.PARTIAL
        assert (log.rows_read, log.rows_created, log.rows_skipped) == (7, 3, 4)
        assert [error["index"] for error in log.row_errors] == [1, 3, 4, 5]
        assert f"Run #{log.pk} partial: 7 rows read, 3 created, 0 updated, 4 skipped." in out

    def test_jsonl_bad_lines(self, tmp_path):
        path = write_lines(
            tmp_path / "products.jsonl",
            [
                json.dumps(product_row(1)),
                '{"sku": "IMP-00002", "name": ',
                "",
                "[1, 2]",
                json.dumps(product_row(5)),
            ],
        )
        out = run("import_products", path)
        assert sorted(products_by_sku()) == ["IMP-00001", "IMP-00005"]
        assert "line 2: row: not valid JSON: Expecting value (column 30)" in out.splitlines()
        assert f"line 4: row: {r.NOT_AN_OBJECT}" in out.splitlines()
        # The log keeps the reader's reason too, not just "row must be an object".
        assert only_log().row_errors[0] == {
            "index": 1,
            "field": "row",
            "message": "not valid JSON: Expecting value (column 30)",
            "code": "unreadable",
        }

    def test_not_utf8_is_a_bad_line(self, tmp_path):
        path = tmp_path / "products.csv"
        good = b"IMP-00001,Imported 1,Category 1,1.50,2,true\n"
        path.write_bytes(
            b"sku,name,category,price,stock_quantity,is_active\n" + b"\xff\xfe,x\n" + good
        )
        out = run("import_products", path)
        assert "line 2: row: not valid UTF-8 text" in out
        assert list(Product.objects.values_list("sku", flat=True)) == ["IMP-00001"]

    @pytest.mark.parametrize("name", ["products.csv", "products.jsonl.gz"])
    def test_a_line_over_the_bound_is_a_bad_line(self, tmp_path, settings, name):
        settings.IMPORT_MAX_LINE_LENGTH = 200
        rows = [product_row(1), product_row(2, name="x" * 5000), product_row(3, price="abc")]
        rows.append(product_row(4))
        if name.endswith(".csv"):
            path = write_csv(tmp_path / name, rows)
            lines = (3, 4)  # line 1 is the header
        else:
            path = write_lines(tmp_path / name, [json.dumps(row) for row in rows])
            lines = (2, 3)
        out = run("import_products", path)
        too_long = "longer than 200 characters (settings.IMPORT_MAX_LINE_LENGTH)"
        assert f"line {lines[0]}: row: {too_long}; the line is skipped" in out
        assert f"line {lines[1]}: price: must be a decimal number" in out
        assert sorted(products_by_sku()) == ["IMP-00001", "IMP-00004"]

    def test_at_most_20_are_printed(self, tmp_path):
        rows = [product_row(i, price="x") for i in range(25)] + [product_row(99)]
        out = run("import_products", write_csv(tmp_path / "products.csv", rows))
        reported = [line for line in out.splitlines() if line.startswith("line ")]
        assert reported == [f"line {i + 2}: price: {r.NOT_DECIMAL}" for i in range(20)]
        assert "... and 5 more bad lines" in out
        assert list(Product.objects.values_list("sku", flat=True)) == ["IMP-00099"]


class TestErrors:
    def test_missing_file(self, tmp_path):
        with pytest.raises(CommandError, match=r"missing\.csv: no such file"):
            run("import_products", tmp_path / "missing.csv")
        assert not BatchProcessingLog.objects.exists()

    def test_unreadable_file(self, tmp_path):
        folder = tmp_path / "folder.csv"
        folder.mkdir()
        with pytest.raises(CommandError, match=r"cannot read .*folder\.csv: Is a directory"):
            run("import_products", folder)

    def test_unknown_extension(self, tmp_path):
        path = tmp_path / "products.xlsx"
        path.write_text("sku\n")
        with pytest.raises(CommandError, match=r"cannot tell the format of products\.xlsx"):
            run("import_products", path)

    def test_unknown_format_option(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        with pytest.raises(CommandError, match="invalid choice: 'xml'"):
            run("import_products", path, "--format", "xml")

    def test_chunk_size_must_be_positive(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        with pytest.raises(CommandError, match="must be at least 1, not 0"):
            run("import_products", path, "--chunk-size", "0")

    def test_csv_without_header(self, tmp_path):
        path = tmp_path / "empty.csv"
        path.write_text("")
        with pytest.raises(CommandError, match=r"empty\.csv has no header row"):
            run("import_products", path)

    def test_truncated_gzip_fails_the_run_and_names_it(self, tmp_path):
        path = write_csv(tmp_path / "products.csv.gz", [product_row(i) for i in range(2000)])
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CommandError, match=r"cannot read .* after row [\d,]+: .*--resume"):
            run("import_products", path, chunk_size=100, verbosity=0)
        log = only_log()
        assert log.status == BatchProcessingLog.Status.FAILED
        assert Product.objects.count() == log.rows_created == log.checkpoint_position > 0

    def test_gzip_bomb_after_good_rows_fails_the_run_naming_the_limit(self, tmp_path, settings):
        settings.IMPORT_MAX_DECOMPRESSED_BYTES = 256 * 1024
        settings.IMPORT_MAX_LINE_LENGTH = 64 * 1024
        rows = "".join(",".join(product_row(i).values()) + "\n" for i in range(3))
        path = tmp_path / "products.csv.gz"
        path.write_bytes(gzip_bomb(16 << 20, before=",".join(HEADER) + "\n" + rows))
        message = (
            r"cannot read .*products\.csv\.gz after row 4: products\.csv\.gz is larger than "
            r"262,144 bytes once decompressed \(settings\.IMPORT_MAX_DECOMPRESSED_BYTES\)"
        )
        with pytest.raises(CommandError, match=message):
            run("import_products", path, chunk_size=2, verbosity=0)
        log = only_log()
        assert log.status == BatchProcessingLog.Status.FAILED
        # Rows 0-3 (three products, then the bomb's first piece as a bad line)
        # were committed; dropping the rest of that line reached the cap.
        assert (Product.objects.count(), log.checkpoint_position) == (3, 4)

    def test_gzip_bomb_as_the_header_is_a_command_error(self, tmp_path, settings):
        settings.IMPORT_MAX_LINE_LENGTH = 64 * 1024
        path = tmp_path / "products.csv.gz"
        path.write_bytes(gzip_bomb(16 << 20))
        message = r"products\.csv\.gz: the header is longer than 65,536 characters"
        with pytest.raises(CommandError, match=message):
            run("import_products", path)
        assert not BatchProcessingLog.objects.exists()

    @pytest.mark.django_db(transaction=True)
    def test_failed_run_is_a_command_error_naming_the_run(self, tmp_path, monkeypatch, settings):
        """A chunk that keeps failing transiently ends the run as failed, resumable."""
        settings.BULK_RETRY_ATTEMPTS = 1

        def locked(self, rows, run):
            raise OperationalError("database is locked")

        monkeypatch.setattr(OptimizedProducts, "write", locked)
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        with pytest.raises(CommandError) as caught:
            run("import_products", path, verbosity=0)
        log = only_log()
        assert log.status == BatchProcessingLog.Status.FAILED
        assert str(caught.value) == (
            f"run #{log.pk} failed: TransientFailure: chunk at row 0 failed after 1 attempts: "
            f"database is locked. Continue it with --resume {log.pk}"
        )

    @pytest.mark.django_db(transaction=True)
    def test_ctrl_c_after_a_committed_chunk_says_how_to_resume(self, tmp_path, monkeypatch):
        write = OptimizedProducts.write

        def interrupted_in_chunk_2(self, rows, run):
            if rows[0].index:
                raise KeyboardInterrupt
            return write(self, rows, run)

        monkeypatch.setattr(OptimizedProducts, "write", interrupted_in_chunk_2)
        path = write_csv(tmp_path / "products.csv", [product_row(i) for i in range(3)])
        err = StringIO()
        with pytest.raises(KeyboardInterrupt):
            call_command(
                "import_products", str(path), "--chunk-size", "2", verbosity=0,
                stdout=StringIO(), stderr=err,
            )  # fmt: skip
        log = only_log()
        assert (log.status, log.checkpoint_position) == (BatchProcessingLog.Status.INTERRUPTED, 2)
        assert err.getvalue() == f"interrupted: continue run #{log.pk} with --resume {log.pk}\n"

    def test_resume_unknown_run(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        with pytest.raises(CommandError, match="no batch run #999 to resume"):
            run("import_products", path, resume=999)

    def test_resume_finished_run(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        run("import_products", path, verbosity=0)
        log = only_log()
        with pytest.raises(CommandError, match=f"run #{log.pk} has already finished"):
            run("import_products", path, resume=log.pk)

    def test_resume_other_operation(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        log = make_log(status="interrupted", operation="product_views")
        with pytest.raises(CommandError, match="is a optimized product_views run"):
            run("import_products", path, resume=log.pk)

    def test_resume_refuses_a_live_run(self, tmp_path):
        path = write_csv(tmp_path / "products.csv", [product_row(1)])
        log = make_log(status="running", worker=f"{socket.gethostname()}:{os.getpid()}")
        with pytest.raises(CommandError, match=f"run #{log.pk} is still running"):
            run("import_products", path, resume=log.pk)
        assert not Product.objects.exists()


def make_log(**fields) -> BatchProcessingLog:
    now = timezone.now()
    values = {
        "operation": BatchProcessingLog.Operation.PRODUCTS,
        "variant": BatchProcessingLog.Variant.OPTIMIZED,
        "chunk_size": 2,
        "started_at": now,
        "heartbeat_at": now,
        "database_vendor": "sqlite",
    } | fields
    return BatchProcessingLog.objects.create(**values)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class TestResumeInProcess:
    def test_resume_marks_a_dead_run_interrupted_and_continues_it(self, tmp_path):
        """A run that died after 2 of 5 rows: the command resumes it after the checkpoint."""
        path = write_csv(tmp_path / "products.csv", [product_row(i) for i in range(1, 6)])
        for i in (1, 2):  # what the dead run had committed
            ProductFactory(sku=f"IMP-{i:05d}", name="first attempt")
        log = make_log(
            status="running",
            worker=f"{socket.gethostname()}:{dead_pid()}",
            checkpoint_position=2,
            rows_written=2,
            rows_created=2,
            chunks_committed=1,
        )

        out = run("import_products", path, resume=log.pk)

        log.refresh_from_db()
        assert (log.status, log.resume_count, log.rows_read) == ("completed", 1, 5)
        assert (log.rows_created, log.rows_updated, log.checkpoint_position) == (5, 0, 5)
        # Its own chunk size, not the command's default: 3 rows left, in 2 chunks.
        assert (log.chunk_size, log.chunks_committed) == (2, 1 + 2)
        # The committed prefix is not written again.
        assert Product.objects.filter(name="first attempt").count() == 2
        assert sorted(products_by_sku()) == [f"IMP-{i:05d}" for i in range(1, 6)]
        assert f"Resuming products from {path} as run #{log.pk}" in out
        assert "Resumed at row 2: 3 rows in" in out


# -- product views ---------------------------------------------------------------


class TestImportProductViews:
    def test_csv(self, tmp_path, settings):
        user = UserFactory()
        products = ProductFactory.create_batch(2)
        header = ["user_id", "product_id", "session_id", "interaction_type", "created_at"]
        rows = [
            {
                "user_id": str(user.pk),
                "product_id": str(products[i % 2].pk),
                "session_id": f"s{i}",
                "interaction_type": "click" if i == 0 else "",
                "created_at": "2026-01-02T03:04:05+00:00",
            }
            for i in range(3)
        ]
        rows.append(rows[0] | {"product_id": "999999"})
        path = write_csv(tmp_path / "views.csv", rows, header=header)

        out = run("import_product_views", path)

        assert ProductView.objects.count() == 3
        # BULK_VOLUME_CHUNK_SIZE, not the service's default (the file has 4 rows).
        assert (settings.BULK_VOLUME_CHUNK_SIZE, settings.BULK_CHUNK_SIZE) == (5000, 1000)
        assert only_log().chunk_size == 5000
        assert ProductView.objects.filter(interaction_type="click").count() == 1
        assert sorted(Product.objects.values_list("view_count", flat=True)) == [1, 2]
        log = only_log()
        assert log.operation == BatchProcessingLog.Operation.PRODUCT_VIEWS
        assert "line 5: product_id: product 999999 does not exist" in out
        assert f"Importing product views from {path}\n" in out
        assert f"Run #{log.pk} partial: 4 rows read, 3 created" in out
        assert get_user_model().objects.count() == 1


# -- the readers -----------------------------------------------------------------


class TestReaders:
    def test_is_a_lazy_iterator(self, tmp_path):
        """Reading the first row does not read the rest: here, a corrupt gzip tail.

        The valid part is far larger than any read buffer, so an eager
        reader would reach the corruption and fail at once.
        """
        path = write_csv(tmp_path / "big.csv.gz", [product_row(i) for i in range(100_000)])
        with open(path, "ab") as out:
            out.write(b"this is not gzip data" * 100)
        with RowStream(path) as stream:
            assert iter(stream) is stream
            assert next(stream) == product_row(0)
            assert stream.rows_yielded == 1
            with pytest.raises(OSError, match="Not a gzipped file"):
                for _ in stream:
                    pass

    def test_a_line_without_end_is_read_in_bounded_pieces(self, tmp_path):
        """24 MiB with no line break: a bad line, never held whole, and the next row is read."""
        path = tmp_path / "rows.csv.gz"
        path.write_bytes(gzip_bomb(24 << 20, before="a,b\n1,2\n") + gzip.compress(b"\n3,4\n"))
        tracemalloc.start()
        try:
            with RowStream(path) as stream:
                rows = list(stream)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"{peak:,} bytes allocated at the peak"
        assert rows[0] == {"a": "1", "b": "2"}
        assert isinstance(rows[1], BadLine)
        assert (rows[1].line, rows[1].reason) == (
            3,
            "longer than 1,048,576 characters (settings.IMPORT_MAX_LINE_LENGTH); "
            "the line is skipped",
        )
        assert rows[2] == {"a": "3", "b": "4"}
        assert stream.line_of(2) == 4

    def test_a_multi_line_record_shares_one_bound(self, settings, tmp_path):
        settings.IMPORT_MAX_LINE_LENGTH = 20
        path = tmp_path / "rows.csv"
        quoted = "\n".join(["x" * 8] * 4)  # four short lines, 35 characters in all
        path.write_text(f'a,b\n1,"{quoted}"\n2,ok\n', encoding="utf-8")
        with RowStream(path) as stream:
            rows = list(stream)
        assert isinstance(rows[0], BadLine)
        assert rows[0].line == 2
        # The record's last lines are read as records of their own (bad ones):
        # the reader recovers at the next record boundary it can see.
        assert rows[-1] == {"a": "2", "b": "ok"}
        assert stream.line_of(len(rows) - 1) == 6

    def test_line_numbers(self, tmp_path):
        path = tmp_path / "rows.csv"
        path.write_text('a,b\n1,2\n\n\n3,"x\ny\nz"\n4,5\n\n6,7', encoding="utf-8")
        with RowStream(path) as stream:
            rows = list(stream)
            assert [row["a"] for row in rows] == ["1", "3", "4", "6"]
            assert [stream.line_of(i) for i in range(4)] == [2, 5, 8, 10]

    def test_line_map_grows_with_gaps_not_rows(self, tmp_path):
        path = write_csv(tmp_path / "rows.csv", [product_row(i) for i in range(1000)])
        with RowStream(path) as stream:
            assert sum(1 for _ in stream) == 1000
            assert stream.line_of(999) == 1001
            assert stream.line_map() == [(0, 2)]

    def test_the_line_map_outlives_the_stream(self, tmp_path):
        """Kept as JSON, it gives the same lines without the file (the admin's import)."""
        path = write_lines(tmp_path / "rows.jsonl", ["", '{"a": 1}', '{"a": 2}', "", "nope", "1"])
        with RowStream(path) as stream:
            count = sum(1 for _ in stream)
            lines = [stream.line_of(index) for index in range(count)]
            kept = json.loads(json.dumps(stream.line_map()))
        assert [line_at(kept, index) for index in range(count)] == lines == [2, 3, 5, 6]

    @pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
    def test_a_file_object_is_read_like_its_path(self, tmp_path, gzipped):
        path = write_csv(tmp_path / "rows.csv", [product_row(i) for i in range(3)])
        data = path.read_bytes()
        name = "upload.csv"
        if gzipped:
            data, name = gzip.compress(data), "upload.csv.gz"
        file = BytesIO(data)
        with RowStream(file, name=name) as stream:
            assert list(stream) == list(RowStream(path))
            assert stream.estimate_total() is None
        assert file.closed

    def test_jsonl_line_numbers_skip_blank_lines(self, tmp_path):
        path = write_lines(tmp_path / "rows.jsonl", ["", '{"a": 1}', '{"a": 2}', "", "nope"])
        with RowStream(path) as stream:
            rows = list(stream)
            assert rows[:2] == [{"a": 1}, {"a": 2}]
            assert isinstance(rows[2], BadLine)
            assert rows[2].line == 5
            assert [stream.line_of(i) for i in range(3)] == [2, 3, 5]

    def test_bad_line_is_rejected_by_the_row_parser_with_its_reason(self):
        bad = BadLine(4, "not valid JSON: oops")
        with pytest.raises(r.RowInvalid) as caught:
            r.parse_product(bad)
        assert (caught.value.field, caught.value.message) == ("row", "not valid JSON: oops")

    def test_byte_order_mark_is_dropped(self, tmp_path):
        path = tmp_path / "excel.csv"
        path.write_bytes("\ufeffsku,name\nA,B\n".encode())
        with RowStream(path) as stream:
            assert list(stream) == [{"sku": "A", "name": "B"}]

    @pytest.mark.parametrize(
        ("header", "message"),
        [("sku,sku\n", "names column 'sku' twice"), ("sku,,name\n", "column 2 of the header")],
    )
    def test_bad_header(self, tmp_path, header, message):
        path = tmp_path / "rows.csv"
        path.write_text(header)
        with pytest.raises(ReaderError, match=message):
            RowStream(path)

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("a.csv", ("csv", False)),
            ("a.CSV.GZ", ("csv", True)),
            ("a.b.jsonl", ("jsonl", False)),
            ("a.ndjson.gz", ("jsonl", True)),
        ],
    )
    def test_format_from_the_name(self, name, expected):
        assert detect_format(Path(name)) == expected

    @pytest.mark.parametrize("name", ["a.gz", "a", "a.json", "a.csv.bz2"])
    def test_unknown_names(self, name):
        with pytest.raises(ReaderError, match="cannot tell the format"):
            detect_format(Path(name))

    def test_a_field_over_the_csv_limit_is_a_bad_line_and_reading_goes_on(self, tmp_path):
        path = tmp_path / "rows.csv"
        path.write_text(f"a,b\n{'x' * (csv.field_size_limit() + 1)},1\n2,3\n", encoding="utf-8")
        with RowStream(path) as stream:
            bad, good = list(stream)
        assert isinstance(bad, BadLine) and len(bad) == 0 and list(bad) == []
        assert (bad.line, bad.reason) == (
            2,
            "not valid CSV: field larger than field limit (131072)",
        )
        assert repr(bad) == f"BadLine(line=2, reason={bad.reason!r})"
        assert good == {"a": "2", "b": "3"}

    def test_a_header_the_csv_module_refuses_is_a_reader_error(self, tmp_path):
        path = tmp_path / "rows.csv"
        path.write_text("x" * (csv.field_size_limit() + 1) + "\n", encoding="utf-8")
        with pytest.raises(ReaderError, match=r"rows.csv: not valid CSV: field larger than"):
            RowStream(path)

    def test_a_header_that_is_not_utf8_is_a_reader_error(self, tmp_path):
        path = tmp_path / "rows.csv"
        path.write_bytes(b"sku,n\xe9me\nA,B\n")
        with pytest.raises(ReaderError, match=r"rows\.csv: the header is not valid UTF-8 text"):
            RowStream(path)

    @pytest.mark.parametrize(("name", "line"), [("rows.csv", b"\xff,1"), ("rows.jsonl", b"\xff")])
    def test_a_row_that_is_not_utf8_is_a_bad_line(self, tmp_path, name, line):
        path = tmp_path / name
        header = b"a,b\n" if name.endswith(".csv") else b""
        ok = b"2,3\n" if name.endswith(".csv") else b'{"a": "2"}\n'
        path.write_bytes(header + line + b"\n" + ok)
        with RowStream(path) as stream:
            bad, good = list(stream)
        assert (bad.line, bad.reason) == (2 if header else 1, "not valid UTF-8 text")
        assert good["a"] == "2"

    def test_an_unknown_format_is_named_with_the_choices(self):
        with pytest.raises(ReaderError, match="unknown format 'xml': choose one of csv, jsonl"):
            detect_format(Path("a.csv"), "xml")

    def test_a_line_map_knows_no_row_before_it_starts(self):
        with pytest.raises(IndexError, match="row 0 has not been read"):
            line_at([(1, 2)], 0)

    def test_estimate_total(self, tmp_path):
        csv_path = write_csv(tmp_path / "a.csv", [product_row(i) for i in range(7)])
        jsonl_path = tmp_path / "a.jsonl"
        jsonl_path.write_text('{"a": 1}\n{"a": 2}')  # no final line break
        with RowStream(csv_path) as a, RowStream(jsonl_path) as b:
            assert (a.estimate_total(), b.estimate_total()) == (7, 2)
        gz_path = write_csv(tmp_path / "a.csv.gz", [product_row(1)])
        with RowStream(gz_path) as c:
            assert c.estimate_total() is None


# -- --background: a job staged from the file ---------------------------------------------


@pytest.mark.django_db
class TestBackground:
    def test_the_rows_become_a_job_the_workers_run(self, tmp_path, settings):
        from jobs.models import Job, StagedRecord
        from jobs.tasks import run_partition

        settings.JOB_PARTITION_ROWS = 2
        path = write_lines(
            tmp_path / "catalogue.jsonl",
            [json.dumps(product_row(i)) for i in range(2)]
            + ["{not json"]
            + [json.dumps(product_row(i)) for i in range(2, 5)],
        )
        out = StringIO()
        call_command("import_products", str(path), "--background", stdout=out)

        # Every line is staged as it is, the unreadable one too: row indexes stay the file's.
        job = Job.objects.get()
        assert (job.operation, job.rows_total, job.partitions.count()) == ("products", 6, 3)
        assert f"Submitted job {job.pk}: 6 rows in 3 partitions" in out.getvalue()
        staged = StagedRecord.objects.filter(job=job).order_by("number")
        assert staged.values_list("record", flat=True)[2] == "{not json"
        assert not Product.objects.exists()  # nothing ran in the command

        for pk in job.partitions.values_list("pk", flat=True):
            run_partition.call(pk)
        assert products_by_sku() == {f"IMP-{i:05d}": expected_product(i) for i in range(5)}
        # The job's run reports it at its row (the file's third, index 2): the
        # first of the second partition, whose log counts from its start.
        reported = [
            (partition.start + error["index"], error["message"])
            for partition in job.partitions.select_related("log")
            for error in partition.log.row_errors
        ]
        assert [index for index, _ in reported] == [2]
        assert "not valid JSON" in reported[0][1]

    def test_a_job_imports_what_the_command_imports(self, tmp_path, settings):
        """The workers parse the staged records as the command parses the file."""
        from jobs.models import Job
        from jobs.tasks import run_partition

        settings.JOB_PARTITION_ROWS = 3
        rows = [product_row(i) for i in range(7)]
        rows[1]["name"] = 'A "quoted",\r\nmulti-line name'
        rows[2]["name"] = "tab\tand back\\slash"  # what COPY's text format escapes
        rows[4]["price"] = "not a price"
        rows[5]["sku"] = rows[0]["sku"]  # a duplicate in another partition
        path = write_csv(tmp_path / "catalogue.csv", rows)
        with path.open("a") as out:
            out.write("\nIMP-09999,too,few\n")  # a blank line, then too few fields

        call_command("import_products", str(path), stdout=StringIO())
        by_command = products_by_sku()
        errors = [(e["index"], e["message"]) for e in only_log().row_errors]
        Product.objects.all().delete()
        BatchProcessingLog.objects.all().delete()

        call_command("import_products", str(path), "--background", stdout=StringIO())
        job = Job.objects.get()
        for pk in job.partitions.order_by("-number").values_list("pk", flat=True):
            run_partition.call(pk)  # the last first: it keys the earlier partitions itself
        job.refresh_from_db()
        assert products_by_sku() == by_command
        assert by_command[rows[1]["sku"]][0] == 'A "quoted",\r\nmulti-line name'
        assert by_command[rows[2]["sku"]][0] == "tab\tand back\\slash"
        assert [(e["index"], e["message"]) for e in job.as_dict()["result"]["errors"]] == errors
        assert [index for index, _ in errors] == [4, 5, 7]

    @pytest.mark.parametrize(
        ("extra", "named"),
        [
            (["--resume", "3"], "--resume"),
            (["--chunk-size", "5"], "--chunk-size"),
            (["--naive"], "--naive"),
        ],
    )
    def test_run_options_are_refused(self, tmp_path, extra, named):
        path = write_csv(tmp_path / "c.csv", [product_row(1)])
        with pytest.raises(CommandError, match=f"--background .*: drop {named}"):
            run("import_products", path, "--background", *extra)
