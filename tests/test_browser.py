"""Operators' workflows in a real browser: Playwright driving Debian's Chromium.

The browser is the system one (``/usr/bin/chromium``, or ``CHROMIUM`` names
another); nothing is downloaded. Without it these tests skip, unless
``REQUIRE_BROWSER=1`` (set by CI), where a missing browser is a failure.
Each page is saved as a screenshot in the folder printed at the end of the run
(``BROWSER_SCREENSHOTS``, or a temporary folder).
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.factories import StaffFactory

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "staff-password"  # StaffFactory's

SCREENSHOTS_KEY = pytest.StashKey[Path]()

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def _require_browser() -> None:
    if Path(CHROMIUM).exists():
        return
    message = f"Chromium not found at {CHROMIUM}; .ci/run installs Debian's chromium"
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory, request) -> Path:
    folder = Path(
        os.environ.get("BROWSER_SCREENSHOTS") or tmp_path_factory.mktemp("browser-screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    request.config.stash[SCREENSHOTS_KEY] = folder
    return folder


@pytest.fixture(scope="session")
def chromium():
    _require_browser()
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop running in this thread, which
    # Django's async-safety check takes for async code; the ORM calls made by
    # the tests here are synchronous (Django's documented escape hatch).
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture
def live_server(settings):
    """A server started per test, after the settings below apply.

    pytest-django's own live server is session-scoped: it would load the
    middleware (and its HTTPS redirect) before any test's settings apply.
    """
    from pytest_django.live_server_helper import LiveServer

    # The live server speaks plain HTTP; deploy settings redirect to HTTPS and
    # mark cookies Secure. (pytest-django's autouse helper may set this fixture
    # up before the conftest's own autouse fixtures run.)
    settings.SECURE_SSL_REDIRECT = False
    settings.SESSION_COOKIE_SECURE = False
    settings.CSRF_COOKIE_SECURE = False
    server = LiveServer("localhost")
    yield server
    server.stop()


@pytest.fixture
def page(chromium, live_server):
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
    yield page
    context.close()
    assert outside == [], f"pages loaded from outside the shop: {outside}"


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


def snap(page, screenshots: Path, name: str) -> None:
    page.screenshot(path=screenshots / f"{name}.png", full_page=True)


def test_admin_index_after_login(page, operator, screenshots):
    assert page.title().startswith("Site administration")
    snap(page, screenshots, "01-admin-index")
