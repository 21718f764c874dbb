"""The errors of a request, by meaning: what went wrong, never how a protocol says so.

The core raises these kinds; each front door maps them to its own status and body in one place
(service/segment/errors.py, service/oip/errors.py), so a new door adds a mapping rather than a branch here.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be answered as asked: ``code`` names the case for programs (``image_too_large``),
    ``message`` says it for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class BadRequest(ServiceError):
    """The request itself is wrong: an undecodable or empty image, a malformed body, a missing part."""


class TooLarge(ServiceError):
    """The body or the image is over the server's limits."""


class UnsupportedMediaType(ServiceError):
    """A content type, content encoding or image format the server does not read."""


class InvalidOption(ServiceError):
    """An option out of its range, unknown, or beyond what the served model gives."""


class NotFound(ServiceError):
    """What the request names (a model, a version, a path) is not served here."""


class Unavailable(ServiceError):
    """The server cannot take the request now (full, draining); the same request may succeed later."""

    retry_after_s = 1


class DeadlineExceeded(ServiceError):
    """The request was not answered within its deadline."""


class InternalError(ServiceError):
    """The server failed on this request."""


class Unauthorized(ServiceError):
    """The request carries no API key, or one the server does not know."""
