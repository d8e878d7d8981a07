"""Who may call the API: active staff with the model permissions an endpoint declares
(docs/api.md). A token and a session end at the same rule; an endpoint that declares
nothing is refused to everyone (fails closed).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import AuthorizationError
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from api.models import ApiToken, token_digest
from common.permissions import missing_permissions

FORBIDDEN = "this API is for active staff users only"
MISSING_PERMISSIONS = "this endpoint needs the permissions {missing}"
UNDECLARED = "this endpoint declares no permissions, so it is refused to everyone"
CSRF_FAILED = "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header"


def check(user: Any, permissions: tuple[str, ...] | None) -> None:
    """Raise the 403 for a user who may not call an endpoint needing ``permissions``."""
    if permissions is None:
        raise AuthorizationError(message=UNDECLARED)
    if not (user.is_active and user.is_staff):
        raise AuthorizationError(message=FORBIDDEN)
    if missing := missing_permissions(user, permissions):
        raise AuthorizationError(message=MISSING_PERMISSIONS.format(missing=", ".join(missing)))


class Needs:
    """An authentication admitting only users who pass ``check`` for ``permissions``."""

    def __init__(self, permissions: tuple[str, ...] | None) -> None:
        super().__init__()
        self.permissions = permissions


class TokenAuth(Needs, HttpBearer):
    """``Authorization: Bearer <secret>``: one query (token and user together)."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        tokens = ApiToken.objects.active().select_related("user")
        found = tokens.filter(digest=token_digest(token)).first() if token else None
        if found is None:
            return None
        check(found.user, self.permissions)
        return found.user


class StaffSessionAuth(Needs, APIKeyCookie):
    """Django's session; CSRF is enforced on unsafe methods (the cookie is ambient)."""

    param_name = settings.SESSION_COOKIE_NAME

    def __call__(self, request: HttpRequest) -> Any:
        # ninja checks CSRF before it looks at the cookie; an anonymous
        # request must get 401, not a CSRF 403, so look at the user first.
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if check_csrf(request) is not None:
            raise AuthorizationError(message=CSRF_FAILED)
        check(user, self.permissions)
        return user

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        return None  # unused: __call__ decides


def needs(*permissions: str) -> list[Any]:
    """An endpoint's ``auth``: active staff holding every one of ``permissions``.

    Tried in order: a request with a valid token never needs a session.
    """
    return [TokenAuth(permissions), StaffSessionAuth(permissions)]


# The API's default: refuses every endpoint that has not declared ``needs(...)``.
UNDECLARED_AUTH = [TokenAuth(None), StaffSessionAuth(None)]
