"""Our model as the Open Inference Protocol sees it: the tensors it takes and gives, its metadata and
configuration, an infer request turned into the pipeline's terms (``InferCall``) and a segmented image
turned into output tensors, and an admitted infer request's work (``answer_call``). Transport-free: the REST
routes (routes.py) and the gRPC servicer (service/grpc/) both use it.

- inputs, exactly one of: ``IMAGE`` BYTES [1], one encoded image file (what /segment takes; in a JSON
  body, base64-encoded, since JSON strings cannot carry binary); ``PIXELS`` UINT8 [H, W, 3], RGB, for
  clients that decode themselves (the pixel limit applies, and the model's resize policy);
- request parameters: ``score_threshold``, ``max_detections``, ``classes`` (as on /segment), and Triton's
  ``timeout`` (microseconds; past it a 503 without running the model) and ``priority`` (1 the highest);
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
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from contract import GraphMetadata
from service.core.batcher import Slot
from service.core.errors import NotFound
from service.core.options import FORMATS, Resolved, SegmentOptions, resolve
from service.core.pipeline import BatchItem, Pipeline, Segmented
from service.core.runtime import Prediction
from service.core.settings import Settings
from service.core.tracing import ENCODE
from service.oip.codec import (
    ModelConfig,
    ModelMetadata,
    Output,
    ParsedRequest,
    ServerMetadata,
    Tensor,
    TensorSpec,
    bad_request,
    object_array,
)

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
# The output carrying each mask encoding of service/core/options.py's FORMATS.
FORMAT_OUTPUTS = dict(zip(FORMATS, ("masks", "polygons"), strict=True))
# Triton's schedule-policy request parameters: ``priority`` as ours, ``timeout`` in microseconds (0: none).
TIMEOUT_PARAMETER = "timeout"
OPTION_PARAMETERS = tuple(TIMEOUT_PARAMETER if name == "timeout_ms" else name
                          for name in SegmentOptions.model_fields if name != "formats")
# Not "onnxruntime_onnx", Triton's name for a bare ONNX file on ONNX Runtime: tools would take it to
# mean that the inputs and outputs are the graph's, when the server decodes, resizes and encodes masks
# around the graph.
PLATFORM = "mrcnn_onnxruntime"
BACKEND = "mrcnn"
SERVER_NAME = "maskrcnn-service"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "parameters"]
T = TypeVar("T")


@dataclass(frozen=True)
class InferCall:
    """One infer request in the pipeline's terms: the image, the options, the outputs to answer."""

    id: str | None
    image: bytes | np.ndarray  # an encoded file, or RGB pixels
    options: Resolved
    outputs: list[tuple[str, bool]]  # names to answer, in order, each in binary or not


def check_model(info: GraphMetadata, name: str, version: str | None) -> None:
    """NotFound unless ``name`` (and ``version``, when given) is the served model's."""
    if name != info.model_name:
        raise NotFound("unknown_model", f"unknown model '{name}'; this server serves '{info.model_name}'")
    if version not in (None, "", info.model_version):
        raise NotFound("unknown_model",
                       f"unknown version '{version}' of model '{name}'; it has version '{info.model_version}'")


def image_call(image: bytes, settings: Settings, info: GraphMetadata) -> InferCall:
    """A request that is the image file alone (Triton's raw binary request): default options and outputs,
    all in binary."""
    options = resolve(SegmentOptions(), settings.score_threshold, info)
    return InferCall(None, image, _with_outputs(options, DEFAULT_OUTPUTS), [(n, True) for n in DEFAULT_OUTPUTS])


def tensor_call(request: ParsedRequest, settings: Settings, info: GraphMetadata) -> InferCall:
    """A parsed infer request as the image, the options and the outputs it asks for."""
    given = sorted(request.inputs)
    if len(given) != 1:
        raise bad_request(f"give exactly one of the inputs IMAGE and PIXELS, not {given or 'none'}")
    image = _image(request.inputs[given[0]])
    parameters = request.model_parameters()
    unknown = sorted(set(parameters) - set(OPTION_PARAMETERS))
    if unknown:
        raise bad_request(f"unknown parameters {unknown}; the model takes {', '.join(OPTION_PARAMETERS)}")
    options = resolve(SegmentOptions.validated(option_values(parameters)), settings.score_threshold, info)
    if request.outputs is None:
        outputs = [(name, request.output_binary(None)) for name in DEFAULT_OUTPUTS]
    else:
        outputs = [(o.name, request.output_binary(o)) for o in request.outputs]
        unknown = sorted({name for name, _ in outputs} - set(OUTPUTS))
        if unknown:
            raise bad_request(f"unknown outputs {unknown}; the model gives {', '.join(OUTPUTS)}")
    return InferCall(request.id, image, _with_outputs(options, [name for name, _ in outputs]), outputs)


def option_values(parameters: dict[str, object]) -> dict[str, object]:
    """The request parameters as SegmentOptions' values: Triton's ``timeout`` in microseconds (0: none, as
    Triton) becomes ``timeout_ms``."""
    values = dict(parameters)
    if TIMEOUT_PARAMETER in values:
        timeout_us = values.pop(TIMEOUT_PARAMETER)
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float) or timeout_us < 0:
            raise bad_request(f"parameter '{TIMEOUT_PARAMETER}' is a count of microseconds, not {timeout_us!r}")
        if timeout_us > 0:
            values["timeout_ms"] = timeout_us / 1e3
    return values


def _image(tensor: Tensor) -> bytes | np.ndarray:
    if tensor.name == "PIXELS":
        return tensor.data
    data = tensor.data.ravel()[0]  # an object array's element: bytes when binary, else a str
    if tensor.binary:
        return bytes(data)
    try:  # a JSON string: the file, base64-encoded
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise bad_request("input 'IMAGE' in JSON is the image file base64-encoded; it is not valid base64") from None


def _with_outputs(options: Resolved, names: Collection[str]) -> Resolved:
    """The options computing exactly the mask encodings whose outputs are asked for."""
    wanted = {fmt: FORMAT_OUTPUTS[fmt] in names for fmt in FORMATS}
    return replace(options, rle=wanted["rle"], polygons=wanted["polygons"])


async def answer_call(
    pipeline: Pipeline, slot: Slot[BatchItem, Prediction], parse: Callable[[], InferCall],
    encode: Callable[[InferCall, Segmented], T], on_segmented: Callable[[Segmented], None] | None = None,
) -> T:
    """An admitted infer request's work, whatever the transport: ``parse`` it in a worker thread, segment its
    image in whichever batch it joins (``on_segmented`` hears what that cost: the HTTP door's request log),
    ``encode`` the answer in a worker thread under the trace's encode span."""
    call = await pipeline.in_pool(parse)
    done = await pipeline.segment(slot, call.image, call.options)
    if on_segmented is not None:
        on_segmented(done)
    with pipeline.tracer.start_as_current_span(ENCODE):
        return await pipeline.in_pool(encode, call, done)


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
        names: np.ndarray = np.array(class_names, dtype=object)[pred.labels].reshape(-1)
        return names
    assert done.masks is not None  # the options asked for this encoding (_with_outputs)
    encoded = done.masks.rles if name == "masks" else done.masks.polygons
    assert encoded is not None
    return object_array([json.dumps(item, separators=(",", ":")) for item in encoded])


def output_tensors(call: InferCall, done: Segmented, info: GraphMetadata) -> list[Output]:
    """Worker thread: the outputs the call asked for, in its order, each in binary or not."""
    return [Output(OUTPUTS[name], output_values(name, done, info.class_names), binary)
            for name, binary in call.outputs]


def server_metadata(server_version: str) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=server_version, extensions=EXTENSIONS)


def model_metadata(info: GraphMetadata) -> ModelMetadata:
    return ModelMetadata(name=info.model_name, versions=[info.model_version], platform=PLATFORM,
                         inputs=[s.metadata() for s in INPUTS], outputs=[s.metadata() for s in OUTPUTS.values()])


def model_config(info: GraphMetadata) -> ModelConfig:
    return ModelConfig(name=info.model_name, platform=PLATFORM, backend=BACKEND, max_batch_size=0,
                       input=[s.config() for s in INPUTS], output=[s.config() for s in OUTPUTS.values()])
