"""The Open Inference Protocol's REST routes, ``/v2/...``, over the same pipeline as ``/segment``
(admission, batcher, limits, deadline, metrics under ``route="v2"``), so that clients of the protocol
(Triton's ``tritonclient`` is the one tested) work against this server. The body format is codec.py's,
the model's tensors model.py's, the error statuses errors.py's.

The model's name and version are the graph's metadata, as ``GET /v1/model`` reports them; each model route
is served with and without ``/versions/{version}``.
"""

# No ``from __future__ import annotations`` here: the model routes' parameter type depends on a dependency
# local to add_model_routes, which FastAPI could not resolve from a string annotation.
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from contract import GraphMetadata
from service.core.errors import BadRequest
from service.core.pipeline import Pipeline, Segmented
from service.core.settings import Settings
from service.oip.codec import (
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    bad_request,
    encode_response,
    parse_request,
    request_schema,
)
from service.oip.errors import ERRORS, error_response
from service.oip.model import (
    INPUTS,
    InferCall,
    answer_call,
    check_model,
    image_call,
    model_config,
    model_metadata,
    output_tensors,
    server_metadata,
    tensor_call,
)
from service.web.body import check_declared_length, content_encoding, inflate, read_body
from service.web.doors import Door
from service.web.request_log import note_work

PREFIX = "/v2"
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "A JSON inference request; or, with Inference-Header-Content-Length, that many bytes "
        "of JSON followed by the inputs' binary data; or, with Inference-Header-Content-Length: 0, the "
        "image file alone.",
        "content": {
            "application/json": {"schema": request_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
INFER_BINARY_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"description": "JSON; or, with Inference-Header-Content-Length, that many bytes of JSON followed by "
          "the binary outputs", "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}}}},
}


@dataclass(frozen=True)
class ModelRef:
    """The model a /v2/models/... route names: its name and version (None: not given)."""

    name: str
    version: str | None = None


def unversioned(name: str) -> ModelRef:
    """/v2/models/{name}/...: the path's model."""
    return ModelRef(name)


def versioned(name: str, version: str) -> ModelRef:
    """/v2/models/{name}/versions/{version}/...: the path's model and version."""
    return ModelRef(name, version)


def header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise bad_request(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)


def parse_call(body: bytes, encoding: str, length: int | None, settings: Settings, info: GraphMetadata) -> InferCall:
    """Worker thread: an infer request body as the image, the options and the outputs it asks for. With
    ``Inference-Header-Content-Length: 0`` the whole body is the IMAGE (Triton's raw binary request)."""
    body = inflate(body, encoding, settings.max_upload_bytes)
    if length == 0:
        return image_call(body, settings, info)
    return tensor_call(parse_request(body, length, INPUTS), settings, info)


def encode_call(call: InferCall, done: Segmented, info: GraphMetadata) -> tuple[bytes, int | None]:
    """Worker thread: the response body of a call, and its JSON header's length when binary follows."""
    return encode_response(info.model_name, info.model_version, call.id, output_tensors(call, done, info))


async def infer_one(pipeline: Pipeline, request: Request, model: ModelRef) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer: the same steps as /segment, in the protocol."""
    started = time.perf_counter()
    settings, info = pipeline.settings, pipeline.model.metadata
    check_model(info, model.name, model.version)
    await check_declared_length(request, settings.max_upload_bytes)
    encoding, length = content_encoding(request), header_length(request)
    async with pipeline.admitted("v2", started) as slot:
        body = await read_body(request, settings.max_upload_bytes)
        parse = partial(parse_call, body, encoding, length, settings, info)
        encode = partial(encode_call, info=info)
        body, json_length = await answer_call(pipeline, slot, parse, encode, partial(note_work, request))
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_length)})


def add_model_routes(router: APIRouter, pipeline: Pipeline, path: str, model_of: Callable[..., ModelRef]) -> None:
    """The routes of the model at ``path``, which ``model_of`` (a dependency on the path's parameters) names."""
    info = pipeline.model.metadata
    Model = Annotated[ModelRef, Depends(model_of)]  # noqa: N806 (a type alias, local to the path)

    @router.get(path, response_model=ModelMetadata, responses={404: ERRORS[404]},
                summary="Model metadata: inputs and outputs")
    async def metadata(model: Model) -> ModelMetadata:
        check_model(info, model.name, model.version)
        return model_metadata(info)

    @router.get(path + "/ready", response_model=ModelReady, responses={400: ERRORS[400], 404: ERRORS[404]},
                summary="Model readiness (200: ready, 400: not)")
    async def model_ready(model: Model) -> Any:
        check_model(info, model.name, model.version)
        return ModelReady(name=model.name, ready=True) if pipeline.state == "ready" else not_ready(pipeline)

    @router.get(path + "/config", response_model=ModelConfig, response_model_exclude_none=True,
                responses={404: ERRORS[404]}, summary="Model configuration, as Triton reports it")
    async def config(model: Model) -> ModelConfig:
        check_model(info, model.name, model.version)
        return model_config(info)

    @router.post(path + "/infer", response_model=InferenceResponse, responses={**INFER_BINARY_RESPONSE, **ERRORS},
                 openapi_extra=INFER_BODY, summary="Segment one image (IMAGE or PIXELS)")
    async def infer(request: Request, model: Model) -> Response:
        return await pipeline.handle("v2", lambda: infer_one(pipeline, request, model), error_response,
                                     lambda response: response.status_code)


def not_ready(pipeline: Pipeline) -> JSONResponse:
    return error_response(BadRequest("not_ready", f"the server is not ready ({pipeline.state})"))


def oip_door(pipeline: Pipeline, server_version: str) -> Door:
    """The protocol's routes, and its error format for every path under /v2."""
    router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol v2"])

    @router.get("", response_model=ServerMetadata, summary="Server metadata")
    async def metadata() -> ServerMetadata:
        return server_metadata(server_version)

    @router.get("/health/live", summary="Server liveness (200: live)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", responses={400: ERRORS[400]}, summary="Server readiness (200: ready, 400: not)")
    async def server_ready() -> Response:
        return JSONResponse({"ready": True}) if pipeline.state == "ready" else not_ready(pipeline)

    add_model_routes(router, pipeline, "/models/{name}", unversioned)
    add_model_routes(router, pipeline, "/models/{name}/versions/{version}", versioned)
    return Door(router, prefix=PREFIX, error_response=error_response)
