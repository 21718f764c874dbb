"""How /segment (and the server's own routes) say an error: ``{"error": {"code", "message"}}`` under the
HTTP status of its kind, with ``Retry-After`` when waiting helps. The one place these statuses are chosen."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from service.core.errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    InvalidOption,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from service.segment.schemas import ErrorResponse
from service.web import request_id
from service.web.doors import HttpError, error_headers

STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidOption: 422,
    InternalError: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}
# The OpenAPI description of the errors POST /segment answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Undecodable or empty image, malformed JSON or base64",
        401: "No API key, or an unknown one (when the server has keys; see WWW-Authenticate)",
        413: "Body or pixel count over the limits",
        415: "Unsupported content type, content encoding or image format",
        422: "Bad options",
        503: "Queue full or shutting down (see Retry-After)",
        504: "Past the request deadline",
    }.items()
}


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, HttpError):
        return exc.status
    return next((status for kind, status in STATUS.items() if isinstance(exc, kind)), 500)


def error_response(exc: ServiceError) -> JSONResponse:
    """The error's body (with the request's ID, to quote when asking about it), status and headers."""
    body = {"code": exc.code, "message": exc.message, "request_id": request_id.current.get()}
    return JSONResponse({"error": body}, status_of(exc), error_headers(exc))
