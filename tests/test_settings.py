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


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BULK_CHUNK_SIZE", "1k", "BULK_CHUNK_SIZE must be an integer, not '1k'"),
        ("BULK_RETRY_BASE_DELAY", "soon", "BULK_RETRY_BASE_DELAY must be a number, not 'soon'"),
    ],
)
def test_a_bad_number_is_a_clear_configuration_error(name, value, message):
    result = manage("check", **{name: value})
    assert result.returncode != 0
    assert message in result.stderr


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


# What `manage.py shell` prints about the task backend and the Celery app.
SHOW_TASKS = (
    "from django.tasks import task_backends; from jobs.celery import app; "
    "b = task_backends['default']; "
    "print(type(b).__name__, b.options, app.conf.broker_url, app.conf.task_default_queue)"
)


def test_the_database_task_backend_is_the_default():
    result = manage("shell", "--no-imports", "-c", SHOW_TASKS, TASKS_BACKEND="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 2)[:2] == ["DatabaseBackend", "{}"]


def test_celery_is_selected_by_the_environment():
    result = manage(
        "shell",
        "--no-imports",
        "-c",
        SHOW_TASKS,
        TASKS_BACKEND="django_tasks_celery.CeleryBackend",
        CELERY_BROKER_URL="amqp://shop:secret@broker.example:5672/shop",
        CELERY_QUEUE="shop_eu",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "CeleryBackend {'CELERY_APP': 'jobs.celery.app'} "
        "amqp://shop:secret@broker.example:5672/shop shop_eu"
    )


def test_deploy_check_passes_on_celery_without_a_result_backend():
    """Nothing reads task results: the warning that get_result() cannot is silenced."""
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DEBUG="0",
        SECRET_KEY="k7#Lq2-very-long-random-production-secret-value-9Xz!pW4rT8yB3nM6vC1",
        ALLOWED_HOSTS="shop.example.com",
        TASKS_BACKEND="django_tasks_celery.CeleryBackend",
        CELERY_RESULT_BACKEND="",
    )
    assert result.returncode == 0, result.stderr


def test_a_celery_worker_without_the_celery_backend_refuses_to_start():
    """It would discard every job task as unregistered; it exits before connecting."""
    environment = {**os.environ, "TASKS_BACKEND": "", "CELERY_BROKER_URL": "amqp://127.0.0.1:9//"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "--app", "jobs.celery", "worker", "--pool", "solo"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert (
        "a Celery worker runs the jobs only with TASKS_BACKEND=django_tasks_celery.CeleryBackend,"
        " not django_tasks_db.backend.DatabaseBackend"
    ) in result.stderr
