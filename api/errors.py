"""One error shape for every API failure (``{"detail", "errors": [{"index", "field",
"message"}]}``), and the one place that maps errors to HTTP."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

UNAUTHORIZED = "authentication required: a staff session or an API token (Authorization: Bearer)"
NOT_FOUND = "not found"
INVALID_PARAMETERS = "invalid request parameters"
BODY_TOO_LARGE = "the request body is larger than the limit of {limit} bytes"


class ApiError(Exception):
    """An error answer: status code, a message and optionally row/field errors."""

    def __init__(
        self, status: int, detail: str, errors: list | None = None, *, headers: dict | None = None
    ) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.errors: list[dict[str, Any]] = errors or []
        self.headers: dict[str, str] = headers or {}


def row_error(index: int | None, field: str | None, message: str) -> dict[str, Any]:
    return {"index": index, "field": field, "message": message}


def body_too_large() -> str:
    return BODY_TOO_LARGE.format(limit=settings.API_MAX_BODY_BYTES)


def error_body(detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"detail": detail, "errors": errors or []}


def install_error_handlers(api: NinjaAPI) -> None:
    """Replace ninja's default handlers so every error has the shape above."""

    def respond(request: HttpRequest, status: int, detail: str, errors=None) -> HttpResponse:
        return api.create_response(request, error_body(detail, errors), status=status)

    @api.exception_handler(ApiError)
    def api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
        response = respond(request, exc.status, exc.detail, exc.errors)
        for name, value in exc.headers.items():
            response[name] = value
        return response

    @api.exception_handler(AuthenticationError)
    def unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
        response = respond(request, 401, UNAUTHORIZED)
        response["WWW-Authenticate"] = "Bearer"
        return response

    @api.exception_handler(HttpError)
    def http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
        return respond(request, exc.status_code, str(exc))

    @api.exception_handler(Http404)
    def not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
        return respond(request, 404, NOT_FOUND)

    @api.exception_handler(ValidationError)
    def invalid(request: HttpRequest, exc: ValidationError) -> HttpResponse:
        # Parameters (the batch flow parses bodies): 400 naming "query.since", not a 422.
        errors = [
            row_error(None, ".".join(map(str, error.get("loc", ()))), error.get("msg", "invalid"))
            for error in exc.errors
        ]
        return respond(request, 400, INVALID_PARAMETERS, errors)

    @api.exception_handler(RequestDataTooBig)
    def too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
        return respond(request, 413, body_too_large())
