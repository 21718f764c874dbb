"""One log line per HTTP request, and its request ID on the response.

``RequestLogMiddleware`` (plain ASGI, so it sees every response: routes, errors of any door, 404s, static
files) gives the request its ID (service/web/request_id.py), returns it as ``X-Request-ID`` and, once the
response is sent, logs one line on the ``service.access`` logger: method, path, route, status, latency,
client address and, for an inference request, what its work cost (``note_work``: decode, queue, inference,
post-processing, batch size, detections). The trace ID and request ID are added by the log formatter.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.pipeline import Segmented
from service.web import request_id

log = logging.getLogger("service.access")
_WORK = "mrcnn.work"
REQUEST_ID_ATTRIBUTE = "mrcnn.request_id"  # the scope's key for what the request's inference cost


def note_work(request: Request, done: Segmented) -> None:
    """Record a segmented request's costs for its log line."""
    request.scope[_WORK] = done


def work_fields(done: Segmented) -> dict[str, object]:
    """The latency split and batch of one inference request, in milliseconds."""
    return {
        "decode_ms": round(done.decode_s * 1e3, 2),
        "queue_ms": round(done.inferred.queue_s * 1e3, 2),
        "inference_ms": round(done.inferred.run_s * 1e3, 2),
        "postprocess_ms": round(done.postprocess_s * 1e3, 2),
        "batch_size": done.inferred.batch_size,
        "detections": len(done.prediction.scores),
    }


def request_fields(scope: Scope, status: int, seconds: float) -> dict[str, object]:
    route = scope.get("route")
    client = scope.get("client")
    fields: dict[str, object] = {
        "method": scope["method"],
        "path": scope["path"],
        "route": getattr(route, "path", None),
        "status": status,
        "latency_ms": round(seconds * 1e3, 2),
        "client": client[0] if client else None,
    }
    done = scope.get(_WORK)
    if isinstance(done, Segmented):
        fields.update(work_fields(done))
    return fields


class RequestLogMiddleware:
    """Request ID in, request ID out, one log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id.request_id_for(Headers(scope=scope).get(request_id.HEADER))
        token = request_id.current.set(rid)
        trace.get_current_span().set_attribute(REQUEST_ID_ATTRIBUTE, rid)  # the server span, when tracing
        started = time.perf_counter()
        status = 500  # unless a response starts: the client went away, or the app failed

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[request_id.HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields = request_fields(scope, status, time.perf_counter() - started)
            log.info("%s %s %s", scope["method"], scope["path"], status, extra={"fields": fields})
            request_id.current.reset(token)
