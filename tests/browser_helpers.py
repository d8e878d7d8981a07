"""Debian's Chromium for the browser tests, and their screenshots.

The browser is the system one (``/usr/bin/chromium``, or ``CHROMIUM`` names
another); nothing is downloaded. Without it the browser tests skip, unless
``REQUIRE_BROWSER=1`` (set by CI), where a missing browser is a failure.
Each page is saved as a screenshot in the folder printed at the end of the run
(``BROWSER_SCREENSHOTS``, or a temporary folder). The fixtures ``chromium``
and ``screenshots`` are in conftest.py.
"""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

SCREENSHOTS_KEY = pytest.StashKey[Path]()


def require_browser() -> None:
    if Path(CHROMIUM).exists():
        return
    message = f"Chromium not found at {CHROMIUM}; .ci/run installs Debian's chromium"
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


def snap(page, screenshots: Path, name: str) -> None:
    page.screenshot(path=screenshots / f"{name}.png", full_page=True)
