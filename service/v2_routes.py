"""The Open Inference Protocol v2 front door: ``/v2/...`` routes over the same pipeline as ``/segment``
(admission, batcher, limits, deadline, metrics under ``route="v2"``), so that clients of the protocol
(Triton's ``tritonclient`` is the one tested) work against this server. The codec is
service/inference_protocol.py.

The model, as the protocol sees it (its name and version are the graph's metadata, as ``GET /v1/model``
reports them):

- inputs, exactly one of: ``IMAGE`` BYTES [1], one encoded image file (what /segment takes; in a JSON
  body, base64-encoded, since JSON strings cannot carry binary); ``PIXELS`` UINT8 [H, W, 3], RGB, for
  clients that decode themselves (the pixel limit applies, and the model's resize policy);
- request parameters: ``score_threshold``, ``max_detections``, ``classes`` (as on /segment);
- outputs, the request's ``outputs`` choosing (default: all but ``polygons``): ``boxes`` FP32 [N, 4]
  (x1, y1, x2, y2 in the original pixels), ``scores`` FP32 [N], ``labels`` INT64 [N] (class ids),
  ``class_names`` BYTES [N], ``masks`` BYTES [N] (each a COCO RLE as a JSON string, for
  ``pycocotools.mask.decode``) and ``polygons`` BYTES [N] (each a JSON list of COCO polygons). A mask
  encoding is computed only when its output is asked for.

``max_batch_size`` is 0 in the model's configuration: a request carries one image, and the batching
happens inside the server (the dynamic batcher), out of the client's sight.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from contract import GraphMetadata
from service.body import check_declared_length, content_encoding, inflate, read_body
from service.errors import ApiError
from service.inference_protocol import (
    ErrorResponse,
    InferenceResponse,
    ModelConfig,
    ModelMetadata,
    ModelReady,
    Output,
    ServerMetadata,
    Tensor,
    TensorSpec,
    bad_request,
    encode_response,
    error_status,
    object_array,
    parse_request,
    request_schema,
)
from service.options import FORMATS, Resolved, SegmentOptions, resolve
from service.pipeline import Pipeline, Segmented
from service.settings import Settings

PREFIX = "/v2"
SERVER_NAME = "maskrcnn-service"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters"]
INPUTS = (
    TensorSpec("IMAGE", "BYTES", (1,), optional=True),
    TensorSpec("PIXELS", "UINT8", (-1, -1, 3), optional=True),
)
OUTPUTS = {
    spec.name: spec
    for spec in (
        TensorSpec("boxes", "FP32", (-1, 4)),
        TensorSpec("scores", "FP32", (-1,)),
        TensorSpec("labels", "INT64", (-1,)),
        TensorSpec("class_names", "BYTES", (-1,)),
        TensorSpec("masks", "BYTES", (-1,)),
        TensorSpec("polygons", "BYTES", (-1,)),
    )
}
DEFAULT_OUTPUTS = tuple(name for name in OUTPUTS if name != "polygons")
# The output carrying each mask encoding of service/options.py's FORMATS.
FORMAT_OUTPUTS = dict(zip(FORMATS, ("masks", "polygons"), strict=True))
OPTION_PARAMETERS = tuple(name for name in SegmentOptions.model_fields if name != "formats")
# Not "onnxruntime_onnx", Triton's name for a bare ONNX file on ONNX Runtime: tools would take it to
# mean that the inputs and outputs are the graph's, when the server decodes, resizes and encodes masks
# around the graph.
PLATFORM = "mrcnn_onnxruntime"
BACKEND = "mrcnn"


def v2_error(exc: ApiError) -> JSONResponse:
    """The protocol's error body, ``{"error": "<message>"}``, under Triton's status codes."""
    return JSONResponse({"error": exc.message}, error_status(exc.status), exc.headers)


def is_v2(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(PREFIX + "/")


@dataclass(frozen=True)
class Call:
    """One infer request in our model's terms."""

    id: str | None
    image: bytes | np.ndarray  # an encoded file, or RGB pixels
    options: Resolved
    outputs: list[tuple[str, bool]]  # names to answer, in order, each in binary or not


def check_model(info: GraphMetadata, name: str, version: str | None) -> None:
    if name != info.model_name:
        raise ApiError(404, "unknown_model", f"unknown model '{name}'; this server serves '{info.model_name}'")
    if version not in (None, "", info.model_version):
        raise ApiError(404, "unknown_model",
                       f"unknown version '{version}' of model '{name}'; it has version '{info.model_version}'")


def header_length(request: Request) -> int | None:
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise bad_request(f"Inference-Header-Content-Length must be a byte count, not {value!r}")
    return int(value)


def parse_call(body: bytes, encoding: str, length: int | None, settings: Settings, info: GraphMetadata) -> Call:
    """Worker thread: an infer request body as the image, the options and the outputs it asks for. With
    ``Inference-Header-Content-Length: 0`` the whole body is the IMAGE (Triton's raw binary request)."""
    body = inflate(body, encoding, settings.max_upload_bytes)
    if length == 0:
        options = resolve(SegmentOptions(), settings.score_threshold, info)
        return Call(None, body, _with_outputs(options, DEFAULT_OUTPUTS), [(n, True) for n in DEFAULT_OUTPUTS])
    request = parse_request(body, length, INPUTS)
    given = sorted(request.inputs)
    if len(given) != 1:
        raise bad_request(f"give exactly one of the inputs IMAGE and PIXELS, not {given or 'none'}")
    image = _image(request.inputs[given[0]])
    parameters = request.model_parameters()
    unknown = sorted(set(parameters) - set(OPTION_PARAMETERS))
    if unknown:
        raise bad_request(f"unknown parameters {unknown}; the model takes {', '.join(OPTION_PARAMETERS)}")
    options = resolve(SegmentOptions.validated(parameters), settings.score_threshold, info)
    if request.outputs is None:
        outputs = [(name, request.output_binary(None)) for name in DEFAULT_OUTPUTS]
    else:
        outputs = [(o.name, request.output_binary(o)) for o in request.outputs]
        unknown = sorted({name for name, _ in outputs} - set(OUTPUTS))
        if unknown:
            raise bad_request(f"unknown outputs {unknown}; the model gives {', '.join(OUTPUTS)}")
    return Call(request.id, image, _with_outputs(options, [name for name, _ in outputs]), outputs)


def _image(tensor: Tensor) -> bytes | np.ndarray:
    if tensor.name == "PIXELS":
        return tensor.data
    data = tensor.data.ravel()[0]
    if tensor.binary:
        return data
    try:  # a JSON string: the file, base64-encoded
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise bad_request("input 'IMAGE' in JSON is the image file base64-encoded; it is not valid base64") from None


def _with_outputs(options: Resolved, names: Collection[str]) -> Resolved:
    """The options computing exactly the mask encodings whose outputs are asked for."""
    wanted = {fmt: FORMAT_OUTPUTS[fmt] in names for fmt in FORMATS}
    return replace(options, rle=wanted["rle"], polygons=wanted["polygons"])


def output_values(name: str, done: Segmented, class_names: list[str]) -> np.ndarray:
    """One output of a segmented request, as the tensor the protocol returns."""
    pred = done.prediction
    if name == "boxes":
        return pred.boxes
    if name == "scores":
        return pred.scores
    if name == "labels":
        return pred.labels
    if name == "class_names":
        return np.array(class_names, dtype=object)[pred.labels].reshape(-1)
    assert done.masks is not None  # the options asked for this encoding (_with_outputs)
    encoded = done.masks.rles if name == "masks" else done.masks.polygons
    assert encoded is not None
    return object_array([json.dumps(item, separators=(",", ":")) for item in encoded])


def encode_call(call: Call, done: Segmented, info: GraphMetadata) -> tuple[bytes, int | None]:
    """Worker thread: the response body of a call, and its JSON header's length when binary follows."""
    outputs = [Output(OUTPUTS[name], output_values(name, done, info.class_names), binary)
               for name, binary in call.outputs]
    return encode_response(info.model_name, info.model_version, call.id, outputs)


async def infer_one(pipeline: Pipeline, request: Request, name: str, version: str | None) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer: the same steps as /segment, in the protocol."""
    started = time.perf_counter()
    settings, info = pipeline.settings, pipeline.model.metadata
    check_model(info, name, version)
    await check_declared_length(request, settings.max_upload_bytes)
    encoding, length = content_encoding(request), header_length(request)
    async with pipeline.admitted("v2", started) as slot:
        body = await read_body(request, settings.max_upload_bytes)
        call = await pipeline.in_pool(parse_call, body, encoding, length, settings, info)
        done = await pipeline.segment(slot, call.image, call.options)
        body, json_length = await pipeline.in_pool(encode_call, call, done, info)
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(json_length)})


def model_metadata(info: GraphMetadata) -> ModelMetadata:
    return ModelMetadata(name=info.model_name, versions=[info.model_version], platform=PLATFORM,
                         inputs=[s.metadata() for s in INPUTS], outputs=[s.metadata() for s in OUTPUTS.values()])


def model_config(info: GraphMetadata) -> ModelConfig:
    return ModelConfig(name=info.model_name, platform=PLATFORM, backend=BACKEND, max_batch_size=0,
                       input=[s.config() for s in INPUTS], output=[s.config() for s in OUTPUTS.values()])


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
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad request: input, parameter, output or body"},
    404: {"model": ErrorResponse, "description": "Unknown model or version"},
    503: {"model": ErrorResponse, "description": "Overloaded, draining or past the deadline (see Retry-After)"},
}


def model_path(name: str) -> None:
    """Declares the path parameter of /v2/models/{name}... for the OpenAPI schema (routes read it from the
    request, see ``requested``)."""


def version_path(name: str, version: str) -> None:
    """Declares the path parameters of /v2/models/{name}/versions/{version}..."""


def requested(request: Request) -> tuple[str, str | None]:
    """The model name and version (None: not given) a /v2/models/... request is for."""
    return request.path_params["name"], request.path_params.get("version")


def add_v2_routes(app: FastAPI, pipeline: Pipeline) -> None:
    """The protocol's routes on ``app``; those of a model with and without ``/versions/{version}``."""
    info = pipeline.model.metadata
    tags = ["Open Inference Protocol v2"]

    def not_ready() -> JSONResponse:
        return v2_error(ApiError(400, "not_ready", f"the server is not ready ({pipeline.state})"))

    @app.get(PREFIX, response_model=ServerMetadata, tags=tags, summary="Server metadata")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name=SERVER_NAME, version=app.version, extensions=EXTENSIONS)

    @app.get(PREFIX + "/health/live", tags=tags, summary="Server liveness (200: live)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(PREFIX + "/health/ready", tags=tags, responses={400: ERRORS[400]},
             summary="Server readiness (200: ready, 400: not)")
    async def server_ready() -> Response:
        return JSONResponse({"ready": True}) if pipeline.state == "ready" else not_ready()

    async def metadata(request: Request) -> ModelMetadata:
        check_model(info, *requested(request))
        return model_metadata(info)

    async def model_ready(request: Request) -> Any:
        name, version = requested(request)
        check_model(info, name, version)
        return ModelReady(name=name, ready=True) if pipeline.state == "ready" else not_ready()

    async def config(request: Request) -> ModelConfig:
        check_model(info, *requested(request))
        return model_config(info)

    async def infer(request: Request) -> Response:
        return await pipeline.handle("v2", lambda: infer_one(pipeline, request, *requested(request)), v2_error)

    model = PREFIX + "/models/{name}"
    for path, declared in ((model, model_path), (model + "/versions/{version}", version_path)):
        add = functools.partial(app.add_api_route, dependencies=[Depends(declared)], tags=tags)
        add(path, metadata, methods=["GET"], response_model=ModelMetadata, responses={404: ERRORS[404]},
            summary="Model metadata: inputs and outputs")
        add(path + "/ready", model_ready, methods=["GET"], response_model=ModelReady,
            responses={400: ERRORS[400], 404: ERRORS[404]}, summary="Model readiness (200: ready, 400: not)")
        add(path + "/config", config, methods=["GET"], response_model=ModelConfig, response_model_exclude_none=True,
            responses={404: ERRORS[404]}, summary="Model configuration, as Triton reports it")
        add(path + "/infer", infer, methods=["POST"], response_model=InferenceResponse,
            responses={**INFER_BINARY_RESPONSE, **ERRORS}, openapi_extra=INFER_BODY,
            summary="Segment one image (IMAGE or PIXELS)")
