"""The Open Inference Protocol v2 front door (service/oip/) with the real client, tritonclient's
HTTP client, against the real server on loopback (tests/conftest.py's ``server``, the tiny model): health,
metadata and configuration, infer in binary and in JSON, IMAGE and PIXELS, chosen outputs and parameters,
concurrent requests batched, the same answers as /segment, errors in the client's own exception, and the
snippet of service/README.md run as it is written there."""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.core.runtime import OnnxModel
from tests.helpers import (
    MAX_UPLOAD,
    TIMEOUT,
    ServerThread,
    assert_outputs_are_segment,
    encode,
    metric_values,
    sample,
    scene,
    segment_json,
)

httpclient = pytest.importorskip("tritonclient.http")
httpx = pytest.importorskip("httpx")

README = Path(__file__).resolve().parents[1] / "service" / "README.md"
SCORE_TOL = 1e-7  # v2 scores against /segment's
DEFAULT_OUTPUTS = ["boxes", "scores", "labels", "class_names", "masks"]


@pytest.fixture(scope="module")
def triton(server: ServerThread) -> Iterator[Any]:
    """tritonclient's HTTP client for the test server, with connections for 16 requests at once."""
    with httpclient.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16,
                                          connection_timeout=TIMEOUT, network_timeout=TIMEOUT) as client:
        yield client


def image_input(data: bytes, binary: bool = True) -> Any:
    """IMAGE: the file in binary (tritonclient's default), or base64-encoded in the JSON."""
    tensor = httpclient.InferInput("IMAGE", [1], "BYTES")
    value = data if binary else base64.b64encode(data)
    return tensor.set_data_from_numpy(np.array([value], dtype=object), binary_data=binary)


def pixels_input(rgb: np.ndarray, binary: bool = True) -> Any:
    return httpclient.InferInput("PIXELS", list(rgb.shape), "UINT8").set_data_from_numpy(rgb, binary_data=binary)


def outputs_of(result: Any) -> dict[str, np.ndarray]:
    """A result's outputs by name; BYTES elements as str (the client gives bytes from binary data and str
    from JSON)."""
    out = {}
    for o in result.get_response()["outputs"]:
        values = result.as_numpy(o["name"])
        if o["datatype"] == "BYTES":
            values = np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
        out[o["name"]] = values
    return out


# ---- health, metadata, configuration ---------------------------------------------------------------


def test_health_metadata_and_config(triton: Any, name: str, model: OnnxModel) -> None:
    info = model.metadata
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(name) and triton.is_model_ready(name, info.model_version)
    assert not triton.is_model_ready("no-such-model") and not triton.is_model_ready(name, "no-such-version")
    server = triton.get_server_metadata()
    assert {"binary_tensor_data", "model_configuration"} <= set(server["extensions"])
    for metadata in (triton.get_model_metadata(name), triton.get_model_metadata(name, info.model_version)):
        assert metadata["name"] == name and metadata["versions"] == [info.model_version]
        inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
        assert inputs == {"IMAGE": ("BYTES", [1]), "PIXELS": ("UINT8", [-1, -1, 3])}
        outputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["outputs"]}
        assert outputs == {"boxes": ("FP32", [-1, 4]), "scores": ("FP32", [-1]), "labels": ("INT64", [-1]),
                           "class_names": ("BYTES", [-1]), "masks": ("BYTES", [-1]), "polygons": ("BYTES", [-1])}
    config = triton.get_model_config(name)
    assert config == triton.get_model_config(name, info.model_version)
    assert config["name"] == name and config["max_batch_size"] == 0 and config["platform"]
    assert [(t["name"], t["data_type"], t["dims"], t.get("optional")) for t in config["input"]] == [
        ("IMAGE", "TYPE_STRING", [1], True), ("PIXELS", "TYPE_UINT8", [-1, -1, 3], True)]
    assert {t["name"]: t["data_type"] for t in config["output"]} == {
        "boxes": "TYPE_FP32", "scores": "TYPE_FP32", "labels": "TYPE_INT64", "class_names": "TYPE_STRING",
        "masks": "TYPE_STRING", "polygons": "TYPE_STRING"}


# ---- infer -----------------------------------------------------------------------------------------


def test_infer_answers_as_segment_in_binary_json_image_and_pixels(triton: Any, client: Any, name: str) -> None:
    rgb = scene(40).image
    png = encode(rgb)
    expected = segment_json(client, png, formats="rle")
    assert expected["detections"], "the tiny model gave no detection at the test threshold"
    binary = triton.infer(name, [image_input(png)])  # no outputs named: all defaults, in binary
    assert [o["name"] for o in binary.get_response()["outputs"]] == DEFAULT_OUTPUTS
    assert all("binary_data_size" in o["parameters"] for o in binary.get_response()["outputs"])
    assert_outputs_are_segment(outputs_of(binary), expected, SCORE_TOL)
    in_json = [httpclient.InferRequestedOutput(n, binary_data=False) for n in DEFAULT_OUTPUTS]
    for inputs in ([image_input(png, binary=False)], [pixels_input(rgb)], [pixels_input(rgb, binary=False)]):
        result = triton.infer(name, inputs, outputs=in_json)
        assert all("data" in o for o in result.get_response()["outputs"])
        assert_outputs_are_segment(outputs_of(result), expected, SCORE_TOL)
    for masks in outputs_of(binary)["masks"]:  # the RLEs are pycocotools' own
        assert mask_utils.decode(json.loads(masks)).shape == rgb.shape[:2]


def test_chosen_outputs_and_parameters(triton: Any, client: Any, name: str, model: OnnxModel) -> None:
    png = encode(scene(41).image)
    classes = model.class_names[1:3]
    expected = segment_json(client, png, score_threshold="0.1", max_detections="4", classes=",".join(classes))
    wanted = [httpclient.InferRequestedOutput("scores"), httpclient.InferRequestedOutput("polygons", False),
              httpclient.InferRequestedOutput("boxes")]
    parameters = {"score_threshold": 0.1, "max_detections": 4, "classes": ",".join(classes)}
    result = triton.infer(name, [image_input(png)], outputs=wanted, parameters=parameters)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["scores", "polygons", "boxes"]
    assert 0 < len(expected["detections"]) <= 4
    assert_outputs_are_segment(outputs_of(result), expected, SCORE_TOL)
    as_list = triton.infer(name, [image_input(png)], outputs=wanted, parameters={**parameters, "classes": classes})
    assert outputs_of(as_list)["scores"].tolist() == outputs_of(result)["scores"].tolist()


def test_raw_binary_gzip_and_deflate_requests(triton: Any, client: Any, name: str) -> None:
    png = encode(scene(42).image)
    expected = segment_json(client, png, formats="rle")
    raw = client.post(f"/v2/models/{name}/infer", content=png, headers={"Inference-Header-Content-Length": "0"})
    assert raw.status_code == 200, raw.text
    header = int(raw.headers["inference-header-content-length"])
    result = httpclient.InferenceServerClient.parse_response_body(raw.content, header_length=header)
    assert [o["name"] for o in result.get_response()["outputs"]] == DEFAULT_OUTPUTS
    assert_outputs_are_segment(outputs_of(result), expected, SCORE_TOL)
    for algorithm in ("gzip", "deflate"):
        compressed = triton.infer(name, [image_input(png)], request_compression_algorithm=algorithm)
        assert_outputs_are_segment(outputs_of(compressed), expected, SCORE_TOL)


def test_concurrent_async_infer_is_batched(server: ServerThread, triton: Any, client: Any, name: str) -> None:
    images = [scene(200 + i, (100 + 6 * i, 150)).image for i in range(16)]
    before = metric_values(client.get("/metrics").text)
    outputs = [httpclient.InferRequestedOutput("scores"), httpclient.InferRequestedOutput("masks")]
    pending = [triton.async_infer(name, [image_input(encode(im))], outputs=outputs) for im in images]
    results = [p.get_result(timeout=TIMEOUT) for p in pending]
    after = metric_values(client.get("/metrics").text)

    def delta(metric: str, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    assert delta("mrcnn_batch_size_sum") == 16
    assert delta("mrcnn_batch_size_count") < 16, "no two v2 requests shared a model call"
    assert delta("mrcnn_requests_total", route="v2", status="200") == 16
    assert delta("mrcnn_request_duration_seconds_count", route="v2", status="200") == 16
    assert delta("mrcnn_requests_total", route="segment", status="200") == 0
    for image, result in zip(images, results, strict=True):  # each answer is its own image's
        masks = outputs_of(result)["masks"]
        assert len(masks) and all(json.loads(m)["size"] == list(image.shape[:2]) for m in masks)


# ---- errors ----------------------------------------------------------------------------------------


def test_errors_are_the_clients_own_exception_with_our_message(triton: Any, name: str, model: OnnxModel) -> None:
    png = encode(scene(43).image)
    cases = [
        (("no-such-model", [image_input(png)]), {}, "404", "unknown model 'no-such-model'"),
        ((name, [image_input(png)]), {"model_version": "99"}, "404", "unknown version '99'"),
        ((name, [httpclient.InferInput("PIXELS", [2, 2, 3], "FP32").set_data_from_numpy(
            np.zeros((2, 2, 3), np.float32))]), {}, "400", "input 'PIXELS' has datatype FP32; expected UINT8"),
        ((name, [image_input(b"not an image")]), {}, "400", "the data is not a decodable image"),
        ((name, [image_input(png), pixels_input(np.zeros((2, 2, 3), np.uint8))]), {}, "400", "exactly one"),
        ((name, [image_input(png)]), {"parameters": {"score_treshold": 0.5}}, "400", "unknown parameters"),
        ((name, [image_input(png)]), {"parameters": {"classes": "dog"}}, "400", "classes: unknown ['dog']"),
        ((name, [image_input(png)]), {"outputs": [httpclient.InferRequestedOutput("heatmap")]}, "400",
         "unknown outputs ['heatmap']"),
        ((name, [pixels_input(np.zeros((1000, 1000, 3), np.uint8))]), {}, "400", f"more than {MAX_UPLOAD}"),
    ]
    for args, kwargs, status, message in cases:
        with pytest.raises(httpclient.InferenceServerException) as err:
            triton.infer(*args, **kwargs)
        assert err.value.status() == status and message in err.value.message(), (message, str(err.value))
    assert triton.is_server_ready()


def test_errors_over_plain_http_are_json_with_tritons_codes(
    server: ServerThread, client: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    infer = f"/v2/models/{name}/infer"
    bad = [
        client.post(infer, content=b"\0" * (MAX_UPLOAD + 1)),  # over the byte limit: 413 inside, 400 here
        client.post(infer, content=gzip.compress(b"{" * 10), headers={"content-encoding": "gzip"}),
        client.post(infer, content=b"{}", headers={"content-encoding": "br"}),
        client.post(infer, content=b"{}", headers={"inference-header-content-length": "many"}),
        client.get(f"/v2/models/{name}/nothing-here"),
        client.get("/v2/models/no-such-model/config"),
    ]
    assert [r.status_code for r in bad] == [400, 400, 400, 400, 404, 404]
    assert all(set(r.json()) == {"error"} and r.json()["error"] for r in bad)
    monkeypatch.setattr(server.pipeline.batcher, "capacity", 0)  # full: refused at once
    before = metric_values(client.get("/metrics").text)
    busy = client.post(infer, json={"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                                "data": [base64.b64encode(encode(scene(44).image)).decode()]}]})
    assert busy.status_code == 503 and busy.headers["retry-after"] and "capacity 0" in busy.json()["error"]
    after = metric_values(client.get("/metrics").text)
    assert sample(after, "mrcnn_requests_total", route="v2", status="503") - sample(
        before, "mrcnn_requests_total", route="v2", status="503") == 1


def test_openapi_lists_the_v2_routes(client: Any) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for tail in ("", "/ready", "/config", "/infer"):
        assert "/v2/models/{name}" + tail in paths and "/v2/models/{name}/versions/{version}" + tail in paths
    assert {"/v2", "/v2/health/live", "/v2/health/ready"} <= set(paths)
    body = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["inputs"]["items"]["properties"]["datatype"]
    assert "application/json" in paths["/segment"]["post"]["requestBody"]["content"]


# ---- the documentation ------------------------------------------------------------------------------


def test_the_readme_snippet_runs(server: ServerThread, name: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """service/README.md's tritonclient snippet, run as written but for the server's address, the model's
    name and the photo (written where the snippet reads it)."""
    section = README.read_text().split("## Open Inference Protocol v2", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"localhost:8000"') == 1 and snippet.count('"shapes-demo"') == 1
    code = snippet.replace('"localhost:8000"', repr(server.url.removeprefix("http://")))
    code = code.replace('"shapes-demo"', repr(name))
    (tmp_path / "photo.jpg").write_bytes(encode(scene(45).image, "JPEG", quality=95))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines and all(re.fullmatch(r"\S+ \d\.\d\d box \[.*\] \d+ pixels", line) for line in lines), lines
