"""The /segment front door: ``POST /segment`` (one image in, its detections as JSON out) and ``GET /v1/model``
(the model it serves), thin routes over the core's pipeline. The body forms are read by request.py, the
answer written by response.py, errors said by errors.py."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.core.options import SegmentOptions, resolve
from service.core.pipeline import Pipeline
from service.core.tracing import ENCODE
from service.segment.errors import ERROR_RESPONSES, error_response
from service.segment.request import SEGMENT_BODY, check_segment_type, image_and_options
from service.segment.response import response_body
from service.segment.schemas import ModelResponse, SegmentResponse
from service.web.body import check_declared_length, content_encoding, read_body
from service.web.doors import Door
from service.web.request_log import note_work

SEGMENT_PATH = "/segment"


async def segment_one(pipeline: Pipeline, request: Request, options: SegmentOptions) -> Response:
    """POST /segment: admission, body, decode, batch, post-process, JSON."""
    started = time.perf_counter()
    settings, info = pipeline.settings, pipeline.model.metadata
    resolve(options, settings.score_threshold, info)  # bad query options: refused before any work
    await check_declared_length(request, settings.max_upload_bytes)
    check_segment_type(request)
    encoding = content_encoding(request)
    async with pipeline.admitted("segment", started) as slot:
        body = await read_body(request, settings.max_upload_bytes)
        data, options = await pipeline.in_pool(image_and_options, body, request.headers["content-type"], encoding,
                                               options, settings.max_upload_bytes)
        resolved = resolve(options, settings.score_threshold, info)
        done = await pipeline.segment(slot, data, resolved)
        note_work(request, done)
        timings = {"decode_ms": done.decode_s * 1e3, "queue_ms": done.inferred.queue_s * 1e3,
                   "inference_ms": done.inferred.run_s * 1e3, "postprocess_ms": done.postprocess_s * 1e3}
        with pipeline.tracer.start_as_current_span(ENCODE):
            body = await pipeline.in_pool(response_body, done.prediction, done.masks, info,
                                          done.inferred.batch_size, timings, started, done.tiles)
    return Response(body, media_type="application/json")


def model_response(pipeline: Pipeline) -> ModelResponse:
    info = pipeline.model.metadata
    return ModelResponse(
        name=info.model_name, version=info.model_version, architecture=info.architecture,
        classes=info.class_names[1:], mask_size=info.mask_size, min_size=info.min_size,
        max_size=info.max_size, size_divisibility=info.size_divisibility,
        detections_per_image=info.detections_per_image, providers=pipeline.model.providers,
        max_batch_size=pipeline.settings.max_batch_size,
    )


def segment_door(pipeline: Pipeline) -> Door:
    """The door's routes; it owns every path no other door does (its error format is the server's own)."""
    router = APIRouter()

    @router.post(SEGMENT_PATH, response_model=SegmentResponse, responses=ERROR_RESPONSES, openapi_extra=SEGMENT_BODY,
                 summary="Segment every instance in one image")
    async def segment(request: Request, options: Annotated[SegmentOptions, Query()]) -> Response:
        return await pipeline.handle("segment", lambda: segment_one(pipeline, request, options), error_response,
                                     lambda response: response.status_code)

    @router.get("/v1/model", response_model=ModelResponse, summary="The model being served")
    async def model_info() -> ModelResponse:
        return model_response(pipeline)

    def count_refused(request: Request) -> None:
        """Typed query options FastAPI refused before the handler ran still count as /segment requests."""
        if request.url.path == SEGMENT_PATH:
            pipeline.metrics.observe_request("segment", 422, 0.0)

    return Door(router, prefix="", error_response=error_response, on_invalid_request=count_refused)
