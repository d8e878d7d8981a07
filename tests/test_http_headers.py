"""Response headers: a Content-Security-Policy on every page, no-store on live data.

The browser tests (tests/test_browser.py) check that no page breaks under the
policy; these check the headers themselves and that the one inline script
carries the request's nonce.
"""

import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from tests.factories import StaffFactory

pytestmark = pytest.mark.django_db

PAGES = [
    "/admin/login/",
    "/admin/",
    "/admin/batching/batchprocessinglog/",
    "/admin/batching/batchprocessinglog/dashboard/",
    "/admin/orders/order/sales-report/",
    "/admin/products/product/import/",
    "/products/",
    "/api/docs",
    "/api/openapi.json",
    "/api/batch-logs",
    "/health",
    "/no-such-page",
]

NO_STORE = [
    "/api/batch-logs",  # an answer
    "/api/no-such-endpoint",  # Django's 404 under /api/
    "/api/openapi.json",
    "/api/docs",
    "/products/",
]


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(StaffFactory())
    return client


def csp_nonce(response) -> str:
    policy = response["Content-Security-Policy"]
    return re.search(r"script-src 'self' 'nonce-([^']+)'", policy).group(1)


@pytest.mark.parametrize("url", PAGES)
def test_every_page_has_a_content_security_policy(staff_client, url):
    response = staff_client.get(url)
    assert response.status_code in (200, 302, 404, 503)
    policy = response["Content-Security-Policy"]
    assert "default-src 'self'" in policy
    assert "object-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "'unsafe-inline'" not in policy


def test_the_nonce_is_new_for_every_response(staff_client):
    first = csp_nonce(staff_client.get("/admin/"))
    assert first != csp_nonce(staff_client.get("/admin/"))


def test_the_import_progress_script_carries_the_nonce(staff_client, settings, tmp_path):
    settings.ADMIN_IMPORT_DIR = tmp_path / "imports"
    settings.ADMIN_IMPORT_SYNC_MAX_ROWS = 1
    upload = SimpleUploadedFile(
        "c.csv", b"sku,name,category,price,stock_quantity\nA,a,T,1,1\nB,b,T,1,1\n"
    )
    detail = staff_client.post(
        reverse("admin:products_product_import"), {"kind": "products", "file": upload}
    )["Location"]
    staff_client.post(detail)  # confirmed: a background job, the page polls it
    response = staff_client.get(detail)
    content = response.content.decode()
    assert 'id="import-progress"' in content
    scripts = re.findall(r"<script\b[^>]*>", content)
    inline = [tag for tag in scripts if "src=" not in tag]
    assert inline == [f'<script nonce="{csp_nonce(response)}">']


@pytest.mark.parametrize("url", NO_STORE)
def test_api_answers_and_the_product_list_are_not_stored(staff_client, url):
    response = staff_client.get(url)
    assert "no-store" in response["Cache-Control"]


def test_an_unauthenticated_api_answer_is_not_stored(client):
    response = client.get("/api/batch-logs")
    assert response.status_code == 401
    assert "no-store" in response["Cache-Control"]
