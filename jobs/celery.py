"""The Celery app behind ``TASKS_BACKEND=django_tasks_celery.CeleryBackend`` (docs/jobs-celery.md).

The jobs' tasks stay plain ``django.tasks`` tasks, registered with this app when
``jobs.tasks`` is imported; its configuration is the ``CELERY_`` settings.
"""

from __future__ import annotations

import os
import sys

from celery import Celery  # type: ignore[import-untyped]
from celery.signals import worker_init  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["jobs"])


@worker_init.connect
def _require_the_celery_backend(**kwargs: object) -> None:
    """Refuse to start a worker that would discard every job task as unregistered."""
    from django.tasks import task_backends
    from django_tasks_celery import CeleryBackend

    backend = task_backends["default"]
    if not isinstance(backend, CeleryBackend):
        # SystemExit: Celery logs and carries on past any Exception from a handler.
        sys.exit(
            "a Celery worker runs the jobs only with TASKS_BACKEND=django_tasks_celery."
            f"CeleryBackend, not {type(backend).__module__}.{type(backend).__qualname__}: "
            "set it for the workers and the web processes alike"
        )
