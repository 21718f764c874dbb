"""The Open Inference Protocol over gRPC (service/grpc/) with the real client, tritonclient's gRPC client, against
the real server on loopback (tests/conftest.py's ``server``: the tiny model, its gRPC door on a free port):
health, metadata and configuration; infer with IMAGE and with PIXELS, chosen outputs and parameters, the same
answers as /segment; the bidirectional stream; concurrent requests batched, counted under ``route="grpc"``;
errors as the client's exception with the status code and REST's message; the standard health service and
reflection; API keys in the metadata (UNAUTHENTICATED with HTTP's 401 message; health and reflection open) and
TLS with the HTTP side's certificate, in servers of their own; and, in a server of its own (``python -m
service``), SIGTERM with RPCs in flight: NOT_SERVING, all answered, exit 0."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.core.runtime import OnnxModel
from tests.helpers import (
    MAX_PIXELS,
    MAX_UPLOAD,
    TIMEOUT,
    ServerThread,
    assert_outputs_are_segment,
    encode,
    free_port,
    metric_values,
    sample,
    scene,
    segment_json,
)

grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpx = pytest.importorskip("httpx")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402  (after grpc's importorskip)
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "inference.GRPCInferenceService"
SCORE_TOL = 1e-5  # gRPC scores against /segment's
DEFAULT_OUTPUTS = ["boxes", "scores", "labels", "class_names", "masks"]


@pytest.fixture(scope="module")
def triton(server: ServerThread) -> Iterator[Any]:
    with grpcclient.InferenceServerClient(server.grpc_target) as client:
        yield client


def image_input(data: bytes) -> Any:
    return grpcclient.InferInput("IMAGE", [1], "BYTES").set_data_from_numpy(np.array([data], dtype=object))


def pixels_input(rgb: np.ndarray) -> Any:
    return grpcclient.InferInput("PIXELS", list(rgb.shape), "UINT8").set_data_from_numpy(rgb)


def outputs_of(result: Any) -> dict[str, np.ndarray]:
    """A result's outputs by name, in the response's order; BYTES elements as str."""
    out = {}
    for o in result.get_response().outputs:
        values = result.as_numpy(o.name)
        if o.datatype == "BYTES":
            values = np.array([v.decode() for v in values], dtype=object)
        out[o.name] = values
    return out


# ---- health, metadata, configuration ---------------------------------------------------------------


def test_live_ready_metadata_and_config(triton: Any, client: Any, name: str, model: OnnxModel) -> None:
    version = model.metadata.model_version
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(name) and triton.is_model_ready(name, version)
    assert not triton.is_model_ready("no-such-model") and not triton.is_model_ready(name, "no-such-version")
    # The documents are REST's, in the protocol's JSON mapping of the gRPC messages.
    assert triton.get_server_metadata(as_json=True) == client.get("/v2").json()
    metadata = triton.get_model_metadata(name, as_json=True)
    assert metadata == triton.get_model_metadata(name, version, as_json=True)
    rest = client.get(f"/v2/models/{name}").json()
    for tensors in ("inputs", "outputs"):  # protobuf's JSON writes int64 as strings
        for t in metadata[tensors]:
            t["shape"] = [int(d) for d in t["shape"]]
    assert metadata == rest
    config = triton.get_model_config(name, as_json=True)["config"]
    config.setdefault("max_batch_size", 0)  # protobuf's JSON leaves out a field at its default
    for tensors in ("input", "output"):
        for t in config[tensors]:
            t["dims"] = [int(d) for d in t["dims"]]
    assert config == client.get(f"/v2/models/{name}/config").json()
    assert [(t["name"], t["data_type"], t["dims"], t.get("optional")) for t in config["input"]] == [
        ("IMAGE", "TYPE_STRING", [1], True), ("PIXELS", "TYPE_UINT8", [-1, -1, 3], True)]


def test_health_service_and_reflection(server: ServerThread) -> None:
    """grpc.health.v1 answers SERVING for the server and the service; reflection lists the services (what
    grpcurl and grpc_health_probe use)."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
        services = {s.name for s in answers[0].list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        answers = list(reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=10))
        assert answers[0].file_descriptor_response.file_descriptor_proto


# ---- infer -----------------------------------------------------------------------------------------


def test_infer_image_and_pixels_answer_as_segment(triton: Any, client: Any, name: str) -> None:
    rgb = scene(50).image
    png = encode(rgb)
    expected = segment_json(client, png, formats="rle")
    assert expected["detections"], "the tiny model gave no detection at the test threshold"
    for inputs in ([image_input(png)], [pixels_input(rgb)]):
        result = triton.infer(name, inputs)  # no outputs named: the defaults, all in raw contents
        assert [o.name for o in result.get_response().outputs] == DEFAULT_OUTPUTS
        assert len(result.get_response().raw_output_contents) == len(DEFAULT_OUTPUTS)
        assert_outputs_are_segment(outputs_of(result), expected, SCORE_TOL)
    for masks in outputs_of(result)["masks"]:  # the RLEs are pycocotools' own
        assert mask_utils.decode(json.loads(masks)).shape == rgb.shape[:2]


def test_typed_contents_are_read_as_raw_contents(server: ServerThread, triton: Any, name: str) -> None:
    """A client that sends the image in the typed ``bytes_contents`` rather than raw gets the same answer."""
    png = encode(scene(51).image)
    request = service_pb2.ModelInferRequest(model_name=name, id="typed")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
    request.outputs.add(name="scores")
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["scores"]
    raw = triton.infer(name, [image_input(png)], outputs=[grpcclient.InferRequestedOutput("scores")])
    assert response.raw_output_contents[0] == raw.get_response().raw_output_contents[0]


def test_chosen_outputs_and_parameters(triton: Any, client: Any, name: str, model: OnnxModel) -> None:
    png = encode(scene(52).image)
    classes = model.class_names[1:3]
    expected = segment_json(client, png, score_threshold="0.1", max_detections="4", classes=",".join(classes))
    assert 0 < len(expected["detections"]) <= 4
    wanted = [grpcclient.InferRequestedOutput(n) for n in ("scores", "polygons", "boxes")]
    parameters = {"score_threshold": 0.1, "max_detections": 4, "classes": ",".join(classes)}
    result = triton.infer(name, [image_input(png)], outputs=wanted, parameters=parameters, request_id="r1")
    assert result.get_response().id == "r1"
    assert [o.name for o in result.get_response().outputs] == ["scores", "polygons", "boxes"]
    assert_outputs_are_segment(outputs_of(result), expected, SCORE_TOL)


def test_concurrent_async_infer_is_batched(triton: Any, client: Any, name: str) -> None:
    images = [scene(300 + i, (100 + 6 * i, 150)).image for i in range(16)]
    before = metric_values(client.get("/metrics").text)
    outputs = [grpcclient.InferRequestedOutput("scores"), grpcclient.InferRequestedOutput("masks")]
    done: dict[int, Any] = {}
    finished = threading.Semaphore(0)

    def callback(i: int, result: Any, error: Any) -> None:
        done[i] = error or result
        finished.release()

    for i, image in enumerate(images):
        triton.async_infer(name, [image_input(encode(image))], partial(callback, i), outputs=outputs)
    for _ in images:
        assert finished.acquire(timeout=TIMEOUT)
    after = metric_values(client.get("/metrics").text)

    def delta(metric: str, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    assert delta("mrcnn_batch_size_sum") == 16
    assert delta("mrcnn_batch_size_count") < 16, "no two gRPC requests shared a model call"
    assert delta("mrcnn_requests_total", route="grpc", status="OK") == 16
    assert delta("mrcnn_request_duration_seconds_count", route="grpc", status="OK") == 16
    assert delta("mrcnn_requests_total", route="v2", status="200") == 0
    for i, image in enumerate(images):  # each answer is its own image's
        assert not isinstance(done[i], Exception), done[i]
        masks = outputs_of(done[i])["masks"]
        assert len(masks) and all(json.loads(m)["size"] == list(image.shape[:2]) for m in masks)


def test_stream_infer_answers_each_request_and_survives_an_error(triton: Any, name: str) -> None:
    """ModelStreamInfer (tritonclient's stream): each request answered by its id as ModelInfer answers it; a
    bad request's error comes back on the stream, which goes on."""
    pngs = {f"s{i}": encode(scene(60 + i).image) for i in range(4)}
    scores = [grpcclient.InferRequestedOutput("scores")]
    expected = {rid: triton.infer(name, [image_input(png)], outputs=scores).as_numpy("scores")
                for rid, png in pngs.items()}
    answers: list[tuple[Any, Any]] = []
    finished = threading.Semaphore(0)

    def callback(result: Any, error: Any) -> None:
        answers.append((result, error))
        finished.release()

    triton.start_stream(callback)
    try:
        for rid, png in pngs.items():
            triton.async_stream_infer(name, [image_input(png)], outputs=scores, request_id=rid)
        triton.async_stream_infer(name, [image_input(b"not an image")], outputs=scores, request_id="bad")
        for _ in range(len(pngs) + 1):
            assert finished.acquire(timeout=TIMEOUT)
    finally:
        triton.stop_stream()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "the data is not a decodable image" in errors[0].message()
    results = {result.get_response().id: result.as_numpy("scores") for result, error in answers if error is None}
    assert results.keys() == expected.keys()
    for rid, values in results.items():
        np.testing.assert_array_equal(values, expected[rid])


# ---- errors ----------------------------------------------------------------------------------------


def rest_error(client: Any, name: str, png: bytes, **parameters: Any) -> str:
    """The message REST's infer answers for the same request."""
    body = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}],
            "parameters": parameters}
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_errors_are_the_clients_exception_with_the_code_and_rests_message(
    triton: Any, client: Any, name: str
) -> None:
    png = encode(scene(53).image)
    huge = encode(np.zeros((2100, 2000, 3), np.uint8))  # a small file of more pixels than the limit
    assert len(huge) < MAX_UPLOAD and MAX_PIXELS < 2100 * 2000
    cases = [
        (("no-such-model", [image_input(png)]), {}, "NOT_FOUND", "unknown model 'no-such-model'"),
        ((name, [image_input(png)]), {"model_version": "99"}, "NOT_FOUND", "unknown version '99'"),
        ((name, [grpcclient.InferInput("PIXELS", [2, 2, 3], "FP32").set_data_from_numpy(
            np.zeros((2, 2, 3), np.float32))]), {}, "INVALID_ARGUMENT",
         "input 'PIXELS' has datatype FP32; expected UINT8"),
        ((name, [image_input(b"not an image")]), {}, "INVALID_ARGUMENT", "the data is not a decodable image"),
        ((name, [image_input(png), pixels_input(np.zeros((2, 2, 3), np.uint8))]), {}, "INVALID_ARGUMENT",
         "give exactly one of the inputs IMAGE and PIXELS"),
        ((name, [image_input(png)]), {"parameters": {"classes": "dog"}}, "INVALID_ARGUMENT",
         "classes: unknown ['dog']"),
        ((name, [image_input(png)]), {"outputs": [grpcclient.InferRequestedOutput("heatmap")]}, "INVALID_ARGUMENT",
         "unknown outputs ['heatmap']"),
        ((name, [image_input(huge)]), {}, "RESOURCE_EXHAUSTED", f"more than the limit of {MAX_PIXELS}"),
        # Over the message size limit (the upload limit): refused by gRPC itself, before our code runs.
        ((name, [pixels_input(np.zeros((1000, 1000, 3), np.uint8))]), {}, "RESOURCE_EXHAUSTED",
         f"vs. {MAX_UPLOAD}"),
    ]
    for args, kwargs, code, message in cases:
        with pytest.raises(grpcclient.InferenceServerException) as err:
            triton.infer(*args, **kwargs)
        assert err.value.status() == f"StatusCode.{code}" and message in err.value.message(), (message, str(err.value))
    # The very messages of the REST door, for the same request.
    with pytest.raises(grpcclient.InferenceServerException) as err:
        triton.infer(name, [image_input(b"not an image")])
    assert err.value.message() == rest_error(client, name, b"not an image")
    with pytest.raises(grpcclient.InferenceServerException) as err:
        triton.infer(name, [image_input(png)], parameters={"classes": "dog"})
    assert err.value.message() == rest_error(client, name, png, classes="dog")
    assert triton.is_server_ready()


def test_overloaded_is_unavailable_with_a_retry_pushback(
    server: ServerThread, client: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.pipeline.batcher, "capacity", 0)  # full: refused at once
    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        encode(scene(54).image))
    before = metric_values(client.get("/metrics").text)
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as err:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "capacity 0" in err.value.details()
    assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    after = metric_values(client.get("/metrics").text)
    assert sample(after, "mrcnn_requests_total", route="grpc", status="UNAVAILABLE") - sample(
        before, "mrcnn_requests_total", route="grpc", status="UNAVAILABLE") == 1


def test_past_the_deadline_is_deadline_exceeded(
    server: ServerThread, triton: Any, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.pipeline.settings, "request_timeout_s", 1e-6)
    with pytest.raises(grpcclient.InferenceServerException) as err:
        triton.infer(name, [image_input(encode(scene(56).image))])
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED", str(err.value)
    assert "not answered within the 1e-06 s deadline" in err.value.message()


# ---- API keys and TLS (the HTTP side's keys, in the call's metadata, and its certificate) --------------------

KEY, OTHER_KEY = "grpc-key-0123456789", "grpc-other-key-abcdef"
KEYS_GIVEN = {
    "none": {},
    "wrong bearer": {"authorization": "Bearer not-a-key"},
    "wrong header": {"x-api-key": "not-a-key"},
    "another scheme": {"authorization": f"Basic {KEY}"},
    "bearer": {"authorization": f"Bearer {KEY}"},
    "header": {"x-api-key": OTHER_KEY},
    "wrong bearer, right header": {"authorization": "Bearer not-a-key", "x-api-key": KEY},  # the bearer wins
}
REFUSED = {"none": "missing", "wrong bearer": "invalid", "wrong header": "invalid", "another scheme": "missing",
           "wrong bearer, right header": "invalid"}


@contextlib.contextmanager
def grpc_server(tiny_onnx_model: Path, **settings: Any) -> Iterator[ServerThread]:
    """The app with ``settings`` on loopback (HTTPS when they name a certificate), its gRPC door at
    ``grpc_target``."""
    from service.app import create_app
    from service.core.settings import Settings

    settings = Settings(model_path=tiny_onnx_model, request_timeout_s=TIMEOUT, grpc_port=free_port(), **settings)
    tls = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile} if settings.ssl_certfile else {}
    with ServerThread(create_app(settings), **tls) as srv:
        srv.grpc_target = f"127.0.0.1:{settings.grpc_port}"
        yield srv


@pytest.fixture(scope="module")
def keyed(tiny_onnx_model: Path) -> Iterator[ServerThread]:
    """A server with two API keys."""
    with grpc_server(tiny_onnx_model, api_keys=f"{KEY},{OTHER_KEY}") as srv:
        yield srv


@pytest.mark.parametrize("given", KEYS_GIVEN)
def test_the_service_needs_a_key_in_the_metadata(
    keyed: ServerThread, name: str, given: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every RPC of the service (infer, the stream, metadata, even the health RPCs of the protocol) needs one of
    the keys, as ``authorization: Bearer`` or ``x-api-key``; without it, UNAUTHENTICATED with HTTP's message.
    No key reaches the log."""
    from service.core.api_keys import INVALID_KEY_MESSAGE, MISSING_KEY_MESSAGE

    caplog.set_level(logging.DEBUG)
    headers = KEYS_GIVEN[given]
    png = encode(scene(57).image)
    with grpcclient.InferenceServerClient(keyed.grpc_target) as triton:
        calls = {
            "infer": lambda: triton.infer(name, [image_input(png)], headers=headers).as_numpy("scores"),
            "model metadata": lambda: triton.get_model_metadata(name, headers=headers, as_json=True)["name"],
            "model config": lambda: triton.get_model_config(name, headers=headers),
            "server metadata": lambda: triton.get_server_metadata(headers=headers),
            "server ready": lambda: triton.is_server_ready(headers=headers),
        }
        for call, run in calls.items():
            if given in REFUSED:
                with pytest.raises(grpcclient.InferenceServerException) as refused:
                    run()
                assert refused.value.status() == "StatusCode.UNAUTHENTICATED", (call, str(refused.value))
                expected = MISSING_KEY_MESSAGE if REFUSED[given] == "missing" else INVALID_KEY_MESSAGE
                assert refused.value.message() == expected, call
            else:
                assert run() is not None, call
        if given not in REFUSED:
            assert calls["model metadata"]() == name
        # The stream: refused as a whole (the client's callback gets the error), or answered.
        answers: list[tuple[Any, Any]] = []
        finished = threading.Semaphore(0)

        def callback(result: Any, error: Any) -> None:
            answers.append((result, error))
            finished.release()

        triton.start_stream(callback, headers=headers)
        try:
            try:
                triton.async_stream_infer(name, [image_input(png)], request_id="s")
            except grpcclient.InferenceServerException:  # the refusal came first: the stream is over
                assert given in REFUSED
            assert finished.acquire(timeout=TIMEOUT)
        finally:
            triton.stop_stream()
        result, error = answers[0]
        if given in REFUSED:
            assert error is not None and error.status() == "StatusCode.UNAUTHENTICATED", error
        else:
            assert error is None and result.get_response().id == "s"
    for secret in (KEY, OTHER_KEY, "not-a-key"):  # no key reaches the log
        assert secret not in caplog.text


def test_the_messages_are_the_http_401s(keyed: ServerThread) -> None:
    """The gRPC refusals say what the HTTP doors' 401s say (one text, service/core/api_keys.py)."""
    with grpcclient.InferenceServerClient(keyed.grpc_target) as t:
        for headers in ({}, {"x-api-key": "not-a-key"}):
            rest = httpx.get(f"{keyed.url}/v1/model", headers=headers, timeout=TIMEOUT, trust_env=False)
            assert rest.status_code == 401
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                t.get_server_metadata(headers=headers)
            assert refused.value.message() == rest.json()["error"]["message"]


def test_health_and_reflection_stay_open(keyed: ServerThread) -> None:
    """The probe (grpc.health.v1) and reflection answer without a key."""
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                            timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answers = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert SERVICE in {s.name for s in answers[0].list_services_response.service}


def test_tls_with_the_http_certificate(tiny_onnx_model: Path, name: str, tmp_path: Path) -> None:
    """With ``ssl_certfile``/``ssl_keyfile`` the gRPC port serves TLS with the same certificate: tritonclient
    with ``ssl=True`` and the CA works (and still needs the key), a plain client does not get through."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    with grpc_server(tiny_onnx_model, api_keys=KEY, ssl_certfile=chain, ssl_keyfile=key) as srv:
        assert srv.url.startswith("https://")
        target = srv.grpc_target
        with grpcclient.InferenceServerClient(target, ssl=True, root_certificates=str(ca_pem)) as triton:
            assert triton.is_server_live(headers={"x-api-key": KEY})
            result = triton.infer(name, [image_input(encode(scene(58).image))],
                                  headers={"authorization": f"Bearer {KEY}"})
            assert result.as_numpy("scores") is not None
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                triton.infer(name, [image_input(encode(scene(58).image))])
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem.read_bytes())) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # the probe: TLS, no key
        with grpcclient.InferenceServerClient(target) as plain, pytest.raises(grpcclient.InferenceServerException):
            plain.is_server_live(headers={"x-api-key": KEY}, client_timeout=10)
        with grpcclient.InferenceServerClient(target, ssl=True) as untrusting, \
                pytest.raises(grpcclient.InferenceServerException):  # the system's CAs do not know this one
            untrusting.is_server_live(headers={"x-api-key": KEY}, client_timeout=10)


# ---- SIGTERM -----------------------------------------------------------------------------------------


def health_status(channel: Any) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@pytest.mark.slow
def test_sigterm_drains_rpcs_in_flight(tiny_onnx_model: Path, model: OnnxModel, tmp_path: Path) -> None:
    """``python -m service``: SERVING; SIGTERM with RPCs in flight: NOT_SERVING at once while the grace period
    lasts, then no new RPC is taken, every RPC in flight is answered, and the process exits 0."""
    from tests.deployment import clean_env, wait_http

    port, grpc_port = free_port(), free_port()
    log = tmp_path / "server.log"
    env = clean_env() | {"MRCNN_GRPC_PORT": str(grpc_port), "MRCNN_DRAIN_GRACE_S": "1", "MRCNN_MAX_BATCH_SIZE": "2",
                         "MRCNN_SCORE_THRESHOLD": "0.05", "MRCNN_WORKER_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(tiny_onnx_model), "--port",
                                 str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, 120, log)
        target = f"127.0.0.1:{grpc_port}"
        with grpc.insecure_channel(target) as channel, grpcclient.InferenceServerClient(target) as triton:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            name = model.metadata.model_name
            answers: list[tuple[float, Any]] = []
            finished = threading.Semaphore(0)

            def callback(result: Any, error: Any) -> None:
                answers.append((time.monotonic(), error or result))
                finished.release()

            images = [encode(scene(400 + i, (480, 640)).image) for i in range(24)]
            for png in images:
                triton.async_infer(name, [image_input(png)], callback)
            time.sleep(0.5)
            assert len(answers) < len(images), "every RPC was answered before SIGTERM: nothing was in flight"
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + 5
            while health_status(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "the health service still says SERVING after SIGTERM"
                time.sleep(0.05)
            time.sleep(max(0.0, signalled + 1.5 - time.monotonic()))  # past the grace period: the listener is closed
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                triton.infer(name, [image_input(images[0])], client_timeout=10)
            assert refused.value.status() == "StatusCode.UNAVAILABLE", str(refused.value)
            closed = time.monotonic()
            for _ in images:
                assert finished.acquire(timeout=60), f"{len(answers)} of {len(images)} RPCs answered"
            errors = [a for _, a in answers if isinstance(a, Exception)]
            assert not errors, errors[:3]
            assert max(t for t, _ in answers) > closed, "no RPC was still in flight when the listener closed"
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the documentation ------------------------------------------------------------------------------


def test_the_readme_snippet_runs(server: ServerThread, name: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """service/README.md's gRPC snippet, run as written but for the server's address, the model's name and
    the photo (written where the snippet reads it)."""
    readme = ROOT / "service" / "README.md"
    section = readme.read_text().split("## Open Inference Protocol over gRPC", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.count('"localhost:8001"') == 1 and snippet.count('"shapes-demo"') == 1
    code = snippet.replace('"localhost:8001"', repr(server.grpc_target)).replace('"shapes-demo"', repr(name))
    (tmp_path / "photo.jpg").write_bytes(encode(scene(55).image, "JPEG", quality=95))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(readme), "exec"), {})
    assert out.getvalue().startswith("[b'"), out.getvalue()
