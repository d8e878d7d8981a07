"""``Idempotency-Key``: a replayed batch POST gets the first answer and runs nothing.

The (user, key) pair is unique in the database. A request first inserts its
record, committed at once and outside any chunk transaction, and only then
runs; a second request with the same key cannot insert, so it never runs a
second time:

* the first answer is stored: the same request gets it back (same status and
  body); another request (a different hash of method, path, query and body)
  gets 409;
* the first is still running: 409, retry later.

If the run fails with an exception, its record is deleted so the client can
retry with the same key; the engine's own log keeps what was committed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import IntegrityError, transaction

from api.errors import ApiError
from api.models import IdempotencyRecord

KEY_REUSED = "this Idempotency-Key was already used with a different request"
KEY_IN_PROGRESS = "a request with this Idempotency-Key is still running; retry later"


def replay_or_run(
    *,
    user: Any,
    key: str,
    request_hash: str,
    run: Callable[[], tuple[int, dict[str, Any]]],
) -> tuple[int, dict[str, Any]]:
    """The stored answer for (user, key), or ``run()``'s, stored for next time."""
    try:
        with transaction.atomic():
            record = IdempotencyRecord.objects.create(user=user, key=key, request_hash=request_hash)
    except IntegrityError:
        return _replay(user, key, request_hash)
    try:
        status, answer = run()
    except BaseException:
        record.delete()
        raise
    record.status_code = status
    record.response = answer
    record.save(update_fields=["status_code", "response"])
    return status, answer


def _replay(user: Any, key: str, request_hash: str) -> tuple[int, dict[str, Any]]:
    record = IdempotencyRecord.objects.filter(user=user, key=key).first()
    if record is None:
        # The first request failed and released the key just now.
        raise ApiError(409, KEY_IN_PROGRESS)
    if record.request_hash != request_hash:
        raise ApiError(409, KEY_REUSED)
    if not record.finished:
        raise ApiError(409, KEY_IN_PROGRESS)
    return record.status_code, record.response
