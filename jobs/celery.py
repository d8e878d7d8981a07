"""The Celery app behind ``TASKS_BACKEND=django_tasks_celery.CeleryBackend``.

The jobs' tasks stay plain ``django.tasks`` tasks (``jobs/tasks.py``);
django-tasks-celery registers each of them with this app when its module is
imported, in the web process (to send) and in the worker (to run). Workers::

    TASKS_BACKEND=django_tasks_celery.CeleryBackend \\
        celery -A jobs.celery worker --pool prefork --concurrency 4

The app's configuration is Django's settings under the ``CELERY_`` prefix
(``CELERY_BROKER_URL``, ``CELERY_TASK_DEFAULT_QUEUE``...; see
``shop/settings.py`` and ``docs/jobs-celery.md``). Like ``manage.py``, this
entry point names the settings module unless the environment does.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

app = Celery("shop")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The worker imports jobs.tasks once Django is set up: its tasks register then.
app.autodiscover_tasks(["jobs"])
