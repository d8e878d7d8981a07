"""API tokens and idempotency records. A token's secret (256 random bits) is shown once and
stored as its SHA-256 digest: an unguessable secret needs no slow hash."""

from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone

TOKEN_BYTES = 32
PREFIX_LENGTH = 8


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class ApiTokenQuerySet(models.QuerySet):
    def active(self) -> ApiTokenQuerySet:
        return self.filter(revoked_at__isnull=True)

    def revoke(self) -> int:
        """Revoke the active tokens among these (one UPDATE); returns how many."""
        return self.active().update(revoked_at=timezone.now())


class ApiToken(models.Model):
    """A bearer token that acts as its user (who must be active staff)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100, blank=True)
    # The secret's first characters: enough to tell tokens apart, useless to authenticate.
    prefix = models.CharField(max_length=PREFIX_LENGTH)
    digest = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # `api_token revoke PREFIX`: find a token by the start of its secret.
            models.Index(fields=["prefix"], name="apitoken_prefix_idx"),
        ]

    def __str__(self) -> str:
        state = "revoked" if self.revoked_at else "active"
        return f"#{self.pk} {self.prefix}… ({self.user}, {state})"

    @classmethod
    def issue(cls, user, *, name: str = "") -> tuple[ApiToken, str]:
        """Create a token for ``user``; returns it and its secret (shown once)."""
        secret = secrets.token_urlsafe(TOKEN_BYTES)
        prefix, digest = secret[:PREFIX_LENGTH], token_digest(secret)
        return cls.objects.create(user=user, name=name, prefix=prefix, digest=digest), secret


class IdempotencyRecord(models.Model):
    """The first answer to a batch POST sent with an ``Idempotency-Key``: inserted before
    the run (``status_code`` null), its unique (user, key) is the lock (``api.idempotency``)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="idempotency_records"
    )
    key = models.CharField(max_length=255)
    # SHA-256 of method, path, query and body: the same key with another request is a 409.
    request_hash = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key_unique"),
        ]
        indexes = [
            # Purging old records: everything created before a date.
            models.Index(fields=["created_at"], name="idempotency_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.user})"

    @property
    def finished(self) -> bool:
        return self.status_code is not None
