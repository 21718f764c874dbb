"""``python -m service``: one clear line for a bad model file, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import free_port

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRCNN_") and not k.lower().endswith("_proxy")}
    return {**env, "MRCNN_GRPC_PORT": "0", **extra}  # no gRPC door on its fixed default port (tests/conftest.py)


def _start(model: Path, port: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _foreign_onnx(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "not-ours",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign"])
def test_bad_model_exits_with_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.onnx"
    if kind == "corrupt":
        path.write_bytes(b"\x08\x07garbage" * 100)
    elif kind == "foreign":
        _foreign_onnx(path)
    proc = _start(path, 1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert str(path) in lines[0] and lines[0].startswith("error:")


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_sigterm_drains_in_flight_and_exits_zero(request: pytest.FixtureRequest) -> None:
    try:
        model = Path(request.getfixturevalue("tiny_onnx_model"))
    except pytest.FixtureLookupError:
        pytest.skip("no tiny_onnx_model fixture in tests/conftest.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(model, port, MRCNN_DRAIN_GRACE_S="1.0", MRCNN_DRAIN_TIMEOUT_S="600")
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server never became ready"
                time.sleep(0.1)
            statuses: list[int] = []

            def send(i: int) -> None:
                with httpx.Client(base_url=url, timeout=600, trust_env=False) as cc:
                    r = cc.post("/segment", params={"score_threshold": 0.99}, content=_png(i),
                                headers={"content-type": "image/png"})
                    statuses.append(r.status_code)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert c.get("/readyz").status_code == 503  # draining, still answering during the grace
            for t in threads:
                t.join(600)
        assert statuses == [200] * 2
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class _RecordingTransport(asyncio.Transport):
    """Records every write, as the socket would see each send."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


def test_each_response_leaves_in_one_send():
    """Status line, headers and body in one write: a replica killed mid-response sends all or nothing,
    so nginx can retry it elsewhere (see service.__main__.OneSendTransport)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from uvicorn.server import ServerState

    from service.__main__ import OneSendH11Protocol

    async def hello(request):
        return JSONResponse({"path": request.url.path, "pad": "x" * 300})

    app = Starlette(routes=[Route("/a", hello), Route("/b", hello)])

    async def serve() -> list[bytes]:
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        protocol = OneSendH11Protocol(config=config, server_state=ServerState(), app_state={})
        transport = _RecordingTransport()
        protocol.connection_made(transport)
        for path in ("/a", "/b"):  # two requests on one keep-alive connection
            n = len(transport.writes)
            protocol.data_received(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            while len(transport.writes) == n:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # anything written later would show up as a second write
        protocol.connection_lost(None)
        return transport.writes

    writes = asyncio.run(asyncio.wait_for(serve(), timeout=10))
    assert len(writes) == 2, [w[:60] for w in writes]
    for path, sent in zip(("/a", "/b"), writes, strict=True):
        head, body = sent.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body) == {"path": path, "pad": "x" * 300}
