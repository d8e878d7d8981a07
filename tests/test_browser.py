"""Operators' workflows in a real browser: Playwright driving Debian's Chromium.

The browser and the screenshots folder are tests/browser_helpers.py's (the
fixtures ``chromium`` and ``screenshots`` are in conftest.py).
"""

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command

from batching.models import BatchProcessingLog
from jobs.models import JobPartition
from jobs.tasks import run_partition
from products.models import Product
from products.services import OptimizedBulkOperationsService
from tests.browser_helpers import snap
from tests.factories import ProductFactory, StaffFactory

PASSWORD = "staff-password"  # StaffFactory's

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def csp_violations() -> list[str]:
    """What the browser refused under the Content-Security-Policy, as Chromium logs it."""
    return []


@pytest.fixture
def page(chromium, live_server, csp_violations):
    context = chromium.new_context(
        base_url=live_server.url, viewport={"width": 1280, "height": 900}
    )
    page = context.new_page()
    # No page may load anything from the internet: fail on any request that
    # leaves the live server.
    outside: list[str] = []
    page.on(
        "request",
        lambda req: None if req.url.startswith(live_server.url) else outside.append(req.url),
    )
    # Nor may anything on it be blocked by the CSP (an inline script or style
    # without the nonce, a style attribute): Chromium logs each refusal.
    page.on(
        "console",
        lambda message: (
            csp_violations.append(message.text)
            if "Content Security Policy" in message.text
            else None
        ),
    )
    yield page
    context.close()
    assert outside == [], f"pages loaded from outside the shop: {outside}"
    assert csp_violations == [], f"refused by the Content-Security-Policy: {csp_violations}"


@pytest.fixture
def operator(page):
    """A staff superuser, logged in through the admin's login form."""
    user = StaffFactory()
    page.goto("/admin/login/")
    page.fill("#id_username", user.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")
    return user


def test_admin_index_after_login(page, operator, screenshots):
    assert page.title().startswith("Site administration")
    snap(page, screenshots, "01-admin-index")


CATALOGUE = """sku,name,category,price,stock_quantity,is_active
BRW-1,Kettle,Kitchen,19.99,5,true
BRW-2,Toaster,Kitchen,not-a-price,3,true
BRW-3,Lamp,Home,12.50,7,true
BRW-4,Chair,Home,45.00,-2,true
BRW-5,Desk,Home,120.00,1,true
"""


def test_import_csv_with_bad_lines(page, operator, screenshots, tmp_path, settings):
    """Upload, see the preview with the bad lines, confirm, reach the run's log."""
    settings.ADMIN_IMPORT_DIR = tmp_path / "imports"
    upload = tmp_path / "catalogue.csv"
    upload.write_text(CATALOGUE)

    page.goto("/admin/products/product/")
    page.click("#import-csv-link")
    page.check("input[name=kind][value=products]")
    page.set_input_files("input[name=file]", str(upload))
    snap(page, screenshots, "02-import-upload")
    page.click("#import-upload-submit")

    page.wait_for_selector("#import-preview")
    assert page.inner_text("#preview-rows") == "5"
    assert page.inner_text("#preview-created") == "3"
    assert page.inner_text("#preview-skipped") == "2"
    bad_lines = page.locator("#preview-errors td.line").all_inner_texts()
    assert bad_lines == ["3", "5"]
    snap(page, screenshots, "03-import-preview")

    page.click("#import-confirm")
    page.wait_for_selector("#import-result")
    assert page.inner_text("#result-created") == "3"
    assert page.inner_text("#result-skipped") == "2"
    assert page.locator("#import-bad-lines td.line").all_inner_texts() == ["3", "5"]
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["BRW-1", "BRW-3", "BRW-5"]
    snap(page, screenshots, "04-import-result")

    page.click(".import-log-link")
    page.wait_for_url("**/admin/batching/batchprocessinglog/*/change/")
    log = BatchProcessingLog.objects.get()
    assert log.operation == BatchProcessingLog.Operation.PRODUCTS
    assert log.rows_created == 3
    assert str(log.pk) in page.url
    snap(page, screenshots, "05-import-log")


def test_large_import_shows_progress_until_done(page, operator, screenshots, tmp_path, settings):
    """Over the sync limit the import is a background job; the page polls it."""
    settings.ADMIN_IMPORT_DIR = tmp_path / "imports"
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 2
    settings.JOB_PARTITION_ROWS = 2
    upload = tmp_path / "catalogue.csv"
    upload.write_text(CATALOGUE)

    page.goto("/admin/products/product/import/")
    page.check("input[name=kind][value=products]")
    page.set_input_files("input[name=file]", str(upload))
    page.click("#import-upload-submit")
    page.click("#import-confirm")
    page.wait_for_selector("#import-progress")
    assert page.inner_text("#import-progress-text").startswith("0 of 5 rows")
    snap(page, screenshots, "06-import-progress")

    # A worker's part, done here: run the job's partitions; the page notices.
    for partition in JobPartition.objects.values_list("pk", flat=True):
        run_partition.call(partition)
    page.wait_for_selector("#import-result", timeout=10_000)
    assert page.inner_text("#result-created") == "3"
    assert page.locator("#import-bad-lines td.line").all_inner_texts() == ["3", "5"]
    assert page.locator(".import-log-link").count() == 3  # one run per partition
    snap(page, screenshots, "07-import-background-result")


def test_dashboard_shows_runs_as_charts(page, operator, screenshots):
    call_command("test_bulk_performance", size=40, stdout=StringIO())

    page.goto("/admin/")
    page.click("#index-dashboard-link")
    page.wait_for_selector("h1#dashboard-title")
    charts = page.locator("#dashboard-charts svg.chart")
    assert charts.count() >= 2
    # Both variants of every operation ran: each appears in the over-time charts.
    over_time = page.inner_text("#dashboard-over-time")
    assert "naive" in over_time.lower() and "optimized" in over_time.lower()
    assert page.locator("#dashboard-slowest tbody tr").count() >= 1
    snap(page, screenshots, "08-dashboard")


def test_sales_report_page(page, operator, screenshots):
    kettle, lamp = ProductFactory(price=Decimal("20.00")), ProductFactory(price=Decimal("5.00"))
    kettle.stock_quantity = lamp.stock_quantity = 100
    Product.objects.bulk_update([kettle, lamp], ["stock_quantity"])
    orders = [
        {
            "reference": "B-1",
            "user_id": operator.pk,
            "items": [{"product_id": kettle.pk, "quantity": 2}],
        },
        {
            "reference": "B-2",
            "user_id": operator.pk,
            "items": [{"product_id": lamp.pk, "quantity": 4}],
        },
    ]
    assert OptimizedBulkOperationsService().process_orders(orders).written == 2

    page.goto("/admin/")
    page.click("#index-sales-report-link")
    page.wait_for_selector("h1#sales-report-title")
    assert page.inner_text("#total-orders") == "2"
    assert "60.00" in page.inner_text("#total-revenue")
    assert "30.00" in page.inner_text("#average-order-value")
    assert page.locator("#sales-report-chart svg.chart").count() == 1
    snap(page, screenshots, "09-sales-report")


def test_csp_violations_are_caught(page, operator, csp_violations):
    """The check the other tests rely on: an inline script without the nonce is reported."""
    with page.expect_console_message(lambda message: "script-src" in message.text):
        page.evaluate(
            """() => {
                const script = document.createElement("script");
                script.textContent = "window.ranInline = true";
                document.body.appendChild(script);
            }"""
        )
    assert page.evaluate("window.ranInline === undefined")
    assert any("script-src" in message for message in csp_violations), csp_violations
    csp_violations.clear()


def test_api_docs_page(page, operator, screenshots):
    """Swagger UI from ninja's own static files, under the shop's CSP."""
    page.goto("/api/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "Shop bulk operations" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock").count() >= 1
    # An operation opened: its selects draw their arrows as data: images.
    page.locator(".opblock-summary").first.click()
    page.wait_for_selector(".opblock-body select")
    snap(page, screenshots, "10-api-docs")


def test_product_list_page(page, operator, screenshots):
    product = ProductFactory(name="Kettle")
    page.goto("/products/")
    page.wait_for_selector("#product-list")
    assert product.sku in page.inner_text("#product-list")
    snap(page, screenshots, "11-product-list")


def test_admin_forms_and_lists_work_under_the_csp(page, operator, screenshots):
    """Django's admin scripts (autocomplete, filters, date hierarchy) under the shop's CSP."""
    product = ProductFactory()
    call_command("test_bulk_performance", size=10, stdout=StringIO())

    page.goto(f"/admin/products/product/{product.pk}/change/")
    page.click(".field-category .select2-selection")
    # The list says "Searching…" until the autocomplete view has answered.
    page.locator(".select2-results__option", has_text=product.category.name).wait_for()
    snap(page, screenshots, "12-product-change-autocomplete")

    page.goto("/admin/batching/batchprocessinglog/?status__exact=completed")
    page.wait_for_selector("#changelist-filter")
    assert page.locator("#result_list tbody tr").count() >= 1
    snap(page, screenshots, "13-log-changelist-filtered")
