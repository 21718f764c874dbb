"""FastAPI app: POST /segment with dynamic batching, health, model info and Prometheus metrics.

``create_app(settings)`` loads the model at once (so a bad file fails before serving) and returns the
app; ``service.app:app`` builds one from ``MRCNN_*`` environment variables for ``uvicorn``. The event
loop only moves bytes and futures: decoding + resizing and post-processing + JSON encoding run in a
small thread pool, inference in the batcher's single thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import MultiDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import BatchStats, Draining, DynamicBatcher, QueueFull, Slot
from service.images import ImageError, check_content_type, decode_image
from service.metrics import Metrics
from service.multipart import MultipartError, parse_multipart
from service.postprocess import encode_masks
from service.runtime import ModelLoadError, OnnxModel, Prediction, Resized
from service.schemas import ErrorResponse, ModelResponse, SegmentOptions, SegmentResponse, Status
from service.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")

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
                        "score_threshold": {"type": "number"},
                        "max_detections": {"type": "integer"},
                        "classes": {"type": "string", "description": "Comma-separated class names"},
                        "formats": {"type": "string", "description": "rle, polygons or rle,polygons"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


@dataclass(frozen=True)
class BatchInput:
    """What one request puts in a batch: its resized image and its own score threshold."""

    resized: Resized
    score_threshold: float


@dataclass
class State:
    ready: bool = False
    draining: bool = False


class Segmenter:
    """The model, the batcher, the worker pool and the metrics of one app."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        self.metrics = Metrics()
        self.state = State()
        info = model.metadata
        self.metrics.model.info({"name": info.name, "version": info.version, "arch": info.architecture})
        self.batcher: DynamicBatcher[BatchInput, Prediction] = DynamicBatcher(
            self.run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000.0,
            capacity=settings.queue_capacity,
            on_batch=self._on_batch,
            on_depth=self.metrics.queue_depth.set,
        )
        self.pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="worker")

    def run_batch(self, inputs: list[BatchInput]) -> list[Prediction]:
        """Runs in the inference thread: pad, one ORT call, split per image."""
        items = [i.resized for i in inputs]
        thresholds = np.array([i.score_threshold for i in inputs], dtype=np.float32)
        images, sizes = self.model.collate(items)
        outputs = self.model.run(images, sizes, thresholds)
        return self.model.split(outputs, items, thresholds)

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.inference.observe(stats.run_s)
        for wait in stats.queue_waits_s:
            self.metrics.queue_wait.observe(wait)

    def warmup(self) -> None:
        """One inference at the policy's size so the first request does not pay ORT's allocations."""
        info = self.model.metadata
        image = np.full((info.min_size, info.min_size, 3), 114, dtype=np.uint8)
        self.model.predict([image], score_threshold=self.settings.score_threshold)

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


# ---- request parsing ---------------------------------------------------------------------------------


def _split_values(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_options(sources: list[Any], settings: Settings, model: OnnxModel) -> SegmentOptions:
    """Options from query params and form fields (later sources win); 422 on anything invalid."""
    raw: dict[str, Any] = {"score_threshold": settings.score_threshold}
    for src in sources:
        for key in ("score_threshold", "max_detections"):
            if src.get(key) is not None:
                raw[key] = src.get(key)
        for key in ("classes", "formats"):
            values = [v for v in src.getlist(key) if isinstance(v, str)]
            if values:
                raw[key] = _split_values(values)
    try:
        opts = SegmentOptions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(422, "invalid_option", f"{where}: {first['msg']}") from None
    limit = model.metadata.detections_per_image
    if opts.max_detections is not None and opts.max_detections > limit:
        raise ApiError(422, "invalid_option", f"max_detections: at most {limit} for this model")
    if opts.classes is not None:
        unknown = sorted(set(opts.classes) - set(model.class_names[1:]))
        if unknown:
            raise ApiError(422, "invalid_option", f"classes: unknown {unknown}; see GET /v1/model")
    return opts


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (also for chunked uploads)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def check_raw_type(request: Request) -> None:
    """A raw body must declare a supported image type (415 before anything is read)."""
    ctype = request.headers.get("content-type", "")
    if not ctype:
        raise ApiError(415, "unsupported_media_type", "send the image as multipart field 'image' or as a "
                       "raw body with an image/* content type")
    check_content_type(ctype)


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


# ---- post-processing (worker thread) -----------------------------------------------------------------


def render(
    pred: Prediction, opts: SegmentOptions, model: OnnxModel, timings: dict[str, float], batch_size: int
) -> tuple[bytes, int]:
    """Filter, encode masks, and serialize the response; returns (JSON bytes, detections)."""
    start = time.perf_counter()
    names = model.class_names
    keep = np.arange(len(pred.scores))
    if opts.classes is not None:
        wanted = np.array([names.index(c) for c in opts.classes], dtype=np.int64)
        keep = keep[np.isin(pred.labels, wanted)]
    if opts.max_detections is not None:
        keep = keep[: opts.max_detections]
    height, width = pred.image_size
    enc = encode_masks(
        pred.masks[keep], pred.boxes[keep], (height, width), rle="rle" in opts.formats,
        polygons="polygons" in opts.formats,
    )
    boxes = np.round(pred.boxes[keep].astype(np.float64), 2).tolist()
    labels = pred.labels[keep].tolist()
    dets = [
        {
            "label": names[c], "class_id": c, "score": s, "box": b, "area": a,
            "mask": enc.rles[i] if enc.rles is not None else None,
            "polygons": enc.polygons[i] if enc.polygons is not None else None,
        }
        for i, (c, s, b, a) in enumerate(zip(labels, pred.scores[keep].tolist(), boxes, enc.areas.tolist(),
                                              strict=True))
    ]
    timings["postprocess_ms"] = (time.perf_counter() - start) * 1e3
    timings["total_ms"] = (time.perf_counter() - timings.pop("_t0")) * 1e3
    info = model.metadata
    body = SegmentResponse.model_validate(
        {
            "image": {"width": width, "height": height},
            "model": {"name": info.name, "version": info.version},
            "batch_size": batch_size,
            "detections": dets,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
    )
    return body.model_dump_json(exclude_none=True).encode(), len(dets)


# ---- the app -----------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, model: OnnxModel | None = None) -> FastAPI:
    """The app for ``settings`` (default: from the environment); loads the model now unless given."""
    settings = settings or Settings()
    if model is None:
        model = OnnxModel(
            settings.model_path, settings.providers, settings.intra_op_threads, settings.inter_op_threads,
            allow_spinning=settings.ort_spinning,
        )
    cv2.setNumThreads(1)  # requests are parallel already; OpenCV's own threads would oversubscribe
    seg = Segmenter(settings, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await seg.batcher.start()
        if settings.warmup:
            await seg.in_pool(seg.warmup)
        seg.state.ready = True
        info = model.metadata
        log.info("serving %s %s on %s", info.name, info.version, ", ".join(model.providers))
        try:
            yield
        finally:
            seg.state.ready = False
            seg.state.draining = True
            await seg.batcher.stop(settings.drain_timeout_s)
            seg.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="Mask R-CNN segmentation service",
        version="1",
        description="Instance segmentation with an exported Mask R-CNN on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.segmenter = seg

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "query")
        if request.url.path == "/segment":  # typed query options FastAPI refused before the handler ran
            seg.metrics.observe_request(422, 0.0)
        return error_response(422, "invalid_option", f"{where}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.post(
        "/segment",
        response_model=SegmentResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=SEGMENT_BODY,
        summary="Segment every instance in one image",
    )
    async def segment(
        request: Request,
        score_threshold: float | None = Query(None, description="Default from the server settings"),
        max_detections: int | None = Query(None, description="At most the model's detections_per_image"),
        classes: str | None = Query(None, description="Comma-separated class names to keep"),
        formats: str | None = Query(None, description="rle, polygons, or rle,polygons (default)"),
    ) -> Response:
        t0 = time.perf_counter()
        status = 500
        try:
            response = await _segment(request, t0)
            status = 200
            return response
        except ApiError as exc:
            status = exc.status
            return error_response(exc.status, exc.code, exc.message, exc.headers)
        except ImageError as exc:
            status = exc.status
            return error_response(exc.status, exc.code, exc.message)
        except Exception:
            log.exception("POST /segment failed")
            return error_response(500, "internal_error", "the server failed on this request")
        finally:
            seg.metrics.observe_request(status, time.perf_counter() - t0)

    async def _segment(request: Request, t0: float) -> Response:
        deadline = t0 + settings.request_timeout_s
        query_opts = parse_options([request.query_params], settings, model)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_upload_bytes:
            raise ApiError(413, "payload_too_large",
                           f"the body has {declared} bytes, more than {settings.max_upload_bytes}")
        if not is_multipart(request):
            check_raw_type(request)
        try:
            with seg.batcher.admit() as slot:
                seg.metrics.in_progress.inc()
                try:
                    return await _admitted(request, slot, query_opts, t0, deadline)
                finally:
                    seg.metrics.in_progress.dec()
        except (QueueFull, Draining) as exc:
            code = "overloaded" if isinstance(exc, QueueFull) else "shutting_down"
            raise ApiError(503, code, str(exc), {"Retry-After": "1"}) from None

    async def _admitted(
        request: Request, slot: Slot[BatchInput, Prediction], query_opts: SegmentOptions, t0: float,
        deadline: float,
    ) -> Response:
        try:
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                data = await read_body(request, settings.max_upload_bytes)
                opts = query_opts
                if is_multipart(request):
                    data, fields = await seg.in_pool(image_from_multipart, data, request.headers["content-type"])
                    opts = parse_options([request.query_params, fields], settings, model)
                t_dec = time.perf_counter()
                resized = await seg.in_pool(_decode_resize, data, settings.max_image_pixels, model)
                decode_ms = (time.perf_counter() - t_dec) * 1e3
                job = slot.submit(BatchInput(resized, opts.score_threshold))
                pred = await job.future
                timings = {"decode_ms": decode_ms, "queue_ms": job.queue_s * 1e3,
                           "inference_ms": job.run_s * 1e3, "_t0": t0}
                content, n = await seg.in_pool(render, pred, opts, model, timings, job.batch_size)
                seg.metrics.postprocess.observe(timings["postprocess_ms"] / 1e3)
        except TimeoutError:
            raise ApiError(504, "deadline_exceeded",
                           f"not answered within the {settings.request_timeout_s:g} s deadline") from None
        seg.metrics.detections.inc(n)
        return Response(content, media_type="application/json")

    @app.get("/healthz", response_model=Status, summary="Liveness")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}}, summary="Readiness")
    async def readyz() -> Response:
        if seg.state.draining or seg.batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not seg.state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/model", response_model=ModelResponse, summary="The model being served")
    async def model_info() -> ModelResponse:
        info = model.metadata
        return ModelResponse(
            name=info.name, version=info.version, architecture=info.architecture,
            classes=info.class_names[1:], mask_size=info.mask_size, min_size=info.min_size,
            max_size=info.max_size, size_divisibility=info.size_divisibility,
            detections_per_image=info.detections_per_image, providers=model.providers,
            max_batch_size=settings.max_batch_size,
        )

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(seg.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _decode_resize(data: bytes, max_pixels: int, model: OnnxModel) -> Resized:
    """Worker thread: decode (limits first), then resize by the model's policy."""
    return model.resize(decode_image(data, max_pixels))


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
