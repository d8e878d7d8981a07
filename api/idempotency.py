"""``Idempotency-Key``: a replayed batch POST gets the first answer and runs nothing.

The unique (user, key) pair is the lock: a request inserts its record, committed
at once and outside any chunk transaction, before it runs. A run that raises
before committing anything deletes it; one that raises after committing chunks
keeps it with a 500 answer (a resend would apply those rows twice). A record
unanswered after ``IDEMPOTENCY_PENDING_SECONDS`` is a dead process's: the next
request deletes it and takes the key (through the constraint: of two, one runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from api.errors import ApiError, error_body
from api.models import IdempotencyRecord
from batching.engine import run_log_of

logger = logging.getLogger(__name__)

KEY_REUSED = "this Idempotency-Key was already used with a different request"
KEY_IN_PROGRESS = "a request with this Idempotency-Key is still running; retry later"
FAILED_AFTER_COMMIT = (
    "batch run #{log_id} failed after committing {rows} of its rows ({written} written); "
    "they stay committed, so do not send this batch again: {error}"
)


def replay_or_run(
    *, user: Any, key: str, request_hash: str, run: Callable[[], tuple[int, dict[str, Any]]]
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
    except BaseException as exc:
        log = run_log_of(exc)
        if log is None or not log.checkpoint_position:
            record.delete()
            raise
        status, answer = 500, failed_after_commit(log)
        _answer(record, status, answer)
        if not isinstance(exc, Exception):  # an interrupt goes on up, its answer kept
            raise
        logger.exception("batch run #%s failed after committing rows", log.pk)
        return status, answer
    _answer(record, status, answer)
    return status, answer


def _answer(record: IdempotencyRecord, status: int, answer: dict[str, Any]) -> None:
    # Updates no row if the record was taken for abandoned meanwhile.
    IdempotencyRecord.objects.filter(pk=record.pk).update(status_code=status, response=answer)


def failed_after_commit(log: Any) -> dict[str, Any]:
    """The answer kept for a run that raised after some of its chunks committed."""
    rows, written = log.checkpoint_position, log.rows_written
    message = FAILED_AFTER_COMMIT.format(
        log_id=log.pk, rows=rows, written=written, error=log.error_summary
    )
    return {**error_body(message), "log_id": log.pk}


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
    if record is not None and record.request_hash != request_hash:
        raise ApiError(409, KEY_REUSED)
    # Not finished, or gone: the first request failed and released the key just now.
    if record is None or record.status_code is None or record.response is None:
        raise ApiError(409, KEY_IN_PROGRESS)
    return record.status_code, record.response
