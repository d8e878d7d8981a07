"""``/health``: 200 when the database, the cache and the job worker answer; 503 otherwise.

Open to anyone: the body names each part, never a connection string or secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from jobs.services import worker_status


def check_database() -> tuple[bool, str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return True, connection.vendor


def check_cache() -> tuple[bool, str]:
    # A key of its own: concurrent probes from other processes cannot interfere.
    key = f"health:{uuid.uuid4().hex}"
    cache.set(key, "ok", timeout=10)
    stored = cache.get(key)
    cache.delete(key)
    if stored == "ok":
        return True, "set, get and delete answered"
    return False, "the cache did not return what was just stored"


CHECKS: dict[str, Callable[[], tuple[bool, str]]] = {
    "database": check_database,
    "cache": check_cache,
    "worker": worker_status,
}


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    results = {}
    for name, check in CHECKS.items():
        try:
            ok, detail = check()
        except Exception as exc:  # a failing part is reported, never raised
            ok, detail = False, f"{type(exc).__name__}: unavailable"
        results[name] = {"ok": ok, "detail": detail}
    failing = [name for name, result in results.items() if not result["ok"]]
    body = {"status": "unhealthy" if failing else "ok", "failing": failing, "checks": results}
    return JsonResponse(body, status=503 if failing else 200)
