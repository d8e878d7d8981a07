"""Who may call the API: active staff, through a session (with CSRF) or a token.

Both ways end at the same rule, so revoking a user's staff status also
disarms their tokens. Without credentials the answer is 401; with credentials
of a user who is not active staff, 403. Reads need the same as writes: batch
logs carry rows' error details and the sales report is business data.

A session is ambient (the browser sends its cookie to any request), so a
session's unsafe requests must carry the CSRF token; a bearer token is sent
deliberately and needs none.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest
from ninja.errors import AuthorizationError
from ninja.security import APIKeyCookie, HttpBearer
from ninja.utils import check_csrf

from api.models import ApiToken, token_digest

FORBIDDEN = "this API is for active staff users only"
CSRF_FAILED = "CSRF check failed: send the csrftoken cookie's value in the X-CSRFToken header"


def allowed(user: Any) -> bool:
    return bool(user.is_active and user.is_staff)


class TokenAuth(HttpBearer):
    """``Authorization: Bearer <secret>``: one query (token and user together)."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        if not token:
            return None
        found = (
            ApiToken.objects.active()
            .select_related("user")
            .filter(digest=token_digest(token))
            .first()
        )
        if found is None:
            return None
        if not allowed(found.user):
            raise AuthorizationError(message=FORBIDDEN)
        request.api_token = found
        return found.user


class StaffSessionAuth(APIKeyCookie):
    """Django's session; CSRF is enforced on unsafe methods."""

    param_name = settings.SESSION_COOKIE_NAME

    def __init__(self) -> None:
        super().__init__(csrf=True)

    def __call__(self, request: HttpRequest) -> Any:
        # ninja checks CSRF before it looks at the cookie; an anonymous
        # request must get 401, not a CSRF 403, so look at the user first.
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            return None
        if check_csrf(request) is not None:
            raise AuthorizationError(message=CSRF_FAILED)
        if not allowed(user):
            raise AuthorizationError(message=FORBIDDEN)
        return user

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        return None  # unused: __call__ decides


# Tried in order: a request with a valid token never needs a session.
API_AUTH = [TokenAuth(), StaffSessionAuth()]
