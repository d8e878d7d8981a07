"""Answers no browser or proxy may store."""

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control

# Per-user API answers and the staff product list (live stock and counts).
NO_STORE_PREFIXES = ("/api/", "/products/")


class NoStoreMiddleware:
    """``Cache-Control: no-store`` on every answer under ``NO_STORE_PREFIXES``, ninja's and
    Django's own (errors, the schema, a CSRF failure) included: hence not a view decorator."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if request.path_info.startswith(NO_STORE_PREFIXES):
            patch_cache_control(response, no_store=True)
        return response
