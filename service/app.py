"""FastAPI app: thin routes over the request pipeline (service/pipeline.py).

``create_app(settings)`` loads the model at once (so a bad file fails before serving) and returns the
app; ``service.app:app`` builds one from ``MRCNN_*`` environment variables for ``uvicorn``. The event
loop only moves bytes and futures: the pipeline decodes and post-processes in worker threads and runs
the model in its batcher's thread.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import cv2
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.body import check_declared_length, content_encoding, read_body
from service.errors import ApiError
from service.options import SegmentOptions, resolve
from service.page import add_page
from service.pipeline import Pipeline
from service.render import serialize
from service.runtime import ModelLoadError, OnnxModel
from service.schemas import ErrorResponse, ModelResponse, SegmentResponse, Status
from service.segment_request import SEGMENT_BODY, check_segment_type, image_and_options
from service.settings import Settings
from service.v2_routes import add_v2_routes, is_v2, v2_error

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Undecodable or empty image, malformed JSON or base64",
        413: "Body or pixel count over the limits",
        415: "Unsupported content type, content encoding or image format",
        422: "Bad options",
        503: "Queue full or shutting down (see Retry-After)",
        504: "Past the request deadline",
    }.items()
}


def segment_error(exc: ApiError) -> JSONResponse:
    """Our error body: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status, exc.headers)


async def segment_one(pipeline: Pipeline, request: Request, options: SegmentOptions) -> Response:
    """POST /segment: admission, body, decode, batch, post-process, JSON."""
    started = time.perf_counter()
    settings, info = pipeline.settings, pipeline.model.metadata
    resolve(options, settings.score_threshold, info)  # bad query options: 422 before any work
    await check_declared_length(request, settings.max_upload_bytes)
    check_segment_type(request)
    encoding = content_encoding(request)
    async with pipeline.admitted("segment", started) as slot:
        body = await read_body(request, settings.max_upload_bytes)
        data, options = await pipeline.in_pool(image_and_options, body, request.headers["content-type"], encoding,
                                               options, settings.max_upload_bytes)
        resolved = resolve(options, settings.score_threshold, info)
        done = await pipeline.segment(slot, data, resolved)
        timings = {"decode_ms": done.decode_s * 1e3, "queue_ms": done.inferred.queue_s * 1e3,
                   "inference_ms": done.inferred.run_s * 1e3, "postprocess_ms": done.postprocess_s * 1e3}
        body = await pipeline.in_pool(serialize, done.prediction, done.masks, info, done.inferred.batch_size, timings,
                                      started)
    return Response(body, media_type="application/json")


def add_error_handlers(app: FastAPI, pipeline: Pipeline) -> None:
    """Errors outside the pipeline's own (routing, FastAPI's validation, the protocol's metadata routes) in
    the error body of the protocol the path belongs to."""

    def answer(request: Request, exc: ApiError) -> JSONResponse:
        return v2_error(exc) if is_v2(request) else segment_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "query")
        if request.url.path == "/segment":  # typed query options FastAPI refused before the handler ran
            pipeline.metrics.observe_request("segment", 422, 0.0)
        return answer(request, ApiError(422, "invalid_option", f"{where}: {first['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return answer(request, ApiError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)


def add_routes(app: FastAPI, pipeline: Pipeline) -> None:
    @app.post("/segment", response_model=SegmentResponse, responses=ERROR_RESPONSES, openapi_extra=SEGMENT_BODY,
              summary="Segment every instance in one image")
    async def segment(request: Request, options: Annotated[SegmentOptions, Query()]) -> Response:
        return await pipeline.handle("segment", lambda: segment_one(pipeline, request, options), segment_error)

    @app.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}}, summary="Readiness")
    async def readyz() -> Response:
        return JSONResponse({"status": pipeline.state}, status_code=200 if pipeline.state == "ready" else 503)

    @app.get("/v1/model", response_model=ModelResponse, summary="The model being served")
    async def model_info() -> ModelResponse:
        info = pipeline.model.metadata
        return ModelResponse(
            name=info.model_name, version=info.model_version, architecture=info.architecture,
            classes=info.class_names[1:], mask_size=info.mask_size, min_size=info.min_size,
            max_size=info.max_size, size_divisibility=info.size_divisibility,
            detections_per_image=info.detections_per_image, providers=pipeline.model.providers,
            max_batch_size=pipeline.settings.max_batch_size,
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(pipeline.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings | None = None, model: OnnxModel | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment); loads the model now unless given."""
    settings = settings or Settings()
    if model is None:
        model = OnnxModel(
            settings.model_path, settings.providers, settings.intra_op_threads, settings.inter_op_threads,
            allow_spinning=settings.ort_spinning,
        )
    cv2.setNumThreads(1)  # requests are parallel already; OpenCV's own threads would oversubscribe
    pipeline = Pipeline(settings, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pipeline.start()
        try:
            yield
        finally:
            await pipeline.stop()

    app = FastAPI(
        title="Mask R-CNN segmentation service",
        version="1",
        description="Instance segmentation with an exported Mask R-CNN on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.pipeline = pipeline
    add_error_handlers(app, pipeline)
    add_routes(app, pipeline)
    add_v2_routes(app, pipeline)
    add_page(app, pipeline)
    return app


def load_app_or_exit(settings: Settings | None = None) -> FastAPI:
    """create_app, but a bad model file ends the process with one line instead of a traceback."""
    try:
        return create_app(settings)
    except ModelLoadError as exc:
        print(f"error: cannot serve the model: {exc}", file=sys.stderr)
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
