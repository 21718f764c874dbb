"""Helpers shared by the test files: the synthetic test scene, mask IoU and hole filling, a free port, and
the deployment side (tests/test_deploy.py, tests/test_container.py): child processes, docker/nginx.conf
run natively on loopback, a stream of /segment requests.

Importable without torch (the service tests run torch-free); the torch helpers import it themselves.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from contract import pad_batch

if TYPE_CHECKING:
    import torch

CIRCLE, RECTANGLE = 1, 2


class Scene(NamedTuple):
    image: np.ndarray  # [H, W, 3] uint8 RGB
    masks: np.ndarray  # [N, H, W] uint8: the pixels of each shape that later shapes leave visible
    labels: np.ndarray  # [N] int64: CIRCLE or RECTANGLE


def scene(seed: int, size: tuple[int, int] = (120, 160)) -> Scene:
    """A distinct synthetic RGB image: coloured background and four filled circles or rectangles, with the
    masks and labels of the shapes that stay visible."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    owner = np.full((h, w), -1)
    labels = []
    for i in range(4):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(8, max(h, w) // 3))
        shape = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            cv2.circle(shape, (x, y), r, 1, -1)
            labels.append(CIRCLE)
        else:
            cv2.rectangle(shape, (x - r, y - r // 2), (x + r, y + r // 2), 1, -1)
            labels.append(RECTANGLE)
        img[shape == 1] = colour
        owner[shape == 1] = i
    masks = (owner[None] == np.arange(4)[:, None, None]).astype(np.uint8)
    visible = masks.any(axis=(1, 2))
    return Scene(img, masks[visible], np.array(labels, np.int64)[visible])


def training_batch(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Scenes as the model's training inputs: the padded uint8 batch, real sizes, and per-image targets."""
    import torch

    images, sizes = model_inputs([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    return images, sizes, [_targets(s) for s in scenes]


def _targets(s: Scene) -> dict[str, torch.Tensor]:
    """A scene's ground truth as training targets: boxes (x1, y1, x2, y2) around the masks, labels, masks."""
    import torch

    from model.data.sample import boxes_from_masks

    return {
        "boxes": torch.from_numpy(boxes_from_masks(s.masks)),
        "labels": torch.from_numpy(s.labels),
        "masks": torch.from_numpy(s.masks),
    }


def model_inputs(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, h, w] -> the model's zero-padded batch and real sizes [B, 2] (the contract's padding)."""
    import torch

    batch, sizes = pad_batch([image.numpy() for image in images])
    return torch.from_numpy(batch), torch.from_numpy(sizes)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks; two empty masks count as identical."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background pixel that the image border cannot reach (flood fill)."""
    reach = np.ascontiguousarray(np.pad(mask.astype(np.uint8), 1))  # pycocotools decodes in Fortran order
    cv2.floodFill(reach, np.zeros((reach.shape[0] + 2, reach.shape[1] + 2), np.uint8), (0, 0), 2)
    return (reach != 2)[1:-1, 1:-1].astype(np.uint8)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# deployment: servers on loopback and the traffic sent to them

ROOT = Path(__file__).resolve().parents[1]
NGINX_CONF = ROOT / "docker" / "nginx.conf"
REQUEST_TIMEOUT_S = 60.0
REQUESTS_TOTAL = "mrcnn_requests_total"  # the service's request counter (service/metrics.py)


def binary(name: str) -> str | None:
    """An executable on PATH or in the sbin/bin directories (root's tools are not always on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


NGINX = binary("nginx")


def clean_env() -> dict[str, str]:
    """The environment for child processes: no proxies (loopback only), no inherited MRCNN_ settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("MRCNN_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def http_client(timeout: float = REQUEST_TIMEOUT_S) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll url until it answers 200; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    last = ""
    with http_client(timeout=5.0) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                pytest.fail(f"process for {url} exited with {proc.returncode}:\n{tail}")
            try:
                r = c.get(url)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{url} not ready after {timeout:.0f}s ({last}):\n{tail}")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def metric_sum(text: str, sample_name: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name:
                total += sample.value
    return total


def requests_served(base_url: str) -> int:
    """Requests a replica has answered, by its own /metrics."""
    with http_client(timeout=10.0) as c:
        r = c.get(base_url + "/metrics")
    r.raise_for_status()
    return round(metric_sum(r.text, REQUESTS_TOTAL))


def world_readable_tmpdir(prefix: str) -> Path:
    """A temp dir that nginx's workers (user nobody when started as root) can traverse."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def rewrite_nginx_conf(text: str, upstream_ports: list[int], listen_port: int, prefix: Path) -> str:
    """docker/nginx.conf for loopback: upstream servers, listen address, /tmp and log paths."""

    def upstream(m: re.Match) -> str:
        body = m.group(2)
        servers = re.findall(r"^\s*server\s+\S+([^;]*);", body, flags=re.M)
        assert len(servers) == 1, f"expected one templated upstream server line, got {servers}"
        # `resolve` is for Docker's DNS name; loopback addresses are literal.
        params = " ".join(p for p in servers[0].split() if p != "resolve")
        lines = "\n".join(f"        server 127.0.0.1:{p} {params};" for p in upstream_ports)
        body = re.sub(r"^\s*server\s+\S+[^;]*;", lambda _m: lines, body, count=1, flags=re.M)
        return m.group(1) + body + "}"

    text, n = re.subn(r"(upstream\s+mrcnn\s*\{)(.*?)\}", upstream, text, flags=re.S)
    assert n == 1, "docker/nginx.conf must define `upstream mrcnn`"
    # Docker's DNS resolver address: nothing to resolve on loopback.
    text = re.sub(r"^\s*resolver\s[^;]*;\n", "", text, flags=re.M)
    text, n = re.subn(r"\blisten\s+8080\s*;", f"listen 127.0.0.1:{listen_port};", text)
    assert n == 1, "docker/nginx.conf must listen on 8080"
    text = text.replace("/tmp/", f"{prefix}/")
    text = text.replace("/dev/stderr", str(prefix / "error.log"))
    text = text.replace("/dev/stdout", str(prefix / "access.log"))
    return text


class Nginx:
    def __init__(self, upstream_ports: list[int]):
        assert NGINX is not None
        self.prefix = world_readable_tmpdir("mrcnn-nginx-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.prefix / "nginx.conf"
        conf.write_text(rewrite_nginx_conf(NGINX_CONF.read_text(), upstream_ports, self.port, self.prefix))
        self.access_log = self.prefix / "access.log"
        self.error_log = self.prefix / "error.log"
        check = subprocess.run(
            [NGINX, "-t", "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log)],
            capture_output=True, text=True, timeout=30,
        )
        assert check.returncode == 0, f"nginx -t rejected the config:\n{check.stderr}"
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.error_log),
             "-g", "daemon off;"],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(self.url + "/lb-healthz", self.proc, 20.0, self.error_log)
        except BaseException:
            self.stop()
            raise

    def upstream_log(self) -> list[str]:
        """The `upstream=` field of every access-log line (one address per attempt)."""
        if not self.access_log.exists():
            return []
        return re.findall(r"upstream=(.*?) ustatus=", self.access_log.read_text(errors="replace"))

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)
        shutil.rmtree(self.prefix, ignore_errors=True)


def png(seed: int, size: tuple[int, int] = (96, 128)) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    # a few filled rectangles so the image is not plain noise
    for _ in range(3):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png(s) for s in range(4)]


def segment_status(client: httpx.Client, base_url: str, i: int) -> int | str:
    try:
        r = client.post(
            base_url + "/segment",
            files={"image": (f"img{i}.png", IMAGES[i % len(IMAGES)], "image/png")},
        )
    except httpx.HTTPError as e:
        return repr(e)
    if r.status_code == 200:
        body = r.json()
        if not isinstance(body.get("detections"), list) or body.get("image") != {"width": 128, "height": 96}:
            return f"200 with an unexpected body: {str(body)[:200]}"
    return r.status_code


class Load:
    """POST /segment requests through base_url by `workers` threads: `n` of them, or fewer if stopped
    earlier with stop(). join() gives the statuses of the requests made, in order."""

    def __init__(self, base_url: str, n: int, workers: int = 4):
        self.statuses: list[int | str | None] = [None] * n
        self.done = 0
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._n = n
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(base_url,), daemon=True)
                         for _ in range(workers)]

    def _work(self, base_url: str) -> None:
        with http_client() as c:
            while not self._stop.is_set():
                with self._lock:
                    i = next(self._next)
                if i >= self._n:
                    return
                self.statuses[i] = segment_status(c, base_url, i)
                with self._lock:
                    self.done += 1

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def wait_done(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.done >= count, f"only {self.done}/{count} requests done after {timeout:.0f}s"

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 300.0) -> list[int | str | None]:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), "load threads did not finish"
        # Every index handed out to a worker was answered (workers only check stop between requests).
        with self._lock:
            made = min(next(self._next), self._n)
        return self.statuses[:made]


def all_ok(statuses: list[int | str | None]) -> None:
    bad = {i: s for i, s in enumerate(statuses) if s != 200}
    assert not bad, f"{len(bad)} of {len(statuses)} requests failed: {dict(list(bad.items())[:10])}"


def small_input_model(src: Path, out: Path) -> Path:
    """``src`` with a smaller input-size policy (its metadata's min_size / max_size, which the service
    reads): the same graph, about half the CPU per request, for the tests about load balancing and
    draining rather than about the model's resolution. Without onnx (the serving deps alone): ``src``."""
    try:
        import onnx
    except ImportError:
        return src
    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    props["min_size"].value, props["max_size"].value = "64", "96"
    onnx.save(model, str(out))
    return out
