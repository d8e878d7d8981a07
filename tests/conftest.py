import os
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from products.services import NaiveBulkOperationsService, OptimizedBulkOperationsService
from tests.browser_helpers import CHROMIUM, SCREENSHOTS_KEY, require_browser


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """Each test run gets its own SQLite file, so runs in one checkout never share one."""
    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database["TEST"]["NAME"] = str(Path(settings.BASE_DIR) / f"test-db-{os.getpid()}.sqlite3")


@pytest.fixture(autouse=True)
def _plain_http(settings):
    """Tests speak plain HTTP to the test client; deploy settings ask for HTTPS."""
    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture(autouse=True, scope="session")
def _static_files_without_collectstatic():
    """Static files as DEBUG serves them: found in the apps at each request, names unhashed.

    The suite runs with DEBUG off, where settings choose the manifest storage,
    which needs `collectstatic` to have run before any page can be rendered.
    The tests render pages without it; tests/test_production.py runs the real
    collectstatic and the manifest storage under the production server.
    """
    with override_settings(
        STORAGES={
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        },
        WHITENOISE_AUTOREFRESH=True,
        WHITENOISE_USE_FINDERS=True,
    ):
        yield


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Staff users are created in many tests; real hashing is slow by design."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def optimized():
    return OptimizedBulkOperationsService()


@pytest.fixture
def naive():
    return NaiveBulkOperationsService()


@pytest.fixture(params=["naive", "optimized"])
def service(request):
    """Each test that takes ``service`` runs once per variant."""
    return {"naive": NaiveBulkOperationsService, "optimized": OptimizedBulkOperationsService}[
        request.param
    ]()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory, request) -> Path:
    folder = Path(
        os.environ.get("BROWSER_SCREENSHOTS") or tmp_path_factory.mktemp("browser-screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    request.config.stash[SCREENSHOTS_KEY] = folder
    return folder


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium through Playwright, for one test module."""
    require_browser()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread, which
    # Django's async-safety check takes for async code; the ORM calls made by
    # the tests here are synchronous (Django's documented escape hatch).
    # Module-scoped, so the escape hatch is closed again before other modules run.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


def pytest_terminal_summary(terminalreporter, config):
    """Say where the browser tests left their screenshots."""
    folder = config.stash.get(SCREENSHOTS_KEY, None)
    if folder is not None:
        terminalreporter.write_line(f"browser screenshots: {folder}")


@pytest.fixture(autouse=True)
def _empty_cache():
    """No test reads a product card another test cached (ids are reused)."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def live_server(settings, transactional_db):
    """A server started per test, after the settings below apply.

    pytest-django's own live server is session-scoped: it would load the
    middleware (and its HTTPS redirect) before any test's settings apply, and
    its autouse helper may set this fixture up before the autouse fixtures
    above run.
    """
    from pytest_django.live_server_helper import LiveServer

    # The live server speaks plain HTTP; deploy settings redirect to HTTPS and
    # mark cookies Secure.
    settings.SECURE_SSL_REDIRECT = False
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    server = LiveServer("localhost")
    yield server
    server.stop()
