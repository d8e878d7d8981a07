"""The Celery app behind ``TASKS_BACKEND=django_tasks_celery.CeleryBackend``.

The jobs' tasks stay plain ``django.tasks`` tasks (``jobs/tasks.py``);
django-tasks-celery registers each of them with this app when its module is
imported, in the web process (to send) and in the worker (to run). Workers::

    TASKS_BACKEND=django_tasks_celery.CeleryBackend \\
        celery --app jobs.celery worker --pool prefork --concurrency 4 --loglevel INFO

The app's configuration is Django's settings under the ``CELERY_`` prefix
(``CELERY_BROKER_URL``, ``CELERY_TASK_DEFAULT_QUEUE``...; see
``shop/settings.py`` and ``docs/jobs-celery.md``). Like ``manage.py``, this
entry point names the settings module unless the environment does.
"""

from __future__ import annotations

import os
import sys

# Celery ships no type information (no py.typed, no stubs in django-stubs).
from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_init  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

CELERY_BACKEND = "django_tasks_celery.CeleryBackend"

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The worker imports jobs.tasks once Django is set up: its tasks register then.
app.autodiscover_tasks(["jobs"])


@worker_init.connect
def _require_the_celery_backend(**kwargs: object) -> None:
    """Refuse to start a worker whose tasks would not be registered with Celery.

    Without ``TASKS_BACKEND=django_tasks_celery.CeleryBackend`` the worker's
    django.tasks are the database backend's: Celery would discard every job
    task it receives as unregistered.
    """
    from django.tasks import task_backends
    from django_tasks_celery import CeleryBackend

    backend = task_backends["default"]
    if not isinstance(backend, CeleryBackend):
        # SystemExit: Celery logs and carries on past any Exception from a handler.
        sys.exit(
            f"a Celery worker runs the jobs only with TASKS_BACKEND={CELERY_BACKEND}, "
            f"not {type(backend).__module__}.{type(backend).__qualname__}: "
            "set it for the workers and the web processes alike"
        )
