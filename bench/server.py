"""The production server (gunicorn.conf.py) as a child process, on loopback, DEBUG off.

It binds port 0 and its URL is read back from its log, so two servers never race
for one port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

LISTENING = re.compile(r"Listening at: (http://127\.0\.0\.1:\d+)")
NOT_STARTED = "gunicorn did not start listening within {seconds}s; its log:\n{log}"
EXITED = "gunicorn exited with code {code} before listening; its log:\n{log}"
FAILED = "{command} failed (exit code {code}):\n{output}"


def database_url(alias: str = DEFAULT_DB_ALIAS) -> str:
    """A DATABASE_URL for this process's database (its test database under pytest), for a
    child process; "" for an in-memory SQLite database, which no other process can open."""
    return url_for(connections[alias].vendor, connections[alias].settings_dict)


def url_for(vendor: str, config: Mapping[str, Any]) -> str:
    """The DATABASE_URL of a connection's ``vendor`` and settings dict (see :func:`database_url`).

    Every part is percent-encoded with nothing left safe, so a socket directory as the host
    or a ``/`` or ``@`` in the password survives parsing; the port is always written (5432
    when unset).
    """
    name = str(config["NAME"])
    if vendor == "sqlite":
        memory = name == ":memory:" or "mode=memory" in name
        return "" if memory else f"sqlite:///{name}"
    credentials = quote(config["USER"] or "", safe="")
    if config["PASSWORD"]:
        credentials += ":" + quote(config["PASSWORD"], safe="")
    host = quote(config["HOST"] or "localhost", safe="")
    port = config["PORT"] or 5432
    return f"postgres://{credentials}@{host}:{port}/{quote(name, safe='')}"


def loopback_environment(url: str, **extra: str) -> dict[str, str]:
    """This process's environment, set for a production server on loopback without TLS."""
    fixed = {"DEBUG": "0", "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "shop.settings"}
    secure = ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")
    return {**os.environ, **fixed, **dict.fromkeys(secure, "0"), **extra}


def manage(environment: Mapping[str, str], *arguments: str) -> subprocess.Popen:
    """Start ``manage.py ARGUMENTS`` in ``environment``; :func:`finish` waits for it."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *arguments],
        cwd=settings.BASE_DIR,
        env=dict(environment),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> None:
    """Wait for a command :func:`manage` started; raise with its output if it failed."""
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            FAILED.format(command=process.args, code=process.returncode, output=output)
        )


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    pid: int
    log: Path


@contextmanager
def gunicorn(
    environment: Mapping[str, str],
    log: Path,
    *,
    workers: int = 2,
    threads: int = 4,
    start_seconds: float = 60.0,
) -> Iterator[Server]:
    """gunicorn serving ``shop.wsgi`` on a free loopback port until the block ends; then
    SIGTERM (requests in flight finish), SIGKILL 15 seconds later."""
    config = str(Path(settings.BASE_DIR) / "gunicorn.conf.py")
    command = [sys.executable, "-m", "gunicorn", "shop.wsgi", "--config", config]
    command += ["--bind", "127.0.0.1:0", "--workers", str(workers), "--threads", str(threads)]
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            env=dict(environment),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + start_seconds
        while not (match := LISTENING.search(log.read_text())):
            if (code := process.poll()) is not None:
                raise RuntimeError(EXITED.format(code=code, log=log.read_text()))
            if time.monotonic() >= deadline:
                raise RuntimeError(NOT_STARTED.format(seconds=start_seconds, log=log.read_text()))
            time.sleep(0.05)
        yield Server(url=match.group(1), pid=process.pid, log=log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
