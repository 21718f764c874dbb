"""How the gRPC door says an error: a status code and the same message as the REST doors, plus, when waiting
helps, gRPC's retry pushback in the trailers. The one place these codes are chosen."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from service.core.errors import (
    DeadlineExceeded,
    InternalError,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
)

# The kinds with a code of their own; every other ServiceError (BadRequest, InvalidOption,
# UnsupportedMediaType) is the request's fault: INVALID_ARGUMENT.
CODES: dict[type[ServiceError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    InternalError: grpc.StatusCode.INTERNAL,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,  # service/grpc/auth.py
}
# gRPC's retry pushback (the retry design, gRFC A6): how long a client should wait before retrying.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class Failure:
    """An RPC's error answer: its status code, message and trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str], ...] = ()


def failure(exc: ServiceError) -> Failure:
    code = next((code for kind, code in CODES.items() if isinstance(exc, kind)), grpc.StatusCode.INVALID_ARGUMENT)
    trailers = ((RETRY_PUSHBACK, str(exc.retry_after_s * 1000)),) if isinstance(exc, Unavailable) else ()
    return Failure(code, exc.message, trailers)
