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
retry with the same key; the engine's own log keeps what was committed. If the
process dies instead, nothing deletes it: a record still without an answer
after ``settings.IDEMPOTENCY_PENDING_SECONDS`` is taken as abandoned, and the
next request with the key deletes it and takes the key (the delete and the
insert go through the unique constraint, so of two such retries one runs).
``manage.py purge_idempotency_keys`` deletes old records.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

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
    record = _reserve(user, key, request_hash)
    if record is None:
        taken = IdempotencyRecord.objects.filter(user=user, key=key).first()
        if taken is None or not _release_abandoned(taken):
            return _replay(taken, request_hash)
        record = _reserve(user, key, request_hash)
        if record is None:  # another retry took the freed key first
            raise ApiError(409, KEY_IN_PROGRESS)
    try:
        status, answer = run()
    except BaseException:
        record.delete()
        raise
    # An UPDATE of no row if the record was taken for abandoned meanwhile.
    IdempotencyRecord.objects.filter(pk=record.pk).update(status_code=status, response=answer)
    return status, answer


def _reserve(user: Any, key: str, request_hash: str) -> IdempotencyRecord | None:
    """Insert the record, committed at once; None when the key is taken."""
    try:
        with transaction.atomic():
            return IdempotencyRecord.objects.create(user=user, key=key, request_hash=request_hash)
    except IntegrityError:
        return None


def _release_abandoned(record: IdempotencyRecord) -> bool:
    """Delete ``record`` if its request has had no answer for too long; True if deleted."""
    limit = timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_PENDING_SECONDS)
    if record.finished or record.created_at >= limit:
        return False
    deleted, _ = IdempotencyRecord.objects.filter(pk=record.pk, status_code__isnull=True).delete()
    return deleted > 0


def _replay(record: IdempotencyRecord | None, request_hash: str) -> tuple[int, dict[str, Any]]:
    if record is None:
        # The first request failed and released the key just now.
        raise ApiError(409, KEY_IN_PROGRESS)
    if record.request_hash != request_hash:
        raise ApiError(409, KEY_REUSED)
    if not record.finished:
        raise ApiError(409, KEY_IN_PROGRESS)
    return record.status_code, record.response
