"""The protocol's gRPC messages (the stubs ``tritonclient.grpc`` ships, generated from Triton's published
``grpc_service.proto``) to and from service/oip's view of our model, which the REST routes share: an infer
request becomes the same ``InferCall``, checked by the same functions with the same messages; a segmented
image becomes the same output tensors, all of them in ``raw_output_contents`` (as Triton answers; the
client reads either). The metadata and configuration documents are the REST ones: the protocol defines its
JSON as these messages' JSON mapping, so ``ParseDict`` turns one into the other.

An input's data comes either in ``raw_input_contents`` (what tritonclient sends; then for every input, in
order) or in its typed ``contents``.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from google.protobuf.json_format import ParseDict
from tritonclient.grpc import service_pb2 as pb

from contract import GraphMetadata
from service.core.pipeline import Segmented
from service.core.settings import Settings
from service.oip.codec import (
    ParsedRequest,
    RequestedOutput,
    Tensor,
    bad_request,
    check_output_parameters,
    from_binary,
    from_elements,
    input_spec,
    raw_data,
)
from service.oip.model import (
    INPUTS,
    InferCall,
    model_config,
    model_metadata,
    output_tensors,
    server_metadata,
    tensor_call,
)

# The typed contents field that carries each datatype (FP16 and BF16 have none: raw contents only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters(given: Any) -> dict[str, Any]:
    """A map of InferParameter as plain values (bool, int, str or float)."""
    return {name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for name, value in given.items()}


def _tensor(given: Any, raw: bytes | None, seen: Collection[str]) -> Tensor:
    """One InferInputTensor, checked as the REST doors check it, with its data from ``raw`` or its contents."""
    shape = list(given.shape)
    spec = input_spec(INPUTS, seen, given.name, given.datatype, shape, parameters(given.parameters))
    if raw is not None:
        return Tensor(spec.name, spec.datatype, from_binary(spec, shape, raw), binary=True)
    field = CONTENTS.get(spec.datatype)
    if field is None:
        raise bad_request(f"input '{spec.name}' of {spec.datatype} takes its data in raw_input_contents")
    values = list(getattr(given.contents, field))
    return Tensor(spec.name, spec.datatype, from_elements(spec, shape, values), binary=True)


def parse_infer(request: Any, settings: Settings, info: GraphMetadata) -> InferCall:
    """Worker thread: a ModelInferRequest as the image, the options and the outputs it asks for."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                          "give all inputs' data there, or none")
    tensors: dict[str, Tensor] = {}
    for i, given in enumerate(request.inputs):
        tensors[given.name] = _tensor(given, raw[i] if raw else None, tensors)
    outputs = []
    for output in request.outputs:
        wanted = parameters(output.parameters)
        check_output_parameters(output.name, wanted)
        outputs.append(RequestedOutput(name=output.name, parameters=wanted))
    parsed = ParsedRequest(request.id or None, parameters(request.parameters), tensors, outputs or None,
                           binary_output=True)
    return tensor_call(parsed, settings, info)


def encode_infer(call: InferCall, done: Segmented, info: GraphMetadata) -> Any:
    """Worker thread: the ModelInferResponse of a call, every output in raw contents, in the order asked."""
    response = pb.ModelInferResponse(model_name=info.model_name, model_version=info.model_version, id=call.id or "")
    for out in output_tensors(call, done, info):
        response.outputs.add(name=out.spec.name, datatype=out.spec.datatype, shape=list(out.values.shape))
        response.raw_output_contents.append(raw_data(out))
    return response


def server_metadata_message(server_version: str) -> Any:
    return ParseDict(server_metadata(server_version).model_dump(), pb.ServerMetadataResponse())


def model_metadata_message(info: GraphMetadata) -> Any:
    return ParseDict(model_metadata(info).model_dump(), pb.ModelMetadataResponse())


def model_config_message(info: GraphMetadata) -> Any:
    return ParseDict({"config": model_config(info).model_dump(exclude_none=True)}, pb.ModelConfigResponse())
