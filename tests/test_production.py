"""The production server: gunicorn with DEBUG off, after a real collectstatic.

One server for the module (``bench.server.gunicorn``, what ``make serve``
runs, with the loopback environment of docs/deploy.md), its static files
collected into a temporary STATIC_ROOT with the manifest storage settings
choose when DEBUG is off. Its database: on PostgreSQL the test database
itself (migrated by pytest-django; the tests here are transactional, so what
the server writes is flushed after each); on SQLite, whose test database is
in memory where no other process can open it, a database file migrated here,
in parallel with collectstatic.

The browser tests look at the admin and /api/docs styled by the collected
files; ``bench_load`` runs at a tiny scale against the same server, so its
exactly-once check runs for real.
"""

import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from api.models import ApiToken, IdempotencyRecord
from batching.models import BatchProcessingLog
from bench import load, server
from products.models import Product, ProductView
from products.services import OptimizedBulkOperationsService
from tests.browser_helpers import snap

# Django admin's header colour (--header-bg, #417690) and Swagger UI's title size:
# set by their stylesheets only (unstyled, the header is transparent and an h2 24px).
ADMIN_HEADER_BACKGROUND = "rgb(65, 118, 144)"
SWAGGER_TITLE_SIZE = "36px"
# One group in pytest-django's order (transactional tests run after the others),
# so the module's server starts once.
pytestmark = pytest.mark.django_db(transaction=True)

# bench_load at its smallest: 2 clients for 2 seconds, batches of 10 rows of 20 products.
TINY = ["--clients", "2", "--seconds", "2", "--batch", "10", "--products", "20"]


@dataclass(frozen=True)
class Production:
    url: str  # the server's
    database_url: str  # the database it serves


@pytest.fixture(scope="module")
def production_server(django_db_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("production")
    own_database = not server.database_url()
    database_url = server.database_url() or f"sqlite:///{folder / 'db.sqlite3'}"
    environment = server.loopback_environment(database_url, STATIC_ROOT=str(folder / "static"))
    steps = [server.manage(environment, "collectstatic", "--noinput", "--verbosity", "0")]
    if own_database:
        steps.append(server.manage(environment, "migrate", "--verbosity", "0"))
    for step in steps:
        server.finish(step)
    with server.gunicorn(environment, folder / "gunicorn.log") as running:
        yield Production(url=running.url, database_url=database_url)


@pytest.fixture
def production_page(chromium, production_server):
    """A page on the production server that fails its test if anything came from elsewhere."""
    context = chromium.new_context(
        base_url=production_server.url,
        viewport={"width": 1280, "height": 900},
        color_scheme="light",
    )
    page = context.new_page()
    outside: list[str] = []
    refused: list[str] = []
    page.on(
        "request",
        lambda req: None if req.url.startswith(production_server.url) else outside.append(req.url),
    )
    page.on(
        "console",
        lambda message: (
            refused.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    yield page
    context.close()
    assert outside == [], f"pages loaded from outside the shop: {outside}"
    assert refused == [], f"refused by the Content-Security-Policy: {refused}"


def stylesheets(page) -> dict[str, int]:
    """Every stylesheet the page has loaded so far: URL path to HTTP status."""
    loaded: dict[str, int] = {}
    page.on(
        "response",
        lambda response: (
            loaded.__setitem__(response.url.split("/", 3)[3], response.status)
            if response.request.resource_type == "stylesheet"
            else None
        ),
    )
    return loaded


@pytest.mark.browser
def test_admin_login_page_is_styled(production_page, screenshots):
    loaded = stylesheets(production_page)
    production_page.goto("/admin/login/")
    production_page.wait_for_selector("#login-form")
    base = [path for path in loaded if path.startswith("static/admin/css/base.")]
    # The manifest's name: content-hashed, served by WhiteNoise.
    assert len(base) == 1 and base[0] != "static/admin/css/base.css", loaded
    assert loaded[base[0]] == 200
    background = production_page.eval_on_selector(
        "#header", "header => getComputedStyle(header).backgroundColor"
    )
    assert background == ADMIN_HEADER_BACKGROUND
    snap(production_page, screenshots, "20-production-admin-login")


@pytest.mark.browser
def test_api_docs_are_styled(production_page, screenshots):
    """Swagger UI's script and stylesheet from ninja's static files, collected and hashed."""
    loaded = stylesheets(production_page)
    scripts: dict[str, int] = {}
    production_page.on(
        "response",
        lambda response: (
            scripts.__setitem__(response.url.split("/", 3)[3], response.status)
            if response.request.resource_type == "script"
            else None
        ),
    )
    production_page.goto("/api/docs")
    production_page.wait_for_selector(".swagger-ui .info .title")
    css = [path for path in loaded if path.startswith("static/ninja/swagger-ui.")]
    assert len(css) == 1 and loaded[css[0]] == 200, loaded
    bundle = [path for path in scripts if path.startswith("static/ninja/swagger-ui-bundle.")]
    assert len(bundle) == 1 and scripts[bundle[0]] == 200, scripts
    title = production_page.locator(".swagger-ui .info .title")
    assert "Shop bulk operations" in title.inner_text()
    assert title.evaluate("title => getComputedStyle(title).fontSize") == SWAGGER_TITLE_SIZE
    assert production_page.locator(".opblock").count() >= 1
    snap(production_page, screenshots, "21-production-api-docs")


def test_static_files_are_compressed_and_cached_for_good(production_server):
    """A hashed name never changes content: cached a year; gzip to a client that takes it."""
    with urllib.request.urlopen(f"{production_server.url}/admin/login/") as answer:
        page = answer.read().decode()
    start = page.index("/static/admin/css/base.")
    path = page[start : page.index('"', start)]
    request = urllib.request.Request(
        f"{production_server.url}{path}", headers={"Accept-Encoding": "gzip"}
    )
    with urllib.request.urlopen(request) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Encoding"] == "gzip"
        assert "immutable" in answer.headers["Cache-Control"]
        assert answer.headers["Content-Type"].startswith("text/css")


def test_bench_load_against_the_server(production_server):
    """bench_load at a tiny scale against the real server, on the server's database."""
    command = ["bench_load", "--url", production_server.url, *TINY, "--markdown"]
    result = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=settings.BASE_DIR,
        env={**os.environ, "DATABASE_URL": production_server.database_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "## The production server under load (`bench_load`)"
    assert lines[2] == (
        "Command: `python manage.py bench_load --clients 2 --seconds 2 --batch 10 "
        "--products 20 --markdown`"
    )
    table = [line for line in lines if line.startswith("|")]
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| `POST /api/product-views/bulk`",
        "| `GET /api/batch-logs`",
    ]
    summary = lines[-1]
    assert summary.endswith("every posted row stored exactly once; 0 errors, 0 5xx."), summary
    posted = int(summary.split(" rows in ")[0].replace(",", ""))
    assert posted > 0 and posted % 10 == 0


def test_bench_load_check_finds_rows_missing_or_stored_twice():
    """The exactly-once check, fed rows stored by the service the endpoint calls."""
    namespace = load.prepare(users=2, products=3)
    client = load.Client(0, "http://127.0.0.1:1", namespace, batch=4, timeout=1)
    staff = get_user_model().objects.get(pk=namespace.staff_id)
    tally = load.Tally()
    service = OptimizedBulkOperationsService()
    for sequence in range(2):
        result = service.create_product_views(client.rows(sequence))
        IdempotencyRecord.objects.create(
            user=staff, key=f"key-{sequence}", request_hash="-", status_code=200
        )
        tally.posted_rows += result.written
        tally.posted_batches += 1
        tally.log_ids.append(result.log_id)
        tally.keys.append(f"key-{sequence}")
    assert tally.posted_rows == 8
    assert load.verify(namespace, tally) == []

    service.create_product_views(client.rows(0)[:1])  # one row again: stored twice
    assert load.verify(namespace, tally) == [
        "9 view rows stored for 8 posted",
        "1 view rows repeat another row's session id",
        "the products' view_count adds up to 9, not the 8 rows posted",
    ]
    ProductView.objects.filter(session_id__startswith=namespace.session_prefix).delete()
    Product.objects.filter(pk__in=namespace.product_ids).update(view_count=0)
    # A third batch said posted under the first one's key and run: the key was reused.
    tally.posted_batches += 1
    tally.log_ids.append(tally.log_ids[0])
    tally.keys.append(tally.keys[0])
    assert load.verify(namespace, tally) == [
        "0 view rows stored for 8 posted",
        "the products' view_count adds up to 0, not the 8 rows posted",
        "2 idempotency records answered 200 for 2 distinct keys of 3 batches posted",
        "2 distinct batch runs answered 3 batches",
    ]


def test_bench_load_removes_what_it_created():
    namespace = load.prepare(users=2, products=3)
    client = load.Client(0, "http://127.0.0.1:1", namespace, batch=4, timeout=1)
    result = OptimizedBulkOperationsService().create_product_views(client.rows(0))
    load.remove(namespace, [result.log_id])
    assert not get_user_model().objects.filter(username__startswith=namespace.tag).exists()
    assert not Product.objects.filter(sku__startswith=namespace.tag).exists()
    assert not ProductView.objects.exists()
    assert not BatchProcessingLog.objects.exists()
    assert not ApiToken.objects.exists() and not IdempotencyRecord.objects.exists()
