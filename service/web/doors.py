"""The HTTP front doors of one app, and the errors no door's own code sees.

Each door (service/segment, service/oip, service/page) is an APIRouter plus the one function that says a
ServiceError in its protocol. Errors raised in a door's routes are answered by that function; so are those
the framework raises before any route runs (no route for the path, a method the route does not take, typed
parameters it refused), which is why they are dispatched by path: the door owning the path answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import InvalidOption, NotFound, ServiceError, Unauthorized, Unavailable
from service.web.auth import WWW_AUTHENTICATE


class HttpError(ServiceError):
    """An HTTP failure of the framework's own (405 method not allowed, ...) that has no meaning in the
    core's terms: its status and headers travel with it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(code, message)
        self.status, self.headers = status, headers


def error_headers(exc: ServiceError) -> dict[str, str] | None:
    """The HTTP headers an error's answer carries in every door: ``Retry-After`` when waiting helps, the
    challenge of a 401, and those of a framework error (``Allow`` on a 405)."""
    headers = dict(exc.headers or {}) if isinstance(exc, HttpError) else {}
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return headers or None


@dataclass(frozen=True)
class Door:
    """One front door: its routes, the path prefix it owns ("": every path no longer prefix owns), and how it
    says an error."""

    router: APIRouter
    prefix: str
    error_response: Callable[[ServiceError], Response]
    on_invalid_request: Callable[[Request], None] = lambda request: None  # e.g. count it in the metrics

    def owns(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")


def framework_error(exc: StarletteHTTPException) -> ServiceError:
    """A framework HTTP exception in the core's terms where it has a meaning (404), else as it is."""
    if exc.status_code == 404:
        return NotFound("not_found", str(exc.detail))
    code = {405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return HttpError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def add_doors(app: FastAPI, doors: Sequence[Door]) -> None:
    """Each door's routes on ``app``, and its errors answered by the door owning the request's path (the
    longest prefix that matches)."""
    by_prefix = sorted(doors, key=lambda door: len(door.prefix), reverse=True)
    for door in doors:
        app.include_router(door.router)

    def door_of(request: Request) -> Door:
        return next(door for door in by_prefix if door.owns(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "query")
        door = door_of(request)
        door.on_invalid_request(request)
        return door.error_response(InvalidOption("invalid_option", f"{where}: {first['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return door_of(request).error_response(framework_error(exc))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return door_of(request).error_response(exc)
