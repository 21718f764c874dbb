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
from starlette.datastructures import MultiDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import ApiError
from service.images import check_content_type
from service.multipart import MultipartError, parse_multipart
from service.options import SegmentOptions, resolve
from service.page import add_page
from service.pipeline import InferenceRequest, Pipeline
from service.render import encode_detections, filter_detections, serialize
from service.runtime import ModelLoadError, OnnxModel
from service.schemas import ErrorResponse, ModelResponse, SegmentResponse, Status
from service.settings import Settings

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Undecodable or empty image",
        413: "Body or pixel count over the limits",
        415: "Unsupported content type or image format",
        422: "Bad options",
        503: "Queue full or shutting down (see Retry-After)",
        504: "Past the request deadline",
    }.items()
}
# The request body's schema: the image as a multipart file (with the options as form fields) or raw.
SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        **SegmentOptions.model_json_schema()["properties"],
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def segment_error(exc: ApiError) -> JSONResponse:
    """Our error body: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, exc.status, exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (also for chunked uploads)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_declared_body(request: Request, limit: int) -> None:
    """Refuse before reading: a declared length over the limit (413), a raw body without a supported
    image type (415)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body has {declared} bytes, more than {limit}")
    if not is_multipart(request):
        content_type = request.headers.get("content-type", "")
        if not content_type:
            raise ApiError(415, "unsupported_media_type", "send the image as multipart field 'image' or as a "
                           "raw body with an image/* content type")
        check_content_type(content_type)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def image_from_multipart(body: bytes, content_type: str) -> tuple[bytes, MultiDict]:
    """Worker thread: the ``image`` file part and the text fields of a multipart body."""
    try:
        form = parse_multipart(body, content_type)
    except MultipartError as exc:
        raise ApiError(400, "bad_multipart", str(exc)) from None
    part = form.files.get("image")
    if part is None:
        raise ApiError(400, "missing_image", "multipart field 'image' (a file) is required")
    check_content_type(part.content_type)
    return part.data, form.fields


async def segment_one(pipeline: Pipeline, request: Request, options: SegmentOptions) -> Response:
    """POST /segment: admission, body, decode, batch, post-process, JSON."""
    started = time.perf_counter()
    settings, info = pipeline.settings, pipeline.model.metadata
    resolve(options, settings.score_threshold, info)  # bad query options: 422 before any work
    check_declared_body(request, settings.max_upload_bytes)
    async with pipeline.admitted(started) as slot:
        data = await read_body(request, settings.max_upload_bytes)
        if is_multipart(request):
            data, fields = await pipeline.in_pool(image_from_multipart, data, request.headers["content-type"])
            options = options.with_form(fields)
        resolved = resolve(options, settings.score_threshold, info)
        decode_started = time.perf_counter()
        image = await pipeline.decode(data)
        decode_ms = (time.perf_counter() - decode_started) * 1e3
        inferred = await pipeline.infer(slot, InferenceRequest(image, resolved.score_threshold))
        post_started = time.perf_counter()
        pred = filter_detections(inferred.prediction, resolved)
        encoded = await pipeline.in_pool(encode_detections, pred, resolved)
        postprocess_s = time.perf_counter() - post_started
        timings = {"decode_ms": decode_ms, "queue_ms": inferred.queue_s * 1e3, "inference_ms": inferred.run_s * 1e3,
                   "postprocess_ms": postprocess_s * 1e3}
        body = await pipeline.in_pool(serialize, pred, encoded, info, inferred.batch_size, timings, started)
    pipeline.metrics.postprocess.observe(postprocess_s)
    pipeline.metrics.detections.inc(len(pred.scores))
    return Response(body, media_type="application/json")


def add_error_handlers(app: FastAPI, pipeline: Pipeline) -> None:
    """Errors outside the pipeline's own (routing, FastAPI's validation) in the same JSON body."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "query")
        if request.url.path == "/segment":  # typed query options FastAPI refused before the handler ran
            pipeline.metrics.observe_request(422, 0.0)
        return segment_error(ApiError(422, "invalid_option", f"{where}: {first['msg']}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return segment_error(ApiError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)))


def add_routes(app: FastAPI, pipeline: Pipeline) -> None:
    @app.post("/segment", response_model=SegmentResponse, responses=ERROR_RESPONSES, openapi_extra=SEGMENT_BODY,
              summary="Segment every instance in one image")
    async def segment(request: Request, options: Annotated[SegmentOptions, Query()]) -> Response:
        return await pipeline.handle(lambda: segment_one(pipeline, request, options), segment_error)

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
