"""Real job worker processes for the tests, on either task backend.

``workers`` (a fixture, parametrized by backend) starts two worker processes
on the test database and yields a ``Workers``; the same test body then runs
once on each backend:

* ``db``: two ``manage.py db_worker`` processes (django-tasks-db, the default);
* ``celery``: two ``celery -A jobs.celery worker --pool prefork --concurrency 1``
  processes (django-tasks-celery) on the RabbitMQ at ``CELERY_BROKER_URL``.
  A partition runs in a worker's pool child, so ``hostname:pid`` names the
  child; killing it is a worker process dying, and the worker's parent
  starts a new child.

The Celery workers consume a queue named after the test database
(``TEST_CELERY_QUEUE`` overrides it), so test runs on other databases never
take each other's tasks from a shared broker. It is deleted after each test,
with any deferred task left in it; the next test's workers declare it again.
An unreachable broker skips the Celery tests, or fails them when
``REQUIRE_BROKER=1`` (CI).

Every worker runs in a session of its own and the whole process group is
SIGKILLed when the test ends, however it ends: no worker, pool child
included, outlives its test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from django.conf import settings as django_settings

from batching.liveness import parse_worker, pid_alive
from tests.test_resume import child_environment, manage

HOST = socket.gethostname()
BACKENDS = ["db", "celery"]
BROKER_URL = os.environ.get("CELERY_BROKER_URL") or django_settings.CELERY_BROKER_URL
# One queue per test database: runs on other databases (other checkouts, CI)
# never take each other's tasks, and nothing piles up on the broker.
QUEUE = os.environ.get("TEST_CELERY_QUEUE") or "test_{NAME}".format_map(
    django_settings.DATABASES["default"]
)
START_TIMEOUT = 60
# What each backend's worker prints once it takes tasks.
READY = {"db": b"Starting worker", "celery": b" ready."}
# Small chunks (many checkpoints) and a watchdog every second.
WORKER_ENV = {
    "BULK_VOLUME_CHUNK_SIZE": "20",
    "BULK_CATALOGUE_CHUNK_SIZE": "20",
    "JOB_WATCH_SECONDS": "1",
}


@dataclass
class Worker:
    process: subprocess.Popen
    log_path: Path
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Workers:
    backend: str
    started: list[Worker]

    def logs(self) -> str:
        return "\n".join(w.log_path.read_text(errors="replace") for w in self.started)

    def owner(self, worker: str) -> Worker | None:
        """The started worker that ``worker`` (``host:pid``) is, or is a pool child of."""
        host, pid = parse_worker(worker)
        if host != HOST or pid is None:
            return None
        for started in self.started:
            if pid == started.pid or parent_pid(pid) == started.pid:
                return started
        return None

    def kill(self, worker: str) -> Worker:
        """SIGKILL the process named ``worker`` and wait until its pid is gone."""
        owner = self.owner(worker)
        assert owner is not None, f"{worker} is none of this test's workers"
        _, pid = parse_worker(worker)
        os.kill(pid, signal.SIGKILL)
        if pid == owner.pid:
            owner.process.wait()  # reaped: its pid is gone, as after any real death
        else:
            # A pool child: its worker's parent process reaps it.
            deadline = time.monotonic() + 10
            while pid_alive(pid):
                assert time.monotonic() < deadline, f"pool child {pid} was not reaped"
                time.sleep(0.01)
        return owner


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return int(stat[stat.rindex(")") + 2 :].split()[1])


@functools.cache
def broker_error() -> str | None:
    """Why the broker cannot be reached, or None (asked once per test session)."""
    from kombu import Connection

    try:
        with Connection(BROKER_URL, connect_timeout=3) as connection:
            connection.connect()
    except Exception as exc:  # any transport error means: no broker here
        return f"{type(exc).__name__}: {exc}"
    return None


def require_broker() -> None:
    error = broker_error()
    if error is None:
        return
    from kombu import Connection

    reason = (
        f"the Celery tests need the broker at {Connection(BROKER_URL).as_uri()} ({error}): "
        "start RabbitMQ (`rabbitmq-server -detached`) or point CELERY_BROKER_URL at one"
    )
    if os.environ.get("REQUIRE_BROKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def delete_queue() -> None:
    """Drop the test queue and the tasks left in it (deferred watchdogs)."""
    from kombu import Connection

    with Connection(BROKER_URL, connect_timeout=3) as connection:
        connection.default_channel.queue_delete(QUEUE)


def use_celery(settings) -> dict[str, str]:
    """Send this process's tasks to Celery; return the workers' environment."""
    settings.TASKS = {
        "default": {
            "BACKEND": settings.TASKS_BACKEND_CELERY,
            "QUEUES": ["default"],
            "OPTIONS": {"CELERY_APP": "jobs.celery.app"},
        }
    }
    settings.CELERY_BROKER_URL = BROKER_URL
    settings.CELERY_TASK_DEFAULT_QUEUE = QUEUE
    from jobs.celery import app

    # Celery caches its queues once it first sends: the name must not change.
    assert app.conf.task_default_queue == QUEUE
    assert app.conf.broker_url == BROKER_URL
    return {
        "TASKS_BACKEND": settings.TASKS_BACKEND_CELERY,
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_QUEUE": QUEUE,
    }


def command(backend: str, number: int) -> list[str]:
    if backend == "db":
        return manage("db_worker", "--interval", "0.05", "--no-startup-delay", "--no-reload")
    return [
        sys.executable,
        "-m",
        "celery",
        "--app",
        "jobs.celery",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
        "--hostname",
        f"{QUEUE}-{number}@%h",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
    ]


@pytest.fixture(params=BACKENDS)
def workers(request, tmp_path, settings) -> Iterator[Workers]:
    """Two worker processes of one backend on the test database; logs in tmp_path."""
    backend = request.param
    env = child_environment() | WORKER_ENV
    if backend == "celery":
        require_broker()
        env |= use_celery(settings)
    started: list[Worker] = []
    try:
        for number in range(2):
            path = tmp_path / f"{backend}-worker{number}.log"
            log = open(path, "wb")  # noqa: SIM115
            process = subprocess.Popen(
                command(backend, number),
                cwd=django_settings.BASE_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            started.append(Worker(process, path, log))
        workers = Workers(backend, started)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(READY[backend] in w.log_path.read_bytes() for w in started):
            if time.monotonic() > deadline or any(w.process.poll() is not None for w in started):
                pytest.fail(f"{backend} workers did not start:\n" + workers.logs())
            time.sleep(0.05)
        yield workers
    finally:
        for worker in started:
            # The whole group: a Celery worker's pool children too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.process.wait()
            worker.log.close()
        if backend == "celery":
            delete_queue()
