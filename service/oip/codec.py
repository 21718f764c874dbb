"""The Open Inference Protocol v2 (KServe's predict protocol v2, which Triton, KServe and MLServer speak),
REST, with Triton's binary tensor data extension: a request body into named tensors, named arrays into a
response body, the protocol's documents and its error body. Nothing here knows our model: the tensors it
takes and gives are declared by service/oip/model.py and served by service/oip/routes.py.

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the
raw data of the inputs that give a ``binary_data_size`` parameter, in the order they are listed. A response
is built the same way for the outputs asked in binary (an output's ``binary_data`` parameter, else the
request's ``binary_data_output``). Fixed-size types are little-endian, row-major; a BYTES element is a
4-byte little-endian length followed by its bytes. In JSON, a tensor's ``data`` is its elements, flat or
nested, row-major; a BYTES element is a string.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.errors import BadRequest

# Each datatype's numpy type and its name in Triton's model configuration (model_config.proto).
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "TYPE_BOOL"),
    "UINT8": (np.dtype("<u1"), "TYPE_UINT8"),
    "UINT16": (np.dtype("<u2"), "TYPE_UINT16"),
    "UINT32": (np.dtype("<u4"), "TYPE_UINT32"),
    "UINT64": (np.dtype("<u8"), "TYPE_UINT64"),
    "INT8": (np.dtype("<i1"), "TYPE_INT8"),
    "INT16": (np.dtype("<i2"), "TYPE_INT16"),
    "INT32": (np.dtype("<i4"), "TYPE_INT32"),
    "INT64": (np.dtype("<i8"), "TYPE_INT64"),
    "FP16": (np.dtype("<f2"), "TYPE_FP16"),
    "FP32": (np.dtype("<f4"), "TYPE_FP32"),
    "FP64": (np.dtype("<f8"), "TYPE_FP64"),
    "BYTES": (np.dtype(object), "TYPE_STRING"),
}
# Which JSON numbers each kind of datatype takes (numpy's dtype kinds): no float into an integer tensor.
JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
# Request parameters that Triton's clients set for the server itself (tritonclient.utils), not for a model;
# its schedule-policy ones, ``priority`` and ``timeout``, are the model's options here (service/oip/model.py).
RESERVED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "headers", "binary_data_output")
RESERVED_PREFIX = "triton_"
LENGTH = struct.Struct("<I")


def bad_request(message: str) -> BadRequest:
    return BadRequest("bad_request", message)


# ---- the protocol's documents (pydantic: validation of requests, and the OpenAPI schema) -------------


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = Field(None, description="Elements, flat or nested, row-major; absent when binary")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="Outputs to return (default: all)")


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigTensor(BaseModel):
    name: str
    data_type: str
    dims: list[int]
    optional: bool | None = Field(None, description="An input a request may leave out (absent: false)")


class ModelConfig(BaseModel):
    """Triton's model configuration (its model_configuration extension), the fields a client reads."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ProtocolErrorResponse(BaseModel):
    """The protocol's error body (named apart from /segment's ErrorResponse, whose body differs)."""

    error: str


def request_schema() -> dict[str, Any]:
    """InferenceRequest's JSON schema with its definitions inlined, to stand alone in an OpenAPI body."""
    schema = InferenceRequest.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    inlined: dict[str, Any] = inline(schema)
    return inlined


# ---- tensors -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a model takes or gives: its datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    def metadata(self) -> TensorMetadata:
        return TensorMetadata(name=self.name, datatype=self.datatype, shape=list(self.shape))

    def config(self) -> ConfigTensor:
        return ConfigTensor(name=self.name, data_type=DATATYPES[self.datatype][1], dims=list(self.shape),
                            optional=self.optional or None)

    def check_shape(self, shape: Sequence[int]) -> None:
        fits = len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )
        if not fits or any(d < 0 for d in shape):
            raise bad_request(f"input '{self.name}' has shape {list(shape)}; expected {list(self.shape)} "
                              "(-1: any size)")


@dataclass(frozen=True)
class Tensor:
    """One input of a request: its elements in ``data`` (BYTES: an object array of bytes)."""

    name: str
    datatype: str
    data: np.ndarray
    binary: bool  # sent as binary data rather than in the JSON header


@dataclass(frozen=True)
class ParsedRequest:
    """A parsed infer request: its inputs by name and the outputs asked (None: the model's defaults)."""

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None
    binary_output: bool  # the request's binary_data_output: outputs' default

    def output_binary(self, output: RequestedOutput | None) -> bool:
        """Whether ``output`` (None: one not named in the request) is answered in binary."""
        value = self.binary_output if output is None else output.parameters.get("binary_data", self.binary_output)
        return bool(value)

    def model_parameters(self) -> dict[str, Any]:
        """The parameters meant for the model, without those Triton's clients set for the server."""
        return {k: v for k, v in self.parameters.items()
                if k not in RESERVED_PARAMETERS and not k.startswith(RESERVED_PREFIX)}


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary layout: each a 4-byte little-endian length, then the bytes."""
    return b"".join(part for item in items for part in (LENGTH.pack(len(item)), item))


def deserialize_bytes(buffer: bytes | memoryview) -> list[bytes]:
    """The elements of a BYTES tensor's binary data; a truncated element is a BadRequest."""
    view, items, offset = memoryview(buffer), [], 0
    while offset < len(view):
        if offset + LENGTH.size > len(view):
            raise bad_request("BYTES data ends inside an element's 4-byte length")
        (length,) = LENGTH.unpack_from(view, offset)
        offset += LENGTH.size
        if offset + length > len(view):
            raise bad_request(f"BYTES data ends inside an element of {length} bytes")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def object_array(items: Sequence[object], shape: Sequence[int] | None = None) -> np.ndarray:
    """``items`` as a numpy object array (a BYTES tensor's elements), flat or in ``shape``; numpy would
    make equal-length strings a fixed-width array and equal-length lists a 2-D one."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array if shape is None else array.reshape(shape)


def input_spec(inputs: Sequence[TensorSpec], seen: Collection[str], name: str, datatype: str,
               shape: Sequence[int], parameters: Mapping[str, Any]) -> TensorSpec:
    """The spec of an input a request gives (``seen``: those it gave before), in any transport: a
    BadRequest for an unknown or repeated input, a wrong datatype or shape, or shared memory."""
    specs = {spec.name: spec for spec in inputs}
    spec = specs.get(name)
    if spec is None:
        raise bad_request(f"unknown input '{name}'; the model takes {', '.join(specs)}")
    if name in seen:
        raise bad_request(f"input '{name}' is given twice")
    if datatype != spec.datatype:
        raise bad_request(f"input '{name}' has datatype {datatype}; expected {spec.datatype}")
    spec.check_shape(shape)
    if "shared_memory_region" in parameters:
        raise bad_request("shared memory is not supported: send the data in the request")
    return spec


def check_output_parameters(name: str, parameters: Collection[str]) -> None:
    """A BadRequest for a requested output's parameters this server does not implement, in any transport."""
    unsupported = {"classification", "shared_memory_region"} & set(parameters)
    if unsupported:
        raise bad_request(f"output '{name}': {', '.join(sorted(unsupported))} is not supported")


def from_binary(spec: TensorSpec, shape: Sequence[int], chunk: bytes | memoryview) -> np.ndarray:
    """A tensor's elements from its raw data (REST's binary extension, gRPC's raw contents)."""
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        items = deserialize_bytes(chunk)
        if len(items) != count:
            raise bad_request(f"input '{spec.name}' has {len(items)} BYTES elements for shape {shape}")
        return object_array(items, shape)
    dtype = DATATYPES[spec.datatype][0]
    if len(chunk) != count * dtype.itemsize:
        raise bad_request(f"input '{spec.name}' has {len(chunk)} bytes of data; shape {shape} of "
                          f"{spec.datatype} takes {count * dtype.itemsize}")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def from_elements(spec: TensorSpec, shape: Sequence[int], data: list[Any]) -> np.ndarray:
    """A tensor's elements given one by one (REST's JSON data, gRPC's typed contents), checked against its
    datatype: no float into an integer tensor, no value out of its range; BYTES elements are strings (JSON) or
    bytes (gRPC)."""
    count = math.prod(shape)
    try:
        raw = np.asarray(data, dtype=object if spec.datatype == "BYTES" else None)
    except (ValueError, TypeError, OverflowError):
        raise bad_request(f"input '{spec.name}': data is not a regular array") from None
    if raw.size != count:
        raise bad_request(f"input '{spec.name}' has {raw.size} elements for shape {shape}")
    if spec.datatype == "BYTES":
        if not all(isinstance(v, str | bytes) for v in raw.flat):
            raise bad_request(f"input '{spec.name}': BYTES elements in JSON are strings")
        return object_array([v.encode() if isinstance(v, str) else v for v in raw.flat], shape)
    dtype = DATATYPES[spec.datatype][0]
    if raw.dtype.kind not in JSON_KINDS[dtype.kind]:
        raise bad_request(f"input '{spec.name}': data of kind {raw.dtype} cannot be {spec.datatype}")
    if dtype.kind in "iu" and raw.size and (raw.min() < np.iinfo(dtype).min or raw.max() > np.iinfo(dtype).max):
        raise bad_request(f"input '{spec.name}': values out of the range of {spec.datatype}")
    return raw.astype(dtype).reshape(shape)


def parse_request(body: bytes, header_length: int | None, inputs: Sequence[TensorSpec]) -> ParsedRequest:
    """An infer request body: JSON alone (``header_length`` None) or a JSON header of ``header_length``
    bytes and binary data. Inputs are checked against ``inputs`` (name, datatype, shape); any problem
    is a BadRequest naming it."""
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    if header_length > len(view):
        raise bad_request(f"Inference-Header-Content-Length {header_length} is more than the body's {len(view)} bytes")
    try:
        request = InferenceRequest.model_validate_json(bytes(view[:header_length]))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"invalid inference request: {where + ': ' if where else ''}{first['msg']}") from None
    tensors: dict[str, Tensor] = {}
    offset = header_length
    for given in request.inputs:
        spec = input_spec(inputs, tensors, given.name, given.datatype, given.shape, given.parameters)
        size = given.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(view):
                raise bad_request(f"input '{given.name}': binary_data_size {size!r} does not fit the body")
            data = from_binary(spec, given.shape, view[offset : offset + size])
            offset += size
        elif given.data is not None:
            data = from_elements(spec, given.shape, given.data)
        else:
            raise bad_request(f"input '{given.name}' has neither data nor binary_data_size")
        tensors[given.name] = Tensor(given.name, given.datatype, data, binary=size is not None)
    if offset != len(view):
        raise bad_request(f"the body has {len(view) - offset} bytes of binary data that no input declares")
    for output in request.outputs or []:
        check_output_parameters(output.name, output.parameters)
    return ParsedRequest(request.id, request.parameters, tensors, request.outputs,
                   binary_output=bool(request.parameters.get("binary_data_output", False)))


@dataclass(frozen=True)
class Output:
    """One output to answer: its values (BYTES: str or bytes elements) and whether in binary."""

    spec: TensorSpec
    values: np.ndarray
    binary: bool


def encode_response(model_name: str, model_version: str, request_id: str | None,
                    outputs: Sequence[Output]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it (None: JSON only)."""
    described, blobs = [], []
    for out in outputs:
        tensor: dict[str, Any] = {"name": out.spec.name, "datatype": out.spec.datatype,
                                  "shape": list(out.values.shape)}
        if out.binary:
            blob = raw_data(out)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif out.spec.datatype == "BYTES":
            tensor["data"] = [v.decode() if isinstance(v, bytes) else v for v in out.values.flat]
        else:
            tensor["data"] = out.values.astype(DATATYPES[out.spec.datatype][0], copy=False).ravel().tolist()
        described.append(tensor)
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = described
    text = json.dumps(header, separators=(",", ":")).encode()
    return (text, None) if not blobs else (b"".join([text, *blobs]), len(text))


def raw_data(out: Output) -> bytes:
    """An output's raw data, as REST's binary extension and gRPC's raw contents carry it."""
    if out.spec.datatype == "BYTES":
        return serialize_bytes(v.encode() if isinstance(v, str) else v for v in out.values.flat)
    return np.ascontiguousarray(out.values, dtype=DATATYPES[out.spec.datatype][0]).tobytes()

