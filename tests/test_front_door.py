"""The production front door against real servers on loopback (the bundled demo model): API keys on every
route but the probes and the page's files, request IDs on every answer, TLS, JSON logs, per-request timeout
and priority, traces, metrics on their own port, CORS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
import trustme
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.app import create_app
from service.core.api_keys import ApiKeys, ApiKeysError, read_keys_file
from service.core.batcher import DynamicBatcher
from service.core.settings import DEFAULT_MODEL_PATH, Settings
from service.web.logs import ContextFilter, JsonFormatter
from service.web.tracing import TracingConfigError, tracer_provider_from_env
from tests.helpers import ServerThread, encode, free_port, metric_values, sample, scene

ENV_KEY, FILE_KEY, HASHED_KEY = "env-key-0123456789", "file-key-abcdefghij", "hashed-key-klmnopqrst"
T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
MODEL = "shapes-demo"  # the demo model's name, as GET /v1/model reports it


def keys_file(folder: Path) -> Path:
    """A keys file with a comment, a plain key and a hashed one (as sha256sum prints it)."""
    path = folder / "keys"
    hashed = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    path.write_text(f"# the team's keys\n{FILE_KEY}\n\nsha256:{hashed}\n")
    return path


def png() -> bytes:
    return encode(scene(3)[0])


def eventually(found: Callable[[], list[T]], count: int = 1) -> list[T]:
    """``found()`` once it has ``count`` items or more: the server logs a request and ends its span just after the
    response has left, so the client may see the answer first."""
    deadline = time.monotonic() + 10
    while len(items := found()) < count:
        assert time.monotonic() < deadline, f"found {len(items)} of {count}"
        time.sleep(0.02)
    return items


class LogCapture:
    """The root logger's records in the server's JSON format, as a list of parsed lines."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.addFilter(ContextFilter())

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        root.addHandler(self.handler)
        self.level, root.level = root.level, logging.INFO
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)
        logging.getLogger().setLevel(self.level)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    with LogCapture() as capture:
        yield capture


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, logs: LogCapture) -> Iterator[ServerThread]:
    """The demo model behind API keys: one in MRCNN_API_KEYS, two in the keys file."""
    settings = Settings(model_path=DEFAULT_MODEL_PATH, api_keys=ENV_KEY,
                        api_keys_file=keys_file(tmp_path_factory.mktemp("keys")), request_timeout_s=120)
    with ServerThread(create_app(settings)) as server:
        yield server


# -- the keys on their own ------------------------------------------------------------------------------


def test_keys_are_held_as_digests_and_compared_whole(tmp_path: Path) -> None:
    keys = ApiKeys(read_keys_file(keys_file(tmp_path)))
    assert len(keys) == 2
    assert keys.allows(FILE_KEY) and keys.allows(HASHED_KEY)
    assert not keys.allows(FILE_KEY[:-1]) and not keys.allows(FILE_KEY + "x") and not keys.allows("")
    assert not keys.allows(None) and not keys.allows("sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest())
    assert ApiKeys.from_settings(Settings()) is None  # no keys: open


@pytest.mark.parametrize(("content", "problem"), [
    ("# only a comment\n\n", "has no keys"),
    ("sha256:abc\n", "64 hex digits"),
    (None, "cannot read"),
])
def test_a_bad_keys_file_is_refused(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ApiKeysError, match=problem):
        read_keys_file(path)


# -- the key rule on every route ---------------------------------------------------------------------------

GIVEN = {
    "none": {},
    "wrong bearer": {"Authorization": "Bearer not-a-key"},
    "wrong header": {"X-API-Key": "not-a-key"},
    "bearer": {"Authorization": f"Bearer {ENV_KEY}"},
    "header (file)": {"X-API-Key": FILE_KEY},
    "bearer (hashed in the file)": {"Authorization": f"Bearer {HASHED_KEY}"},
}


def segment(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return client.post("/segment", content=png(), headers={"content-type": "image/png", **headers})


@pytest.mark.parametrize("given", GIVEN)
@pytest.mark.parametrize("path", ["/segment", "/v1/model", "/docs", "/openapi.json", "/metrics", "/page.json"])
def test_every_route_needs_a_key(keyed: ServerThread, path: str, given: str) -> None:
    with httpx.Client(base_url=keyed.url, timeout=120) as client:
        r = segment(client, GIVEN[given]) if path == "/segment" else client.get(path, headers=GIVEN[given])
    if given in ("none", "wrong bearer", "wrong header"):
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer ")
        error = r.json()["error"]
        assert error["code"] == ("missing_api_key" if given == "none" else "invalid_api_key")
        assert error["request_id"] == r.headers["x-request-id"]
    else:
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("given", GIVEN)
def test_the_protocol_needs_a_key_through_tritonclient(keyed: ServerThread, given: str) -> None:
    client = httpclient.InferenceServerClient(keyed.url.removeprefix("http://"), network_timeout=120)
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png()], dtype=object))
    assert client.is_server_live() and client.is_server_ready()  # the probes: no key
    if given in ("none", "wrong bearer", "wrong header"):
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [image], headers=dict(GIVEN[given]))
        assert refused.value.status() == "401"
        assert "API key" in refused.value.message()
        with pytest.raises(InferenceServerException, match="API key"):
            client.get_model_metadata(MODEL, headers=dict(GIVEN[given]))
    else:
        result = client.infer(MODEL, [image], headers=dict(GIVEN[given]))
        assert result.as_numpy("scores") is not None
        assert client.get_model_metadata(MODEL, headers=dict(GIVEN[given]))["name"] == MODEL


def test_the_protocol_says_401_in_its_own_format(keyed: ServerThread) -> None:
    r = httpx.post(f"{keyed.url}/v2/models/{MODEL}/infer", json={"inputs": []})
    assert r.status_code == 401 and set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert r.headers["www-authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/",
                                  "/static/page.js"])
def test_probes_and_the_page_are_open(keyed: ServerThread, path: str) -> None:
    assert httpx.get(keyed.url + path).status_code == 200


def test_the_schema_declares_both_ways_of_sending_a_key(keyed: ServerThread) -> None:
    spec = httpx.get(keyed.url + "/openapi.json", headers={"X-API-Key": ENV_KEY}).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                       "description": "The API key"}
    assert schemes["HTTPBasic"]["scheme"] == "basic"  # the key as the password (Label Studio)


def test_keys_never_reach_the_log(keyed: ServerThread, logs: LogCapture) -> None:
    ids = [f"no-key-in-the-log-{i}" for i in range(2 * len(GIVEN))]
    with httpx.Client(base_url=keyed.url, timeout=120) as client:
        for i, headers in enumerate(GIVEN.values()):
            segment(client, {**headers, "X-Request-ID": ids[2 * i]})
            client.get("/v1/model", headers={**headers, "X-Request-ID": ids[2 * i + 1]})
    eventually(lambda: [line for line in logs.lines() if line.get("request_id") in ids], len(ids))
    assert "POST /segment 401" in logs.text and "POST /segment 200" in logs.text
    for secret in (ENV_KEY, FILE_KEY, HASHED_KEY, "not-a-key"):
        assert secret not in logs.text


# -- request IDs ------------------------------------------------------------------------------------------


def test_a_sane_request_id_is_kept_and_logged(keyed: ServerThread, logs: LogCapture) -> None:
    with httpx.Client(base_url=keyed.url, timeout=120) as client:
        r = segment(client, {"X-API-Key": ENV_KEY, "X-Request-ID": "client-42:retry/1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-42:retry/1"
    (line,) = eventually(lambda: [entry for entry in logs.lines() if entry.get("request_id") == "client-42:retry/1"])
    assert line["logger"] == "service.access" and line["route"] == "/segment" and line["status"] == 200
    assert line["client"] == "127.0.0.1" and line["detections"] == len(r.json()["detections"])
    for key in ("decode_ms", "queue_ms", "inference_ms", "postprocess_ms", "latency_ms"):
        assert isinstance(line[key], float) and line[key] >= 0
    assert line["batch_size"] == r.json()["batch_size"]


@pytest.mark.parametrize("given", ["x" * 129, "two words", "new\nline", ""])
def test_an_insane_request_id_is_replaced(keyed: ServerThread, given: str) -> None:
    r = httpx.get(keyed.url + "/healthz", headers={"X-Request-ID": given} if "\n" not in given else
                  [("X-Request-ID", given.replace("\n", "\t"))])
    rid = r.headers["x-request-id"]
    assert rid != given and len(rid) == 32 and int(rid, 16) >= 0


def test_every_error_class_carries_the_request_id(keyed: ServerThread) -> None:
    key = {"X-API-Key": ENV_KEY}
    big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    calls = [
        ("unauthorized", "POST", "/segment", {}, png(), 401),
        ("undecodable", "POST", "/segment", {"content-type": "image/png", **key}, b"not an image", 400),
        ("unknown path", "GET", "/nowhere", key, None, 404),
        ("wrong method", "PUT", "/segment", key, None, 405),
        ("unsupported type", "POST", "/segment", {"content-type": "text/plain", **key}, b"x", 415),
        ("bad option", "POST", "/segment?score_threshold=7", {"content-type": "image/png", **key}, png(), 422),
        ("past its timeout", "POST", "/segment?timeout_ms=0.001", {"content-type": "image/png", **key},
         encode(big), 504),
        ("protocol", "POST", f"/v2/models/{MODEL}/infer", key, b"{", 400),
    ]
    with httpx.Client(base_url=keyed.url, timeout=120) as client:
        for name, method, path, headers, body, status in calls:
            rid = f"case-{name.replace(' ', '-')}"
            r = client.request(method, path, headers={**headers, "X-Request-ID": rid}, content=body)
            assert r.status_code == status, (name, r.text)
            assert r.headers["x-request-id"] == rid, name
            error = r.json()["error"]
            if path.startswith("/v2"):
                assert isinstance(error, str)  # the protocol's own error format, unchanged
            else:
                assert error["request_id"] == rid, name


# -- TLS --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(folder / "cert.pem"), append=True)
    settings = Settings(model_path=DEFAULT_MODEL_PATH, api_keys=ENV_KEY, request_timeout_s=120)
    with ServerThread(create_app(settings), ssl_certfile=folder / "cert.pem", ssl_keyfile=folder / "key.pem") as s:
        yield s


def test_https_with_httpx(tls_server: ServerThread, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    assert tls_server.url.startswith("https://")
    with httpx.Client(base_url=tls_server.url, verify=context, timeout=120) as client:
        assert client.get("/healthz").status_code == 200
        r = segment(client, {"Authorization": f"Bearer {ENV_KEY}"})
        assert r.status_code == 200 and r.json()["image"]["width"] == 160
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
        httpx.get(tls_server.url + "/healthz")


def test_https_with_tritonclient(tls_server: ServerThread, ca: trustme.CA, tmp_path: Path) -> None:
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = httpclient.InferenceServerClient(tls_server.url.removeprefix("https://"), ssl=True,
                                              ssl_options={"ca_certs": str(tmp_path / "ca.pem")},
                                              network_timeout=120)
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png()], dtype=object))
    assert client.is_server_ready()
    result = client.infer(MODEL, [image], headers={"X-API-Key": ENV_KEY})
    assert result.as_numpy("boxes").shape[1:] == (4,)


def test_plain_http_to_the_tls_port_fails(tls_server: ServerThread) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https://", "http://") + "/healthz")


# -- per-request priority and timeout ---------------------------------------------------------------------


def test_the_batcher_takes_the_highest_priority_first() -> None:
    """With the inference thread busy, waiting jobs go by priority, then arrival."""

    async def main() -> list[list[str]]:
        gate, calls = threading.Event(), []

        def run(payloads: list[str]) -> list[str]:
            gate.wait(10)
            calls.append(payloads)
            return payloads

        b: DynamicBatcher[str, str] = DynamicBatcher(run, max_batch_size=1, max_wait_s=0.0)
        await b.start()

        async def request(name: str, priority: int) -> str:
            with b.admit() as slot:
                return await slot.submit(name, priority).future

        tasks = [asyncio.create_task(request("first", 5))]
        await asyncio.sleep(0.05)  # taken: its batch waits for the thread
        for name, priority in (("low-a", 5), ("low-b", 5), ("high", 1), ("middle", 3)):
            tasks.append(asyncio.create_task(request(name, priority)))
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)
        await b.stop()
        return calls

    assert asyncio.run(main()) == [["first"], ["high"], ["middle"], ["low-a"], ["low-b"]]


@pytest.fixture(scope="module")
def one_at_a_time() -> Iterator[ServerThread]:
    """The demo model, one image a batch, no keys."""
    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_batch_size=1, max_batch_wait_ms=0, request_timeout_s=120)
    app = create_app(settings)
    with ServerThread(app) as server:
        server.pipeline = app.state.pipeline
        yield server


class HeldBusy:
    """The server's inference thread held by the test, so that requests queue up behind it."""

    def __init__(self, server: ServerThread) -> None:
        self.server, self.gate = server, threading.Event()
        self.pool = ThreadPoolExecutor(8)
        self.done: list[str] = []

    def __enter__(self) -> HeldBusy:
        self.server.pipeline.batcher._executor.submit(self.gate.wait, 60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.pool.shutdown(wait=True)

    def queued(self) -> float:
        return sample(metric_values(httpx.get(self.server.url + "/metrics").text), "mrcnn_queue_depth")

    def batches(self) -> float:
        return sample(metric_values(httpx.get(self.server.url + "/metrics").text), "mrcnn_batch_size_count")

    def wait_for(self, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the server never got there"
            time.sleep(0.02)

    def send(self, name: str, query: str = "") -> Future[httpx.Response]:
        def post() -> httpx.Response:
            r = httpx.post(f"{self.server.url}/segment?formats=rle{query}", content=png(),
                           headers={"content-type": "image/png"}, timeout=120)
            self.done.append(name)
            return r

        return self.pool.submit(post)


def test_a_higher_priority_request_is_served_before_lower_ones_waiting(one_at_a_time: ServerThread) -> None:
    with HeldBusy(one_at_a_time) as held:
        batcher = one_at_a_time.pipeline.batcher
        answers = [held.send("first")]
        held.wait_for(lambda: batcher.admitted == 1 and batcher.arriving == 0 and held.queued() == 0)
        for i, (name, priority) in enumerate((("low-a", 5), ("low-b", 5), ("high", 1)), 1):
            answers.append(held.send(name, f"&priority={priority}"))
            held.wait_for(lambda i=i: held.queued() == i)
        held.gate.set()
        assert all(a.result().status_code == 200 for a in answers)
    assert held.done == ["first", "high", "low-a", "low-b"]


def test_a_request_past_its_own_timeout_is_answered_without_running(one_at_a_time: ServerThread) -> None:
    client = httpclient.InferenceServerClient(one_at_a_time.url.removeprefix("http://"), network_timeout=120)
    image = httpclient.InferInput("IMAGE", [1], "BYTES")
    image.set_data_from_numpy(np.array([png()], dtype=object))
    with HeldBusy(one_at_a_time) as held:
        batcher = one_at_a_time.pipeline.batcher
        before = held.batches()
        first = held.send("first")
        held.wait_for(lambda: batcher.admitted == 1 and batcher.arriving == 0 and held.queued() == 0)
        started = time.monotonic()
        late = held.send("late", "&timeout_ms=300").result()
        assert late.status_code == 504 and "300 ms" in late.json()["error"]["message"]
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [image], timeout=300_000)  # Triton's microseconds
        assert refused.value.status() == "503"
        assert time.monotonic() - started < 10  # answered while the model was still held
        assert batcher.admitted == 1  # only the first holds a slot
        held.gate.set()
        assert first.result().status_code == 200
    time.sleep(0.3)
    assert held.batches() == before + 1  # the first request's batch alone ran


# -- traces -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[ServerThread, InMemorySpanExporter]]:
    """The demo model with traces going to the SDK's in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(Settings(model_path=DEFAULT_MODEL_PATH, max_batch_wait_ms=0, request_timeout_s=120),
                     tracer_provider=provider)
    with ServerThread(app) as server:
        server.pipeline = app.state.pipeline
        yield server, exporter


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def test_a_request_gives_its_span_tree_under_the_callers_trace(traced: tuple[ServerThread, InMemorySpanExporter],
                                                               logs: LogCapture) -> None:
    server, exporter = traced
    exporter.clear()
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    r = httpx.post(server.url + "/segment", content=png(), timeout=120,
                   headers={"content-type": "image/png", "traceparent": traceparent(trace_id, parent_id)})
    assert r.status_code == 200
    spans = eventually(lambda: [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id], 6)
    (root,) = [s for s in spans if s.parent is not None and s.parent.span_id == parent_id]
    assert root.name == "POST /segment" and root.kind == SpanKind.SERVER and root.parent.is_remote
    assert root.attributes["http.status_code"] == 200 and root.attributes["http.route"] == "/segment"
    assert root.attributes["mrcnn.request_id"] == r.headers["x-request-id"]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(children) == {"decode", "queue wait", "inference", "postprocess", "encode"}
    assert children["inference"].attributes["mrcnn.batch_size"] == 1
    assert children["inference"].attributes["mrcnn.detections"] >= len(r.json()["detections"])
    assert children["postprocess"].attributes["mrcnn.detections"] == len(r.json()["detections"])
    assert [link.context for link in children["queue wait"].links] == [children["inference"].context]
    order = ["decode", "queue wait", "inference", "postprocess", "encode"]
    starts = [children[name].start_time for name in order]
    assert starts[:2] == sorted(starts[:2]) and starts[2:] == sorted(starts[2:])
    assert all(root.start_time <= s.start_time and s.end_time <= root.end_time for s in children.values())
    rid = r.headers["x-request-id"]
    (line,) = eventually(lambda: [entry for entry in logs.lines() if entry.get("request_id") == rid])
    assert line["trace_id"] == f"{trace_id:032x}"
    exporter.clear()
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert exporter.get_finished_spans() == ()  # the probes are not traced


def test_a_batch_has_one_inference_span_linked_with_each_request(
    traced: tuple[ServerThread, InMemorySpanExporter]
) -> None:
    server, exporter = traced
    with HeldBusy(server) as held:
        first = held.send("first")
        held.wait_for(lambda: held.queued() == 0 and server.pipeline.batcher.arriving == 0
                      and server.pipeline.batcher.admitted == 1)
        exporter.clear()
        trace_ids = [0x1000 + i for i in range(3)]
        answers = []
        for i, trace_id in enumerate(trace_ids, 1):
            answers.append(held.pool.submit(
                httpx.post, server.url + "/segment", content=png(), timeout=120,
                headers={"content-type": "image/png", "traceparent": traceparent(trace_id, 0x42)}))
            held.wait_for(lambda i=i: held.queued() == i)
        held.gate.set()
        assert first.result().status_code == 200 and all(a.result().status_code == 200 for a in answers)
    eventually(lambda: [s for s in exporter.get_finished_spans()
                        if s.kind == SpanKind.SERVER and s.context.trace_id in trace_ids], 3)
    spans = exporter.get_finished_spans()
    servers = {s.context.trace_id: s for s in spans if s.kind == SpanKind.SERVER and s.context.trace_id in trace_ids}
    (batch,) = [s for s in spans if s.name == "inference" and s.attributes["mrcnn.batch_size"] == 3]
    assert {link.context.span_id for link in batch.links} == {s.context.span_id for s in servers.values()}
    assert batch.context.trace_id in trace_ids  # a child of its first request's span
    waits = [s for s in spans if s.name == "queue wait" and s.context.trace_id in trace_ids]
    assert len(waits) == 3 and all([link.context for link in w.links] == [batch.context] for w in waits)


# -- all of it in the real command: python -m service ------------------------------------------------------


def certificate(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by ``ca``: the chain and the key, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = folder / "cert.pem", folder / "key.pem"
    chain.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return chain, key


class Production:
    """``python -m service`` with everything on: TLS (the command's flags), keys, JSON logs, metrics on their
    own port, a CORS allow-list, console traces. Its stdout (the spans) and stderr (the logs) go to files."""

    ORIGIN = "https://app.example.com"

    def __init__(self, ca: trustme.CA, folder: Path) -> None:
        chain, key = certificate(ca, folder)
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MRCNN_", "OTEL_"))}
        env.update(MRCNN_API_KEYS=ENV_KEY, MRCNN_LOG_FORMAT="json", MRCNN_METRICS_PORT=str(self.metrics_port),
                   MRCNN_CORS_ORIGINS=self.ORIGIN, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="mrcnn-test",
                   OTEL_BSP_SCHEDULE_DELAY="100")
        command = [sys.executable, "-m", "service", "--model", str(DEFAULT_MODEL_PATH), "--port", str(self.port),
                   "--ssl-certfile", str(chain), "--ssl-keyfile", str(key)]
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self.client = httpx.Client(base_url=self.url, verify=context, timeout=120, trust_env=False)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.stderr.read_text()
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/readyz").status_code == 200:
                    return
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)

    def stop(self) -> int:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.mark.slow
def test_the_production_command(ca: trustme.CA, tmp_path: Path) -> None:
    server = Production(ca, tmp_path)
    try:
        server.wait_ready()
        key = {"Authorization": f"Bearer {ENV_KEY}"}
        rid, trace_id = "production-1", 0x5B8EFFF798038103D269B633813FC60C
        r = server.client.post("/segment", content=png(), headers={
            "content-type": "image/png", "X-Request-ID": rid, "traceparent": traceparent(trace_id, 0xEEE19B7EC3C1B174),
            **key})
        assert r.status_code == 200 and r.headers["x-request-id"] == rid
        assert server.client.post("/segment", content=png(), headers={"content-type": "image/png"}).status_code == 401
        # Metrics on their own port, no key; not on the API port.
        metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", trust_env=False)
        assert metrics.status_code == 200
        values = metric_values(metrics.text)
        assert sample(values, "mrcnn_requests_total", route="segment", status="200") == 1
        assert sample(values, "mrcnn_requests_total", route="segment", status="401") == 0  # refused before the door
        assert server.client.get("/metrics", headers=key).status_code == 404
        # CORS: an allowed origin's preflight is answered, another origin's is not.
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
        allowed = server.client.options("/segment", headers={"Origin": Production.ORIGIN, **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == Production.ORIGIN
        other = server.client.options("/segment", headers={"Origin": "https://evil.example.com", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        simple = server.client.get("/v1/model", headers={"Origin": Production.ORIGIN, **key})
        assert simple.headers["access-control-allow-origin"] == Production.ORIGIN
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(server.url.replace("https", "http") + "/healthz", trust_env=False)
    finally:
        assert server.stop() == 0
    logs = [json.loads(line) for line in server.stderr.read_text().splitlines()]  # every line is JSON
    (line,) = [entry for entry in logs if entry.get("request_id") == rid]
    assert line["trace_id"] == f"{trace_id:032x}" and line["status"] == 200 and line["batch_size"] == 1
    assert any("1 API key(s)" in entry["message"] for entry in logs)
    assert any(entry["logger"].startswith("uvicorn") for entry in logs)  # uvicorn's own lines, as JSON too
    spans = server.stdout.read_text()
    assert ENV_KEY not in spans and ENV_KEY not in server.stderr.read_text()
    assert f'"trace_id": "0x{trace_id:032x}"' in spans and '"service.name": "mrcnn-test"' in spans
    for name in ("POST /segment", "decode", "queue wait", "inference", "postprocess", "encode"):
        assert f'"name": "{name}"' in spans


class OtlpReceiver:
    """The receiving end of OTLP/HTTP (what a collector listens on at 4318): POST /v1/traces, protobuf."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                received.append((self.path, request))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, str]]:
        """(service name, span name) of every span received."""
        out = []
        for _, request in self.received:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                out += [(service, span.name) for scope in resource_spans.scope_spans for span in scope.spans]
        return out


def test_otlp_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = OtlpReceiver()
    try:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "mrcnn-otlp-test")
        provider = tracer_provider_from_env()
        assert provider is not None
        app = create_app(Settings(model_path=DEFAULT_MODEL_PATH), tracer_provider=provider)
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
            assert segment(client, {}).status_code == 200
            assert provider.force_flush(30_000)
        assert {path for path, _ in receiver.received} == {"/v1/traces"}
        names = [name for service, name in receiver.spans() if service == "mrcnn-otlp-test"]
        assert sorted(names) == sorted(["POST /segment", "decode", "queue wait", "inference", "postprocess", "encode"])
    finally:
        receiver.server.shutdown()


def test_tracing_is_off_unless_asked_and_an_unknown_exporter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracer_provider_from_env() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracer_provider_from_env() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(TracingConfigError, match="no trace exporter 'zipkin'; installed: .*console.*otlp"):
        tracer_provider_from_env()


def test_bad_timeouts_and_priorities_are_refused(one_at_a_time: ServerThread) -> None:
    image = {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png()).decode()]}
    for parameters in ({"timeout": -5}, {"timeout": "soon"}, {"priority": -1}):
        r = httpx.post(f"{one_at_a_time.url}/v2/models/{MODEL}/infer", timeout=120,
                       json={"inputs": [image], "parameters": parameters})
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    for query in ("timeout_ms=0", "timeout_ms=-1", "priority=-1", "priority=high"):
        r = httpx.post(f"{one_at_a_time.url}/segment?{query}", content=png(), headers={"content-type": "image/png"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_option", query
    r = httpx.post(f"{one_at_a_time.url}/v2/models/{MODEL}/infer", timeout=120,  # 0: Triton's "none" / "default"
                   json={"inputs": [image], "parameters": {"timeout": 0, "priority": 0}})
    assert r.status_code == 200, r.text


def test_tls_settings_come_from_the_environment_in_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRCNN_SSL_CERTFILE", "/run/tls/tls.crt")
    with pytest.raises(ValidationError, match="ssl_certfile and ssl_keyfile go together"):
        Settings()
    monkeypatch.setenv("MRCNN_SSL_KEYFILE", "/run/tls/tls.key")
    settings = Settings()
    assert (settings.ssl_certfile, settings.ssl_keyfile) == (Path("/run/tls/tls.crt"), Path("/run/tls/tls.key"))
