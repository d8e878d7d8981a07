"""Answers no browser or proxy may store."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control

# Every API answer (per-user data, job progress, idempotent replays) and the
# product list (live stock and counts, staff only).
NO_STORE_PREFIXES = ("/api/", "/products/")


class NoStoreMiddleware:
    """``Cache-Control: no-store`` on every answer under ``NO_STORE_PREFIXES``.

    A middleware rather than a decorator per view, so that ninja's own answers
    (errors, the schema, the docs) and Django's (a 404, a CSRF failure) get it too.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path_info.startswith(NO_STORE_PREFIXES):
            patch_cache_control(response, no_store=True)
        return response
