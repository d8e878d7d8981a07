"""gunicorn's settings for the shop: ``gunicorn shop.wsgi`` run from this folder reads them.

``make serve`` runs ``collectstatic`` and then this server; docs/deploy.md
lists the processes a deployment runs and their environment. Every setting
comes from the environment, and a command-line flag still wins over it
(``gunicorn shop.wsgi --bind 0.0.0.0:8000``).

Threaded workers (``gthread``): a request spends most of its time waiting for
the database, so a few processes with a few threads each keep the cores busy
at a small memory cost. Each thread takes its own connection from its
process's pool, so ``WEB_THREADS`` must not exceed ``DB_POOL_MAX_SIZE`` (10 by
default), and the database sees at most WEB_CONCURRENCY x DB_POOL_MAX_SIZE
connections per web machine.
"""

import os


def _int(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, not {value!r}") from None


# Loopback by default: put a proxy (TLS) in front, or set WEB_BIND=0.0.0.0:8000.
bind = os.environ.get("WEB_BIND") or "127.0.0.1:8000"
# WEB_CONCURRENCY is the name gunicorn (and several platforms) already use.
workers = _int("WEB_CONCURRENCY", 2)
worker_class = "gthread"
threads = _int("WEB_THREADS", 4)
# A request still running after this many seconds has its worker restarted.
# Batches above API_SYNC_MAX_ROWS run as background jobs, so requests stay short.
timeout = _int("WEB_TIMEOUT", 60)
graceful_timeout = 30
keepalive = 5
# Every worker serves at most this many requests, then is replaced (bounds any leak); 0: never.
max_requests = _int("WEB_MAX_REQUESTS", 0)
max_requests_jitter = max_requests // 10
# Access log on stderr with WEB_ACCESS_LOG=1; errors always go to stderr.
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG", "0") not in {"", "0"} else None
errorlog = "-"
# No control socket: several servers on one host (tests, benchmarks) would share
# its default path ($HOME/.gunicorn/gunicorn.ctl).
control_socket_disable = True
