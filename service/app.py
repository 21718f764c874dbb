"""The FastAPI app: the inference core (service/core) behind its front doors.

``create_app(settings)`` loads the model at once (so a bad file fails before serving) and returns the
app; ``service.app:app`` builds one from ``MRCNN_*`` environment variables for ``uvicorn``. The event
loop only moves bytes and futures: the pipeline decodes and post-processes in worker threads and runs
the model in its batcher's thread. Each door (service/segment, service/oip) brings its routes and says
its errors itself; the page and the probes are routes beside them. The gRPC door (service/grpc, unless
``MRCNN_GRPC_PORT`` is 0) is a server of its own in the same event loop, started after the pipeline and
stopped before it, so its RPCs in flight finish; it asks for the same API keys (in the call's metadata) and
serves TLS with the same certificate (service/grpc/auth.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator

import cv2
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.sdk.trace import TracerProvider

from service.core.api_keys import API_KEY_HEADER, ApiKeys, ApiKeysError
from service.core.pipeline import Pipeline
from service.core.runtime import ModelLoadError, OnnxModel
from service.core.settings import Settings
from service.core.tracing import TRACER_NAME
from service.grpc.auth import KeyInterceptor, server_credentials
from service.grpc.server import SERVICE_NAME, GrpcDoor
from service.label_studio.routes import label_studio_door
from service.oip.routes import oip_door
from service.page.routes import add_page
from service.segment.routes import segment_door
from service.web.auth import key_dependency
from service.web.docs import add_docs
from service.web.doors import add_doors
from service.web.health import health_router, serve_metrics
from service.web.request_id import HEADER as REQUEST_ID_HEADER
from service.web.request_log import RequestLogMiddleware
from service.web.tracing import TracingConfigError, instrument, tracer_provider_from_env

API_VERSION = "1"
log = logging.getLogger("service")
# What a browser on an allowed origin may send and read (MRCNN_CORS_ORIGINS).
CORS_REQUEST_HEADERS = ["Authorization", API_KEY_HEADER, "Content-Type", "Content-Encoding", REQUEST_ID_HEADER,
                        "Inference-Header-Content-Length", "traceparent", "tracestate"]
CORS_RESPONSE_HEADERS = [REQUEST_ID_HEADER, "Retry-After", "Inference-Header-Content-Length", "WWW-Authenticate"]


def create_app(
    settings: Settings | None = None, model: OnnxModel | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """The app for ``settings`` (default: from the environment); loads the model now unless given. Traces go
    to ``tracer_provider``, by default the one the OTEL_* variables ask for (none: no tracing)."""
    settings = settings or Settings()
    keys = ApiKeys.from_settings(settings)  # before the model: a bad keys or tracing setting fails at once
    grpc_tls = server_credentials(settings) if settings.grpc_port else None  # so does an unreadable certificate
    tracer_provider = tracer_provider or tracer_provider_from_env()
    if model is None:
        model = OnnxModel(
            settings.model_path, settings.providers, settings.intra_op_threads, settings.inter_op_threads,
            allow_spinning=settings.ort_spinning,
        )
    cv2.setNumThreads(1)  # requests are parallel already; OpenCV's own threads would oversubscribe
    pipeline = Pipeline(settings, model, tracer_provider.get_tracer(TRACER_NAME) if tracer_provider else None)
    grpc_door = None
    if settings.grpc_port:  # the HTTP side's keys (in the call's metadata) and certificate
        interceptors = [KeyInterceptor(keys, (SERVICE_NAME,))] if keys is not None else []
        grpc_door = GrpcDoor(pipeline, API_VERSION, interceptors, grpc_tls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pipeline.start()
        metrics_server = None
        if settings.metrics_port is not None:
            metrics_server = serve_metrics(pipeline, settings.host, settings.metrics_port)
        try:
            if grpc_door is not None:
                await grpc_door.start(settings.host, settings.grpc_port)
            yield
        finally:
            if grpc_door is not None:  # its RPCs in flight finish while the pipeline still runs
                await grpc_door.stop(settings.drain_timeout_s)
            if metrics_server is not None:
                metrics_server.shutdown()
            await pipeline.stop()
            if tracer_provider is not None:
                tracer_provider.shutdown()  # the spans still buffered are exported

    app = FastAPI(
        title="Mask R-CNN segmentation service",
        version=API_VERSION,
        description="Instance segmentation with an exported Mask R-CNN on ONNX Runtime.",
        lifespan=lifespan,
        openapi_url=None,  # the schema and its viewers are routes of ours, under the key rule (add_docs)
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(key_dependency(keys))] if keys is not None else None,
    )
    app.state.pipeline = pipeline
    app.state.grpc = grpc_door
    add_doors(app, [segment_door(pipeline), oip_door(pipeline, API_VERSION), label_studio_door(pipeline)])
    app.include_router(health_router(pipeline, metrics_on_api_port=settings.metrics_port is None))
    add_page(app, pipeline)
    add_docs(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=CORS_REQUEST_HEADERS, expose_headers=CORS_RESPONSE_HEADERS)
    app.add_middleware(RequestLogMiddleware)  # outside CORS: its preflight answers get an ID and a line too
    if tracer_provider is not None:
        instrument(app, tracer_provider)  # outermost: the request's log line knows its trace
    if keys is None:
        log.warning("no API keys (MRCNN_API_KEYS, MRCNN_API_KEYS_FILE): every route is open to anyone")
    else:
        log.info("%d API key(s): every route but the probes and the page's files needs one", len(keys))
    return app


def load_app_or_exit(settings: Settings | None = None) -> FastAPI:
    """create_app, but a bad model or keys file, or an unknown trace exporter, ends the process with one line
    instead of a traceback."""
    try:
        return create_app(settings)
    except ModelLoadError as exc:
        print(f"error: cannot serve the model: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ApiKeysError, TracingConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """``service.app:app`` for uvicorn, built on first access so importing this module loads nothing."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = load_app_or_exit()
    return _app
