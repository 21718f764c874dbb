"""Label Studio's ML backend protocol under ``/label-studio``, over the same pipeline as /segment (admission,
batcher, limits, deadline, metrics under ``route="label_studio"``): a project connects ``http://HOST:PORT/label-studio``
as its model.

Label Studio (label_studio/ml/api_connector.py) calls ``GET /health`` (up?), ``GET /versions`` (the one model
version served here), ``POST /setup`` (the project's
labeling config; the answer's ``model_version`` names its predictions), ``POST /predict`` (a batch of tasks and
the config; the answer holds one prediction per task, in order) and ``POST /webhook`` (project events, meant
for training, which this backend does not do: acknowledged and ignored). With API keys set, every one of these
calls needs a key like any other route; Label Studio sends it as the password of its connection's HTTP Basic auth
(service/web/auth.py). A failed task fails the whole call,
so that Label Studio records no empty prediction in its place (it would not ask for that task again).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract import GraphMetadata
from service.core.errors import BadRequest, ServiceError, Unauthorized
from service.core.options import Resolved, SegmentOptions, resolve
from service.core.pipeline import Pipeline
from service.label_studio.config import Target, target_of
from service.label_studio.images import LabelStudio, read_task_image
from service.label_studio.regions import task_prediction
from service.segment.errors import error_response
from service.segment.schemas import ErrorResponse
from service.web.auth import LABEL_STUDIO_WWW_AUTHENTICATE
from service.web.body import check_declared_length, read_body
from service.web.doors import Door

PREFIX = "/label-studio"
M = TypeVar("M", bound=BaseModel)


class Task(BaseModel):
    """A task as Label Studio sends it: its id and data (the image URL under the config's key), and more."""

    model_config = ConfigDict(extra="allow")
    id: int | None = None
    data: dict[str, Any]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: list[Task] = Field(min_length=1)
    label_config: str


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    schema_: str = Field(alias="schema")  # the project's labeling config


class Event(BaseModel):
    """A webhook's event: its action (``ANNOTATION_CREATED``, ``START_TRAINING``, ...) and its payload."""

    model_config = ConfigDict(extra="allow")
    action: str | None = None


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place (a request body described in
    ``openapi_extra`` cannot point at pydantic's ``$defs``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolved(node: object) -> object:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolved(defs[ref.removeprefix("#/$defs/")])
            return {key: resolved(value) for key, value in node.items()}
        return [resolved(value) for value in node] if isinstance(node, list) else node

    return resolved(schema)  # type: ignore[return-value]  # a dict stays a dict


def json_request(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads ``model`` as JSON itself (within the upload limit)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}}


def errors(**described: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI description of a route's errors: ``errors(e400="...")`` -> {400: {...}}."""
    return {int(code[1:]): {"model": ErrorResponse, "description": text} for code, text in described.items()}


NOT_A_REQUEST = "The body is not JSON of this request's form"
TOO_LARGE = "The body, or a task's image, is over the server's byte or pixel limits"
CONFIG_ERRORS = errors(e400=f"{NOT_A_REQUEST}, or the labeling config does not parse", e413=TOO_LARGE,
                       e422="The labeling config has no control this model fills in, or none of its labels is a class")


def model_version(info: GraphMetadata) -> str:
    """The name Label Studio gives this model's predictions: the graph's name and version."""
    return f"{info.model_name}-{info.model_version}"


def label_studio_door(pipeline: Pipeline) -> Door:
    """The ML backend's routes; errors as /segment says them (Label Studio shows the status and logs the body)."""
    router = APIRouter(prefix=PREFIX, tags=["Label Studio ML backend"])
    info = pipeline.model.metadata
    classes = info.class_names[1:]

    @router.get("/health", summary="Label Studio's check that the backend is up",
                responses=errors(e503="Not ready, or shutting down"))
    async def health() -> JSONResponse:
        up = pipeline.state == "ready"
        return JSONResponse({"status": "UP" if up else "DOWN", "model_class": info.architecture,
                             "model_version": model_version(info)}, 200 if up else 503)

    @router.get("/versions", summary="The model versions this backend offers (Label Studio's model settings)")
    async def versions() -> JSONResponse:
        return JSONResponse({"versions": [model_version(info)]})

    @router.post("/setup", summary="Label Studio connecting a project: its labeling config is checked",
                 responses=CONFIG_ERRORS, openapi_extra=json_request(SetupRequest))
    async def setup(request: Request) -> Response:
        async def work() -> Response:
            body = await json_body(pipeline, request, SetupRequest)
            target_of(body.schema_, classes)  # refused now rather than at the first prediction
            return JSONResponse({"model_version": model_version(info)})

        return await answer(work)

    @router.post("/predict", summary="Predictions for a batch of Label Studio tasks", openapi_extra=json_request(
        PredictRequest), responses={**CONFIG_ERRORS, **errors(
            e400=f"{NOT_A_REQUEST}, the labeling config does not parse, or a task's image cannot be read or decoded",
            e415="A task's image is in an unsupported format", e503="Queue full or shutting down (see Retry-After)",
            e504="Past the request deadline")})
    async def predict(request: Request) -> Response:
        async def work() -> Response:
            body = await json_body(pipeline, request, PredictRequest)
            target = target_of(body.label_config, classes)
            options = replace(resolve(SegmentOptions(classes=list(target.labels)), pipeline.settings.score_threshold,
                                      info), rle=target.kind == "brush", polygons=target.kind == "polygon")
            results = await predict_tasks(pipeline, body.tasks, target, options)
            return JSONResponse({"results": results, "model_version": model_version(info)})

        return await pipeline.handle("label_studio", work, error_response, lambda response: response.status_code)

    @router.post("/webhook", summary="Label Studio's project events: acknowledged, no training here",
                 responses=errors(e400=NOT_A_REQUEST, e413=TOO_LARGE), openapi_extra=json_request(Event))
    async def webhook(request: Request) -> Response:
        async def work() -> Response:
            event = await json_body(pipeline, request, Event)
            return JSONResponse({"status": "ignored", "action": event.action, "reason": "this backend does not train"})

        return await answer(work)

    return Door(router, prefix=PREFIX, error_response=label_studio_error_response)


def label_studio_error_response(exc: ServiceError) -> Response:
    """/segment's error answer; a 401's challenge also offers Basic auth, the only scheme Label Studio's ML
    backend connection sends (the key as the password)."""
    response = error_response(exc)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = LABEL_STUDIO_WWW_AUTHENTICATE
    return response


async def answer(work: Callable[[], Awaitable[Response]]) -> Response:
    """``work``'s answer, or its error's (the calls outside inference, not counted in the metrics)."""
    try:
        return await work()
    except ServiceError as exc:
        return error_response(exc)


async def json_body(pipeline: Pipeline, request: Request, model: type[M]) -> M:
    """The request's JSON body (within the upload limit) as ``model``; BadRequest when it is not one."""
    limit = pipeline.settings.max_upload_bytes
    await check_declared_length(request, limit)
    raw = await read_body(request, limit)
    try:
        values = await pipeline.in_pool(json.loads, raw)
        return model.model_validate(values)
    except (ValueError, RecursionError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        message = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else f"not valid JSON ({exc})"
        raise BadRequest("bad_json", f"the body is not a Label Studio request: {message}") from None


async def predict_tasks(pipeline: Pipeline, tasks: list[Task], target: Target, options: Resolved) -> list[object]:
    """Each task's prediction, in order. At most a full batch of tasks hold slots at once, so that a large
    selection in Label Studio fills batches without taking every slot of the server; the first failure
    cancels the rest and is the answer."""
    studio = LabelStudio(pipeline.settings.label_studio_url, token_of(pipeline))
    gate = asyncio.Semaphore(pipeline.settings.max_batch_size)

    async def one(task: Task) -> object:
        async with gate:
            try:
                return await predict_task(pipeline, task, target, options, studio)
            except ServiceError as exc:
                raise type(exc)(exc.code, f"task {task.id}: {exc.message}") from None

    try:
        async with asyncio.TaskGroup() as group:
            jobs = [group.create_task(one(task)) for task in tasks]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [job.result() for job in jobs]


async def predict_task(
    pipeline: Pipeline, task: Task, target: Target, options: Resolved, studio: LabelStudio
) -> object:
    """One task: its image read and segmented under a slot of its own, its detections as regions."""
    url = task.data.get(target.data_key)
    if not isinstance(url, str) or not url:
        raise BadRequest("missing_image", f"the task has no image URL in data.{target.data_key}")
    settings, info = pipeline.settings, pipeline.model.metadata
    async with pipeline.admitted("label_studio", time.perf_counter()) as slot:
        data = await pipeline.in_pool(read_task_image, url, studio, settings.max_upload_bytes,
                                      settings.request_timeout_s)
        done = await pipeline.segment(slot, data, options)
        return await pipeline.in_pool(task_prediction, done.prediction, done.masks, info.class_names, target,
                                      model_version(info))


def token_of(pipeline: Pipeline) -> str | None:
    token = pipeline.settings.label_studio_token
    return token.get_secret_value() if token is not None else None

