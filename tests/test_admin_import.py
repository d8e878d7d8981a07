"""Imports in the admin: upload, dry-run preview, confirm, result with bad lines."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
import tracemalloc
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.http import Http404
from django.urls import reverse
from django.utils import timezone

from batching import readers
from batching.models import BatchProcessingLog
from batching.postgres import fast_paths
from batching.readers import RecordStream, RowStream
from jobs import services as job_services
from jobs.models import Job, StagedRecord
from jobs.tasks import run_partition
from products import imports
from products.models import Product, ProductView
from products.services import rows as r
from products.services.optimized import OptimizedBulkOperationsService
from tests.factories import (
    CategoryFactory,
    ProductFactory,
    StaffFactory,
    UserFactory,
    gzip_bomb,
)

pytestmark = pytest.mark.django_db

UPLOAD = reverse("admin:products_product_import")

# Line 1 is the header; line 4 has a bad price, line 6 a duplicate sku, line 7
# too few fields; line 5 updates an existing product.
PRODUCTS_CSV = (
    "sku,name,category,price,stock_quantity\n"
    "NEW-1,First,Tools,1.50,3\n"
    "NEW-2,Second,Tools,2.00,4\n"
    "NEW-3,Third,Tools,abc,5\n"
    "OLD-1,Renamed,Garden,9.99,7\n"
    "NEW-1,Again,Tools,1.00,1\n"
    "NEW-4,Short\n"
)


@pytest.fixture(autouse=True)
def _import_dir(settings, tmp_path):
    settings.ADMIN_IMPORT_DIR = tmp_path / "imports"


@pytest.fixture
def staff(client):
    user = StaffFactory()
    client.force_login(user)
    return user


@pytest.fixture
def existing():
    return ProductFactory(sku="OLD-1", category=CategoryFactory(name="Tools"))


def upload(client, text: str, *, name: str = "catalogue.csv", kind: str = "products"):
    file = SimpleUploadedFile(name, text.encode(), content_type="text/csv")
    return client.post(UPLOAD, {"kind": kind, "file": file})


def detail_url(response) -> str:
    assert response.status_code == 302, response.content.decode()[:2000]
    return response["Location"]


def token_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def test_the_changelist_links_to_the_import(client, staff):
    response = client.get(reverse("admin:products_product_changelist"))
    assert f'href="{UPLOAD}" id="import-csv-link"' in response.content.decode()


def test_preview_counts_and_bad_lines_without_writing(client, staff, existing):
    url = detail_url(upload(client, PRODUCTS_CSV))
    assert Product.objects.count() == 1
    response = client.get(url)
    assert response.status_code == 200
    preview = response.context["staged"].preview
    assert {key: preview[key] for key in ("rows", "created", "updated", "skipped")} == {
        "rows": 6,
        "created": 2,
        "updated": 1,
        "skipped": 3,
    }
    assert preview["errors"] == [
        {"line": 4, "field": "price", "message": "must be a decimal number"},
        {
            "line": 6,
            "field": "sku",
            "message": "duplicate sku in this input (first seen at row 0)",
        },
        {"line": 7, "field": "row", "message": "expected 5 fields as in the header, found 2"},
    ]
    html = response.content.decode()
    assert 'id="preview-created">2<' in html
    assert 'id="import-confirm"' in html
    assert Product.objects.count() == 1


def test_confirm_imports_the_good_rows_and_lists_the_bad_ones(client, staff, existing):
    url = detail_url(upload(client, PRODUCTS_CSV))
    response = client.post(url)
    assert response.status_code == 302
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["NEW-1", "NEW-2", "OLD-1"]
    existing.refresh_from_db()
    assert existing.price == Decimal("9.99")
    page = client.get(url)
    result = page.context["staged"].result
    assert (result["created"], result["updated"], result["skipped"]) == (2, 1, 3)
    assert [(error["line"], error["field"]) for error in result["errors"]] == [
        (4, "price"),
        (6, "sku"),
        (7, "row"),
    ]
    html = page.content.decode()
    log_id = result["log_ids"][0]
    log_url = reverse("admin:batching_batchprocessinglog_change", args=[log_id])
    assert f'href="{log_url}"' in html
    assert 'id="import-bad-lines"' in html
    # A second confirm (a double click) imports nothing more.
    client.post(url)
    assert Product.objects.count() == 3


def test_product_views_preview_reports_unknown_references(client, staff, existing):
    user = UserFactory()
    text = (
        "user_id,product_id,session_id\n"
        f"{user.pk},{existing.pk},s1\n"
        f"{user.pk},{existing.pk + 1000},s2\n"
        f"{user.pk},{existing.pk},s3\n"
    )
    url = detail_url(upload(client, text, name="views.csv", kind="product_views"))
    preview = client.get(url).context["staged"].preview
    assert (preview["created"], preview["skipped"]) == (2, 1)
    assert preview["errors"][0]["line"] == 3
    assert preview["errors"][0]["field"] == "product_id"
    client.post(url)
    assert ProductView.objects.count() == 2
    existing.refresh_from_db()
    assert existing.view_count == 2


def test_a_token_is_bound_to_its_user(client, staff, existing):
    url = detail_url(upload(client, PRODUCTS_CSV))
    token = token_of(url)
    other = StaffFactory()
    client.force_login(other)
    assert client.get(url).status_code == 404
    assert client.post(url).status_code == 404
    status = reverse("admin:products_product_import_status", args=[token])
    assert client.get(status).status_code == 404
    assert Product.objects.count() == 1


def test_a_made_up_token_is_not_found(client, staff):
    for token in ["x" * 43, "..", "." * 43, "a" * 42 + "%"]:
        url = reverse("admin:products_product_import_detail", args=[token])
        assert client.get(url).status_code == 404, token


def test_non_staff_are_sent_to_the_login_page(client):
    client.force_login(UserFactory())
    response = client.get(UPLOAD)
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


def test_staff_without_permission_are_forbidden(client, existing):
    user = UserFactory(is_staff=True)
    client.force_login(user)
    assert client.get(UPLOAD).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="add_productview"))
    client.force_login(user)
    assert client.get(UPLOAD).status_code == 200
    # Allowed to import views, not products.
    assert upload(client, PRODUCTS_CSV).status_code == 403


def test_an_unknown_format_is_a_form_error(client, staff):
    response = upload(client, "whatever", name="catalogue.xlsx")
    assert response.status_code == 200
    assert "cannot tell the format of catalogue.xlsx" in response.content.decode()


def test_more_rows_than_an_admin_import_takes_is_a_form_error(client, staff, settings):
    """Beyond ADMIN_IMPORT_MAX_ROWS the staging stops, rolls back and counts the rest."""
    settings.ADMIN_IMPORT_MAX_ROWS = 4
    response = upload(client, PRODUCTS_CSV + product_lines(2))
    assert response.status_code == 200
    assert "the file has 8 rows, more than the 4 an admin import takes" in (
        response.content.decode()
    )
    assert staged_files(settings) == []
    assert (Job.objects.count(), StagedRecord.objects.count()) == (0, 0)


def test_a_file_without_header_is_a_form_error(client, staff):
    response = upload(client, ",\n")
    assert response.status_code == 200
    assert "has no header row" in response.content.decode()


# An upload's queries before its preview: the sweep's look for abandoned held
# jobs; then SAVEPOINT, the job, its records (one COPY or INSERT), the job's
# total, RELEASE. Nothing is parsed, so no operation adds any.
STAGING_QUERIES = 6


def lookups_per_chunk(kind: str) -> int:
    """The reads of the operation's ``check``, one chunk: existing skus; users and products."""
    if kind == imports.PRODUCTS:
        return 1
    return 1 if fast_paths("default") else 2  # one statement for both tables on PostgreSQL


@pytest.mark.parametrize("rows", [4, 10])
def test_preview_queries_one_per_chunk(settings, staff, django_assert_num_queries, rows):
    settings.BULK_CHUNK_SIZE = 3
    text = "sku,name,category,price,stock_quantity\n" + "".join(
        f"S-{index},n,c,1,1\n" for index in range(rows)
    )
    upload_file = SimpleUploadedFile("c.csv", text.encode())
    # Per chunk of the preview: its staged rows read, then the lookups.
    chunks = math.ceil(rows / 3)
    with django_assert_num_queries(STAGING_QUERIES + chunks * (1 + lookups_per_chunk("products"))):
        staged = imports.stage(upload_file, imports.PRODUCTS, staff)
    assert staged.preview["created"] == rows


def test_views_preview_queries_per_chunk(settings, staff, existing, django_assert_num_queries):
    settings.BULK_CHUNK_SIZE = 2
    text = "user_id,product_id,session_id\n" + f"{staff.pk},{existing.pk},s\n" * 5
    upload_file = SimpleUploadedFile("v.csv", text.encode())
    chunks = math.ceil(5 / 2)
    with django_assert_num_queries(
        STAGING_QUERIES + chunks * (1 + lookups_per_chunk("product_views"))
    ):
        imports.stage(upload_file, imports.PRODUCT_VIEWS, staff)


def test_a_large_file_runs_in_the_background_with_progress(
    client, staff, existing, settings, django_capture_on_commit_callbacks
):
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 2
    url = detail_url(upload(client, PRODUCTS_CSV))
    token = token_of(url)
    status_url = reverse("admin:products_product_import_status", args=[token])
    with django_capture_on_commit_callbacks():
        client.post(url)
    assert Product.objects.count() == 1  # nothing yet: a worker runs it
    page = client.get(url)
    assert 'id="import-progress-bar"' in page.content.decode()
    assert f'data-status-url="{status_url}"' in page.content.decode()
    status = json.loads(client.get(status_url).content)
    # Line 7, which the reader could not parse, is staged as refused: its run reports it.
    assert status == {"state": "running", "rows_done": 0, "rows_total": 6, "job_status": "queued"}
    job = Job.objects.get(pk=imports.load(token, staff.pk).job_id)
    for pk in job.partitions.values_list("pk", flat=True):
        run_partition.call(pk)
    assert json.loads(client.get(status_url).content)["state"] == "done"
    result = client.get(url).context["staged"].result
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["NEW-1", "NEW-2", "OLD-1"]
    assert [(error["line"], error["field"]) for error in result["errors"]] == [
        (4, "price"),
        (6, "sku"),
        (7, "row"),
    ]
    assert (result["created"], result["updated"], result["skipped"]) == (2, 1, 3)
    assert result["log_ids"]


def staged_files(settings) -> list[str]:
    return sorted(path.name for path in Path(settings.ADMIN_IMPORT_DIR).iterdir())


def test_two_confirms_of_one_upload_import_it_once(client, staff, existing, settings):
    token = token_of(detail_url(upload(client, PRODUCTS_CSV)))
    # Both requests read the upload before either has run it.
    first, second = imports.load(token, staff.pk), imports.load(token, staff.pk)
    imports.run(first, staff)
    imports.run(second, staff)
    assert BatchProcessingLog.objects.count() == 1
    assert second.result is None
    assert imports.load(token, staff.pk).result["created"] == 2


def test_a_confirm_while_the_first_runs_shows_its_progress(client, staff, existing, monkeypatch):
    url = detail_url(upload(client, PRODUCTS_CSV))
    run_batch = job_services.run_batch
    seen = {}

    def import_while_the_user_clicks_again(operation, rows):
        seen["post"] = client.post(url)
        seen["page"] = client.get(url)
        return run_batch(operation, rows)

    monkeypatch.setattr(job_services, "run_batch", import_while_the_user_clicks_again)
    assert client.post(url).status_code == 302
    assert seen["post"].status_code == 302
    assert seen["page"].context["staged"].state == imports.RUNNING
    assert 'id="import-progress-bar"' in seen["page"].content.decode()
    assert BatchProcessingLog.objects.count() == 1
    assert client.get(url).context["staged"].result["created"] == 2


def test_a_failed_run_can_be_confirmed_again(client, staff, existing, monkeypatch):
    url = detail_url(upload(client, PRODUCTS_CSV))

    def broken(operation, rows):
        raise RuntimeError("the database went away")

    with monkeypatch.context() as patch:
        patch.setattr(job_services, "run_batch", broken)
        with pytest.raises(RuntimeError):
            client.post(url)
    assert client.get(url).context["staged"].state == imports.PREVIEW
    client.post(url)
    assert client.get(url).context["staged"].result["created"] == 2


def gzipped(text: str) -> bytes:
    return gzip.compress(text.encode(), mtime=0)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        # A flipped byte in the deflate stream: zlib.error.
        (lambda good: good[:20] + bytes([good[20] ^ 0xFF]) + good[21:], "invalid"),
        # Cut short: EOFError.
        (lambda good: good[:-12], "ended before the end-of-stream marker"),
        # A flipped byte in the data: the CRC fails.
        (lambda good: good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:], "CRC check failed"),
        # Not gzip at all.
        (lambda good: b"sku,name\n", "Not a gzipped file"),
    ],
)
def test_a_damaged_gzip_is_a_form_error_and_leaves_nothing(client, staff, settings, data, problem):
    good = gzipped(PRODUCTS_CSV * 20)
    file = SimpleUploadedFile("catalogue.csv.gz", data(good))
    response = client.post(UPLOAD, {"kind": "products", "file": file})
    assert response.status_code == 200
    content = response.content.decode()
    assert "cannot read the file: its gzip data is damaged or cut short" in content
    assert problem in content
    assert staged_files(settings) == []


def test_a_refused_upload_leaves_nothing(client, staff, settings):
    assert upload(client, ",\n").status_code == 200
    assert staged_files(settings) == []
    assert (Job.objects.count(), StagedRecord.objects.count()) == (0, 0)


# -- one read of the file, the services' own checks ----------------------------------


@pytest.fixture
def record_streams(monkeypatch):
    """Every reader the import opens, counted."""
    opened = []

    class Counted(RecordStream):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(imports, "RecordStream", Counted)
    return opened


@pytest.mark.parametrize("background", [False, True], ids=["in-the-request", "background"])
def test_the_file_is_read_once_per_upload(
    client,
    staff,
    existing,
    settings,
    record_streams,
    background,
    django_capture_on_commit_callbacks,
):
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 2 if background else 100
    url = detail_url(upload(client, PRODUCTS_CSV))
    assert len(record_streams) == 1
    client.get(url)
    with django_capture_on_commit_callbacks(execute=False):
        client.post(url)
    if background:
        job = Job.objects.get(pk=imports.load(token_of(url), staff.pk).job_id)
        for pk in job.partitions.values_list("pk", flat=True):
            run_partition.call(pk)
    result = client.get(url).context["staged"].result
    assert (result["created"], result["updated"], result["skipped"]) == (2, 1, 3)
    assert [error["line"] for error in result["errors"]] == [4, 6, 7]
    # Read once, at the upload; nothing of the file is kept on disk but its sidecar.
    assert len(record_streams) == 1
    assert all(name.endswith((".json", ".claim")) for name in staged_files(settings))
    # The staged input is gone once the import has ended.
    assert StagedRecord.objects.count() == 0
    assert Job.objects.count() == (1 if background else 0)


@pytest.mark.parametrize("name", ["catalogue.csv", "catalogue.csv.gz"])
def test_an_upload_spooled_to_disk_is_read_where_it_lies(client, staff, existing, settings, name):
    """Past FILE_UPLOAD_MAX_MEMORY_SIZE Django keeps the upload in a temporary file."""
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 0
    data = gzipped(PRODUCTS_CSV) if name.endswith(".gz") else PRODUCTS_CSV.encode()
    response = client.post(UPLOAD, {"kind": "products", "file": SimpleUploadedFile(name, data)})
    preview = client.get(detail_url(response)).context["staged"].preview
    assert (preview["created"], preview["updated"], preview["skipped"]) == (2, 1, 3)


def test_a_nul_character_is_a_bad_line_not_a_failed_upload(client, staff):
    """JSON Lines can carry one (``\\u0000``), which PostgreSQL cannot stage as it is."""
    text = (
        '{"sku": "A\\u0000", "name": "n", "category": "c", "price": "1", "stock_quantity": 1}\n'
        '{"sku": "B", "name": "n", "category": "c", "price": "1", "stock_quantity": 1}\n'
    )
    url = detail_url(upload(client, text, name="catalogue.jsonl"))
    preview = client.get(url).context["staged"].preview
    assert preview["errors"] == [{"line": 1, "field": "sku", "message": r.NUL_CHARACTER}]
    client.post(url)
    assert list(Product.objects.values_list("sku", flat=True)) == ["B"]


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_preview_errors_are_those_the_service_reports(
    staff, existing, settings, tmp_path, chunk_size
):
    """The preview is the operation's dry run: its errors and counts are the run's."""
    settings.BULK_CHUNK_SIZE = chunk_size
    text = (
        HEADER
        + "A-1,First,Tools,1.50,3\n"
        + "A-2,Second,Tools,-2,4\n"
        + "\n"  # a blank line: lines and indexes part
        + '"A-3","Multi\nline",Tools,2.00,4\n'
        + "OLD-1,Renamed,Garden,9.99,7\n"
        + "A-1,Again,Tools,1.00,1\n"  # a repeat from another chunk at chunk_size 2
        + "A-4,Short\n"
        + "A-5,,Tools,1,1\n"
        + "OLD-1,Twice,Garden,1,1\n"
    )
    path = tmp_path / "catalogue.csv"
    path.write_text(text)
    staged = imports.stage(SimpleUploadedFile(path.name, text.encode()), imports.PRODUCTS, staff)
    with RowStream(path) as stream:
        result = OptimizedBulkOperationsService().import_products(stream)
        reported = [
            {"line": stream.line_of(error.index), "field": error.field, "message": error.message}
            for error in sorted(result.errors, key=lambda error: error.index)
        ]
    preview = staged.preview
    assert preview["errors"] == reported
    assert [error["line"] for error in reported] == [3, 8, 9, 10, 11]
    counts = (preview["rows"], preview["created"], preview["updated"], preview["skipped"])
    assert counts == (result.read, result.created, result.updated, result.skipped)


def test_views_preview_errors_are_those_the_service_reports(staff, existing, settings, tmp_path):
    settings.BULK_CHUNK_SIZE = 2
    user = UserFactory()
    lines = [
        "user_id,product_id,session_id",
        f"{user.pk},{existing.pk},s1",
        f"{user.pk + 1000},{existing.pk},s2",
        f"{user.pk},{existing.pk + 1000},s3",
        f"{user.pk},{existing.pk}",
        f"{user.pk},x,s5",
        f"{user.pk},{existing.pk},s6",
    ]
    text = "\n".join(lines) + "\n"
    path = tmp_path / "views.csv"
    path.write_text(text)
    upload_file = SimpleUploadedFile(path.name, text.encode())
    staged = imports.stage(upload_file, imports.PRODUCT_VIEWS, staff)
    with RowStream(path) as stream:
        result = OptimizedBulkOperationsService().create_product_views(stream)
        reported = [
            {"line": stream.line_of(error.index), "field": error.field, "message": error.message}
            for error in sorted(result.errors, key=lambda error: error.index)
        ]
    assert staged.preview["errors"] == reported
    assert [error["field"] for error in reported] == ["user_id", "product_id", "row", "product_id"]
    assert (staged.preview["created"], staged.preview["skipped"]) == (2, 4)


def test_sweep_keeps_the_files_of_a_running_import(client, staff, existing, settings):
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 2
    running = token_of(detail_url(upload(client, PRODUCTS_CSV)))
    client.post(reverse("admin:products_product_import_detail", args=[running]))
    previewed = token_of(detail_url(upload(client, PRODUCTS_CSV)))
    assert imports.load(running, staff.pk).state == imports.RUNNING
    directory = Path(settings.ADMIN_IMPORT_DIR)
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in directory.iterdir():
        os.utime(path, (two_days_ago, two_days_ago))
    previewed_job = imports.load(previewed, staff.pk).job_id
    imports.sweep(directory)
    assert staged_files(settings) == sorted([f"{running}.json", f"{running}.claim"])
    assert previewed not in "".join(staged_files(settings))
    # The abandoned preview's staged input went with it; the running job's stays.
    assert not Job.objects.filter(pk=previewed_job).exists()
    assert Job.objects.filter(pk=imports.load(running, staff.pk).job_id).exists()


def test_sweep_removes_jobs_held_for_more_than_a_day(staff, settings):
    """Even without their sidecar (an upload whose process died between the two)."""
    upload_file = SimpleUploadedFile("c.csv", (HEADER + product_lines(3)).encode())
    staged = imports.stage(upload_file, imports.PRODUCTS, staff)
    staged.meta_path.unlink()
    directory = Path(settings.ADMIN_IMPORT_DIR)
    imports.sweep(directory)
    assert StagedRecord.objects.count() == 3  # held for less than a day
    Job.objects.update(created_at=timezone.now() - timedelta(days=2))
    imports.sweep(directory)
    assert (Job.objects.count(), StagedRecord.objects.count()) == (0, 0)


def test_sweep_passes_over_a_damaged_sidecar_and_removes_a_stray_file(staff, settings):
    directory = Path(settings.ADMIN_IMPORT_DIR)
    directory.mkdir(parents=True)
    damaged, stray = directory / f"{'a' * 43}.json", directory / f"{'b' * 43}.claim"
    damaged.write_text("{not json")
    stray.write_text("")
    two_days_ago = time.time() - 2 * 24 * 3600
    for path in (damaged, stray):
        os.utime(path, (two_days_ago, two_days_ago))
    imports.sweep(directory)
    assert staged_files(settings) == [damaged.name]


def test_an_upload_over_the_size_limit_is_refused_unread(staff, settings):
    settings.ADMIN_IMPORT_MAX_BYTES = 10
    file = SimpleUploadedFile("c.csv", (HEADER + product_lines(1)).encode())
    with pytest.raises(imports.ImportFileError, match="larger than 10 bytes"):
        imports.stage(file, imports.PRODUCTS, staff)
    assert not Path(settings.ADMIN_IMPORT_DIR).exists()


def test_a_failure_after_the_rows_were_staged_leaves_nothing(staff, settings, monkeypatch):
    def broken(staged, job):
        raise RuntimeError("the preview failed")

    monkeypatch.setattr(imports, "preview", broken)
    file = SimpleUploadedFile("c.csv", (HEADER + product_lines(3)).encode())
    with pytest.raises(RuntimeError, match="the preview failed"):
        imports.stage(file, imports.PRODUCTS, staff)
    assert (Job.objects.count(), StagedRecord.objects.count(), staged_files(settings)) == (0, 0, [])


def test_confirming_an_upload_swept_meanwhile_is_not_found(client, staff, existing):
    token = token_of(detail_url(upload(client, PRODUCTS_CSV)))
    staged = imports.load(token, staff.pk)
    job_services.discard_job(staged.job_id)
    with pytest.raises(Http404):
        imports.run(staged, staff)
    assert not staged.claim_path.exists()  # a later upload of it may be claimed
    assert not Product.objects.exclude(pk=existing.pk).exists()


def test_an_interrupt_after_committed_rows_shows_what_they_did(
    client, staff, existing, monkeypatch
):
    """The rows committed stay, the page shows their log, and the interrupt goes on up."""
    token = token_of(detail_url(upload(client, PRODUCTS_CSV)))
    run_batch = job_services.run_batch

    def interrupted(operation, rows):
        log = run_batch(operation, rows).log
        stop = KeyboardInterrupt()
        stop.batch_log = log  # as the engine marks a run's exception (run_log_of)
        raise stop

    monkeypatch.setattr(job_services, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imports.run(imports.load(token, staff.pk), staff)
    staged = imports.load(token, staff.pk)
    assert staged.state == imports.DONE
    assert (staged.result["created"], staged.result["updated"]) == (2, 1)
    assert staged.result["log_ids"] == [BatchProcessingLog.objects.get().pk]


# -- limits: decompressed size, line length, preview rows ---------------------------

HEADER = "sku,name,category,price,stock_quantity\n"
DECOMPRESSED_LIMIT = (
    "catalogue.csv.gz is larger than 262,144 bytes once decompressed "
    "(settings.IMPORT_MAX_DECOMPRESSED_BYTES)"
)


def product_lines(count: int, start: int = 0) -> str:
    return "".join(f"S-{index},n,c,1,1\n" for index in range(start, start + count))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # The zeros are the header: the first line is already too long.
        (
            lambda: gzip_bomb(16 << 20),
            "cannot read the file: catalogue.csv.gz: the header is longer than 65,536 "
            "characters (settings.IMPORT_MAX_LINE_LENGTH)",
        ),
        # After a good row: one long bad line, dropped until the cap is reached.
        (lambda: gzip_bomb(16 << 20, before=HEADER + product_lines(1)), DECOMPRESSED_LIMIT),
        # Good short rows past the previewed ones: inflated and counted all the same.
        (lambda: gzipped(HEADER + product_lines(30_000)), DECOMPRESSED_LIMIT),
    ],
    ids=["zeros-as-header", "zeros-after-a-row", "rows-past-the-preview"],
)
def test_a_gzip_bomb_is_a_form_error_naming_the_limit(client, staff, settings, data, message):
    settings.IMPORT_MAX_DECOMPRESSED_BYTES = 256 * 1024
    settings.IMPORT_MAX_LINE_LENGTH = 64 * 1024
    settings.ADMIN_IMPORT_PREVIEW_ROWS = 10
    file = SimpleUploadedFile("catalogue.csv.gz", data())
    response = client.post(UPLOAD, {"kind": "products", "file": file})
    assert response.status_code == 200
    assert response.context["form"].errors["file"] == [message]
    assert staged_files(settings) == []
    assert Product.objects.count() == 0


def test_a_gzip_bomb_upload_stays_small_in_memory(client, staff, settings):
    """24 MiB of zeros in one line, under the decompressed cap: a bad line, never held whole."""
    file = SimpleUploadedFile("catalogue.csv.gz", gzip_bomb(24 << 20, before=HEADER))
    tracemalloc.start()
    try:
        response = client.post(UPLOAD, {"kind": "products", "file": file})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated at the peak"
    preview = client.get(detail_url(response)).context["staged"].preview
    assert preview["errors"][0]["message"].startswith("longer than 1,048,576 characters")


def test_a_line_over_the_bound_is_a_bad_line_and_the_rest_imports(client, staff, settings):
    settings.IMPORT_MAX_LINE_LENGTH = 100
    text = HEADER + product_lines(1) + f"LONG,{'x' * 5000},c,1,1\n" + product_lines(2, start=1)
    url = detail_url(upload(client, text))
    preview = client.get(url).context["staged"].preview
    too_long = "longer than 100 characters (settings.IMPORT_MAX_LINE_LENGTH); the line is skipped"
    assert preview["errors"] == [{"line": 3, "field": "row", "message": too_long}]
    assert (preview["rows"], preview["created"], preview["skipped"]) == (4, 3, 1)
    client.post(url)
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["S-0", "S-1", "S-2"]
    result = client.get(url).context["staged"].result
    assert result["errors"] == [{"line": 3, "field": "row", "message": too_long}]


def test_the_preview_reads_a_bounded_number_of_rows_and_says_so(
    client, staff, settings, django_assert_num_queries
):
    settings.ADMIN_IMPORT_PREVIEW_ROWS = 3
    settings.BULK_CHUNK_SIZE = 2
    # A bad price on line 10, past the rows the preview reads.
    text = HEADER + product_lines(8) + "BAD,n,c,abc,1\n" + product_lines(2, start=8)
    upload_file = SimpleUploadedFile("c.csv", text.encode())
    # Every row is staged; only the chunks of the previewed rows are checked.
    chunks = math.ceil(3 / 2)
    with django_assert_num_queries(STAGING_QUERIES + chunks * (1 + lookups_per_chunk("products"))):
        staged = imports.stage(upload_file, imports.PRODUCTS, staff)
    preview = staged.preview
    assert {key: preview[key] for key in ("rows", "rows_total", "truncated", "created")} == {
        "rows": 3,
        "rows_total": 11,
        "truncated": True,
        "created": 3,
    }
    assert preview["errors"] == []
    url = reverse("admin:products_product_import_detail", args=[staged.token])
    html = client.get(url).content.decode()
    assert "The preview read the first 3 of the 11 rows" in html
    # The confirm imports every row, and finds the bad line the preview did not check.
    client.post(url)
    assert Product.objects.count() == 10
    result = client.get(url).context["staged"].result
    assert (result["read"], result["created"], result["skipped"]) == (11, 10, 1)
    assert [(error["line"], error["field"]) for error in result["errors"]] == [(10, "price")]


def test_a_preview_of_the_whole_file_says_nothing_of_a_bound(client, staff, settings):
    settings.ADMIN_IMPORT_PREVIEW_ROWS = 3
    url = detail_url(upload(client, HEADER + product_lines(3)))
    page = client.get(url)
    preview = page.context["staged"].preview
    assert (preview["rows"], preview["rows_total"], preview["truncated"]) == (3, 3, False)
    assert 'id="preview-truncated"' not in page.content.decode()


def test_a_background_import_holds_no_copy_of_the_file(staff, settings, monkeypatch):
    """Uploading a large file, confirming it and showing its result stay flat in
    the web process, from 5,000 to 25,000 rows: the records stream into the
    job's staged input as they are read, the confirm only names partitions,
    and the result maps only its errors to lines. The reader holds one block
    of the file: shrunk here, so that both files span many blocks."""
    monkeypatch.setattr(readers, "BLOCK_SIZE", 1 << 14)
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 10
    settings.JOB_PARTITION_ROWS = 50_000  # one partition at either size

    def traced(action) -> int:
        tracemalloc.start()
        try:
            action()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def peaks(count: int) -> tuple[int, int, int]:
        lines = "".join(f"M-{count}-{n},Memory {n},Shelf,1.50,{n % 50}\n" for n in range(count))
        text = HEADER + lines + "M-bad,x,Shelf,-1,1\n"
        upload_file = SimpleUploadedFile("c.csv", text.encode())
        kept: list[imports.Staged] = []
        upload = traced(lambda: kept.append(imports.stage(upload_file, imports.PRODUCTS, staff)))
        staged = kept[0]
        confirm = traced(lambda: imports.run(staged, staff))
        for pk in Job.objects.get(pk=staged.job_id).partitions.values_list("pk", flat=True):
            run_partition.call(pk)
        result = traced(lambda: imports.job_status(staged))
        assert staged.result["errors"][0]["line"] == count + 2  # the bad price
        return upload, confirm, result

    small, large = peaks(5_000), peaks(25_000)
    phases = ("upload", "confirm", "result")
    for phase, small_peak, large_peak in zip(phases, small, large, strict=True):
        assert large_peak < 1.5 * small_peak + 64 * 1024, (phase, small_peak, large_peak)
