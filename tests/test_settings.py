"""Settings come from the environment; deploy checks pass with DEBUG off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import NoReverseMatch, reverse

ROOT = Path(__file__).resolve().parent.parent


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_deploy_check_passes_with_debug_off_and_a_real_secret():
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DEBUG="0",
        SECRET_KEY="k7#Lq2-very-long-random-production-secret-value-9Xz!pW4rT8yB3nM6vC1",
        ALLOWED_HOSTS="shop.example.com",
    )
    assert result.returncode == 0, result.stderr


def test_deploy_check_flags_the_placeholder_secret():
    result = manage("check", "--deploy", "--fail-level", "WARNING", DEBUG="0", SECRET_KEY="")
    assert result.returncode != 0
    assert "security.W009" in result.stderr


def test_bad_boolean_is_a_clear_configuration_error():
    result = manage("check", DEBUG="perhaps")
    assert result.returncode != 0
    assert "DEBUG must be a boolean" in result.stderr


def test_debug_toolbar_exists_only_with_debug():
    assert settings.DEBUG is False
    assert "debug_toolbar" not in settings.INSTALLED_APPS
    with pytest.raises(NoReverseMatch):
        reverse("djdt:render_panel")
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        "from django.urls import reverse; print(reverse('djdt:render_panel'))",
        DEBUG="1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "/__debug__/render_panel/"
