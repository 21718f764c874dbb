"""API keys and TLS on the gRPC door, with the HTTP doors' keys and certificate (service/web/auth.py,
``MRCNN_SSL_CERTFILE`` / ``MRCNN_SSL_KEYFILE``).

``KeyInterceptor`` refuses every RPC of ``inference.GRPCInferenceService`` that carries no valid key in its
metadata, ``authorization: Bearer <key>`` or ``x-api-key: <key>`` (HTTP's two forms; gRPC metadata names are
lower case), with UNAUTHENTICATED and the HTTP 401's message (``ApiKeys.check``). As on HTTP, a bearer token
wins over ``x-api-key``, and an ``authorization`` of another scheme counts as no bearer token. The standard
health service stays open (it is the probe, as /healthz and /readyz are on HTTP), and so does reflection: it
lists the services and their messages, the public protocol, and reaches neither the model nor its metadata.
The refusal happens before the request's handler runs: nothing is counted in the metrics, and no key is ever
logged.

``server_credentials`` is the certificate and key of the settings as gRPC's TLS credentials, or None: plain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.core.api_keys import API_KEY_HEADER, ApiKeys
from service.core.errors import ServiceError
from service.core.settings import Settings
from service.grpc.errors import failure

AUTHORIZATION = "authorization"
API_KEY_METADATA = API_KEY_HEADER.lower()  # x-api-key
HandlerDetails = Any  # grpc.HandlerCallDetails: grpcio has no type information
Handler = Any  # grpc.RpcMethodHandler


def presented_key(metadata: Any) -> str | None:
    """The key a call's ``metadata`` ((name, value) pairs) presents: the bearer token of ``authorization``,
    else ``x-api-key``'s value, else None (HTTPBearer's and APIKeyHeader's reading of the same headers)."""
    bearer = api_key = None
    for name, value in metadata or ():
        if not isinstance(value, str):  # a binary (-bin) entry is never a key
            continue
        if name == AUTHORIZATION and bearer is None:
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                bearer = token
        elif name == API_KEY_METADATA and api_key is None:
            api_key = value
    return bearer if bearer is not None else api_key


class KeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio has no type information
    """A grpc.aio server interceptor: the RPCs of the services named in ``guarded`` need one of ``keys``."""

    def __init__(self, keys: ApiKeys, guarded: tuple[str, ...]) -> None:
        self.keys = keys
        self.prefixes = tuple(f"/{service}/" for service in guarded)

    async def intercept_service(
        self, continuation: Callable[[HandlerDetails], Awaitable[Handler]], details: HandlerDetails
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(self.prefixes):
            return handler  # an unknown method (UNIMPLEMENTED), or one of an open service
        try:
            self.keys.check(presented_key(details.invocation_metadata))
        except ServiceError as exc:
            return refusal(handler, exc)
        return handler


def refusal(handler: Handler, exc: ServiceError) -> Handler:
    """A handler of the same kind as ``handler`` that ends the call with ``exc``'s status and message, without
    reading the request (no deserializer: its bytes are never parsed)."""
    answer = failure(exc)

    async def refuse(request: Any, context: Any) -> None:
        await context.abort(answer.code, answer.message, answer.trailers)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port from the HTTP side's certificate chain and key (both PEM), or None when the
    settings have none. A file that cannot be read fails here, at the app's creation."""
    if settings.ssl_certfile is None or settings.ssl_keyfile is None:
        return None
    return grpc.ssl_server_credentials([(settings.ssl_keyfile.read_bytes(), settings.ssl_certfile.read_bytes())])
