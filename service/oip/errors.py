"""How the Open Inference Protocol says an error: ``{"error": "<message>"}`` under Triton's statuses (400 for
anything the request got wrong, limits included; 401 no or unknown API key; 404 unknown model; 503
unavailable, past the deadline too: Triton's UNAVAILABLE; 500 internal), with ``Retry-After`` when waiting
helps. The one place these statuses are chosen."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from service.core.errors import DeadlineExceeded, InternalError, NotFound, ServiceError, Unauthorized, Unavailable
from service.oip.codec import ProtocolErrorResponse
from service.web.doors import HttpError, error_headers

STATUS: dict[type[ServiceError], int] = {
    Unauthorized: 401, NotFound: 404, InternalError: 500, Unavailable: 503, DeadlineExceeded: 503,
}
# The OpenAPI description of the errors the routes answer.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ProtocolErrorResponse, "description": "Bad request: input, parameter, output or body"},
    401: {"model": ProtocolErrorResponse, "description": "No API key, or an unknown one (see WWW-Authenticate)"},
    404: {"model": ProtocolErrorResponse, "description": "Unknown model or version"},
    503: {"model": ProtocolErrorResponse, "description": "Overloaded, draining or past the deadline (see Retry-After)"},
}


def status_of(exc: ServiceError) -> int:
    if isinstance(exc, HttpError):  # the framework's own (a method a route does not take): the request's fault
        return exc.status if exc.status in (500, 503) else 400
    return next((status for kind, status in STATUS.items() if isinstance(exc, kind)), 400)


def error_response(exc: ServiceError) -> JSONResponse:
    """The error's body, status and headers."""
    return JSONResponse({"error": exc.message}, status_of(exc), error_headers(exc))
