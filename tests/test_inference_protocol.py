"""The Open Inference Protocol codec on its own (service/oip/codec.py): the binary tensor layout,
requests as tritonclient builds them, responses as tritonclient reads them, and the 400s."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.core import errors
from service.core.errors import BadRequest
from service.oip.codec import (
    Output,
    TensorSpec,
    deserialize_bytes,
    encode_response,
    parse_request,
    serialize_bytes,
)
from service.oip.errors import status_of
from service.web.doors import HttpError

httpclient = pytest.importorskip("tritonclient.http")
triton_utils = pytest.importorskip("tritonclient.utils")

SPECS = (TensorSpec("IMAGE", "BYTES", (1,)), TensorSpec("PIXELS", "UINT8", (-1, -1, 3)),
         TensorSpec("WEIGHTS", "FP32", (2, -1)))


def test_bytes_elements_are_little_endian_length_prefixed() -> None:
    items = [b"ab", b"", b"\xff" * 300]
    layout = serialize_bytes(items)
    assert layout == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x2c\x01\x00\x00" + b"\xff" * 300
    assert layout == triton_utils.serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert deserialize_bytes(layout) == items
    for cut in (1, 3, 7, len(layout) - 1):  # inside a length, inside an element
        with pytest.raises(BadRequest, match="ends inside"):
            deserialize_bytes(layout[:cut])


def _client_request(inputs: list, outputs: list | None = None, **kw: object) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient sends it (its own serializer, no server)."""
    return httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)


def test_requests_as_tritonclient_builds_them_binary_and_json() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    weights = np.array([[0.5, -1.0, 2.0], [3.0, 4.5, 1e-3]], np.float32)
    for binary in (True, False):
        image = httpclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([png if binary else "a string"], dtype=object), binary_data=binary)
        inputs = [image]
        for name, array, datatype in (("PIXELS", pixels, "UINT8"), ("WEIGHTS", weights, "FP32")):
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            inputs.append(tensor.set_data_from_numpy(array, binary_data=binary))
        outputs = [httpclient.InferRequestedOutput("a", binary_data=False), httpclient.InferRequestedOutput("b")]
        body, header = _client_request(inputs, outputs, request_id="r1", parameters={"score_threshold": 0.3})
        assert (header is not None) == binary
        parsed = parse_request(body, header, SPECS)
        assert parsed.id == "r1" and parsed.model_parameters() == {"score_threshold": 0.3}
        image_data = parsed.inputs["IMAGE"]
        assert image_data.binary == binary and image_data.data.tolist() == [png if binary else b"a string"]
        np.testing.assert_array_equal(parsed.inputs["PIXELS"].data, pixels)
        assert parsed.inputs["PIXELS"].data.dtype == np.uint8
        np.testing.assert_array_equal(parsed.inputs["WEIGHTS"].data, weights)
        assert [parsed.output_binary(o) for o in parsed.outputs] == [False, True]
    # No outputs named: tritonclient asks for all of them in binary.
    body, header = _client_request(inputs[:1])
    parsed = parse_request(body, header, SPECS)
    assert parsed.outputs is None and parsed.output_binary(None) and parsed.model_parameters() == {}


def test_responses_as_tritonclient_reads_them() -> None:
    specs = [TensorSpec("boxes", "FP32", (-1, 4)), TensorSpec("labels", "INT64", (-1,)),
             TensorSpec("names", "BYTES", (-1,)), TensorSpec("empty", "FP32", (-1,))]
    boxes = np.array([[1.5, 2.0, 30.25, 40.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    labels = np.array([3, 1], np.int64)
    names = np.array(["circle", '{"json": "ünïcode"}'], dtype=object)
    empty = np.zeros(0, np.float32)
    values = [boxes, labels, names, empty]
    for binary in ([True] * 4, [False] * 4, [True, False, True, False]):
        outputs = [Output(s, v, b) for s, v, b in zip(specs, values, binary, strict=True)]
        body, header = encode_response("m", "2", "id-7", outputs)
        assert (header is not None) == any(binary)
        result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header)
        response = result.get_response()
        assert (response["model_name"], response["model_version"], response["id"]) == ("m", "2", "id-7")
        np.testing.assert_array_equal(result.as_numpy("boxes"), boxes)
        np.testing.assert_array_equal(result.as_numpy("labels"), labels)
        got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("names")]
        assert got == names.tolist()
        assert result.as_numpy("empty").shape == (0,)
    text, header = encode_response("m", "2", None, [Output(specs[1], labels, False)])
    assert header is None and json.loads(text) == {
        "model_name": "m", "model_version": "2",
        "outputs": [{"name": "labels", "datatype": "INT64", "shape": [2], "data": [3, 1]}]}


def _json(inputs: list[dict], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _pixels(data: object, shape: list[int] | None = None, datatype: str = "UINT8") -> dict:
    return {"name": "PIXELS", "datatype": datatype, "shape": shape or [1, 2, 3], "data": data}


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"{not json", None, "invalid inference request"),
        (_json([]), None, "inputs"),
        (_json([{"name": "NOPE", "datatype": "UINT8", "shape": [1], "data": [1]}]), None, "unknown input 'NOPE'"),
        (_json([_pixels([1] * 6, datatype="FP32")]), None, "datatype FP32; expected UINT8"),
        (_json([_pixels([1] * 6, shape=[1, 2, 4])]), None, "expected [-1, -1, 3]"),
        (_json([_pixels([1] * 6, shape=[-1, 2, 3])]), None, "has shape"),
        (_json([_pixels([1] * 5)]), None, "5 elements"),
        (_json([_pixels([1, 2, 3, 4, 5, 256])]), None, "out of the range of UINT8"),
        (_json([_pixels([1, 2, 3, 4, 5, 0.5])]), None, "cannot be UINT8"),
        (_json([_pixels(["1"] * 6)]), None, "cannot be UINT8"),
        (_json([_pixels([[1, 2, 3], [4, 5]])]), None, "not a regular array"),
        (_json([_pixels([1] * 6), _pixels([1] * 6)]), None, "given twice"),
        (_json([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [7]}]), None, "are strings"),
        (_json([{"name": "IMAGE", "datatype": "BYTES", "shape": [1]}]), None, "neither data"),
        (_json([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]),
         "header", "does not fit"),
        (_json([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["x"]}]) + b"extra", "header",
         "no input declares"),
        (_json([_pixels([1] * 6)]), 10**6, "more than the body"),
        (_json([_pixels([1] * 6)], outputs=[{"name": "a", "parameters": {"classification": 3}}]), None,
         "classification is not supported"),
    ],
)
def test_bad_requests_are_400s_naming_the_problem(body: bytes, header: object, message: str) -> None:
    if header == "header":  # the JSON part is everything up to the first extra byte
        header = body.index(b"}]}") + 3
    with pytest.raises(BadRequest) as err:
        parse_request(body, header, SPECS)
    assert message in err.value.message, err.value.message


def test_error_statuses_are_tritons() -> None:
    kinds = (errors.BadRequest, errors.NotFound, errors.TooLarge, errors.UnsupportedMediaType, errors.InvalidOption,
             errors.InternalError, errors.Unavailable, errors.DeadlineExceeded)
    assert [status_of(kind("code", "message")) for kind in kinds] == [400, 404, 400, 400, 400, 500, 503, 503]
    assert status_of(HttpError(405, "method_not_allowed", "no")) == 400
