"""``python -m service``: one clear line for a bad model file, and a graceful drain on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRCNN_") and not k.lower().endswith("_proxy")}
    return {**env, **extra}


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
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
