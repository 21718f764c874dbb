"""Load test of the real server (``python -m service`` under uvicorn, loopback) beside raw ONNX Runtime.

1. Raw ORT on the same images, in this process, before the server starts: one image per call
   (latency and throughput) and ``--max-batch-size`` images per call (throughput).
2. The server in a subprocess; a closed-loop asyncio load generator at each concurrency (default 1, 4,
   16): throughput, p50/p95/p99 latency, and the mean batch size from the server's own /metrics.

Run: ``python -m benchmarks.serve_load --model models/demo/model.onnx`` (writes its section of
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from benchmarks import machine, table, write_section
from service.runtime import OnnxModel
from service.settings import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]


def images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Distinct synthetic photos-like scenes: smooth background and filled shapes."""
    out = []
    h, w = size
    for seed in range(n):
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * rng.uniform(0.1, 0.4)) % 256, (yy * rng.uniform(0.1, 0.4)) % 256,
                        np.full((h, w), rng.integers(0, 255))], axis=2).astype(np.uint8)
        for _ in range(6):
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(20, h // 3))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), r, colour, -1)
            else:
                cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
        out.append(img)
    return out


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def raw_ort(model: OnnxModel, imgs: list[np.ndarray], batch: int, seconds: float) -> tuple[float, float]:
    """(images per second, median seconds per call) of session.run on pre-resized, pre-padded batches."""
    resized = [model.resize(im) for im in imgs]
    batches = [model.collate([resized[(i + k) % len(resized)] for k in range(batch)]) for i in range(len(imgs))]
    model.run(*batches[0])  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        model.run(*batches[i % len(batches)])
        times.append(time.perf_counter() - t)
        i += 1
    return batch * len(times) / sum(times), statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    import httpx

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MRCNN_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(model), "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT, env=full_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def batch_stats(url: str) -> tuple[float, float]:
    """(count, sum) of the server's mrcnn_batch_size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values.get("mrcnn_batch_size_count", 0.0), values.get("mrcnn_batch_size_sum", 0.0)


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last is answered."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                r = await client.post("/segment", content=bodies[i % len(bodies)],
                                      headers={"content-type": "image/jpeg"})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    p.add_argument("--raw-seconds", type=float, default=10.0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    imgs = images(args.images, tuple(args.size))
    bodies = [jpeg(im) for im in imgs]
    # The server decodes JPEG; the raw baseline gets the same decoded pixels.
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bodies]
    model = OnnxModel(args.model)
    raw1, lat1 = raw_ort(model, decoded, 1, args.raw_seconds)
    rawb, _ = raw_ort(model, decoded, args.max_batch_size, args.raw_seconds)
    raw_best = max(raw1, rawb)
    info = model.metadata
    del model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"MRCNN_MAX_BATCH_SIZE": str(args.max_batch_size), "MRCNN_MAX_BATCH_WAIT_MS": str(args.max_batch_wait_ms),
           "MRCNN_QUEUE_CAPACITY": str(max(64, 2 * max(args.concurrency)))}
    server = start_server(args.model, port, env)
    rows = []
    try:
        asyncio.run(load(url, bodies[:4], 1, 8))  # warm the server's paths
        for c in args.concurrency:
            n0, s0 = batch_stats(url)
            wall, lat = asyncio.run(load(url, bodies, c, args.requests))
            n1, s1 = batch_stats(url)
            thr = args.requests / wall
            mean_batch = (s1 - s0) / max(n1 - n0, 1)
            rows.append([str(c), str(args.requests), f"{thr:.2f}", f"{thr / raw_best:.2f}x",
                         f"{percentile(lat, 50) * 1e3:.0f}", f"{percentile(lat, 95) * 1e3:.0f}",
                         f"{percentile(lat, 99) * 1e3:.0f}", f"{mean_batch:.2f}"])
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(60)

    p50_c1 = float(rows[0][4]) if args.concurrency[0] == 1 else float("nan")
    cmd = "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        "## Serving: HTTP load on the real server vs raw ONNX Runtime",
        "",
        f"Command: `{cmd.strip()}`. Model {info.name} {info.version} ({info.architecture}, "
        f"min/max size {info.min_size}/{info.max_size}); {args.images} distinct {args.size[0]}x{args.size[1]} "
        f"JPEGs; server `python -m service` on loopback, max batch {args.max_batch_size}, max wait "
        f"{args.max_batch_wait_ms:g} ms; closed-loop asyncio httpx clients in the same machine. {machine()}.",
        "",
        f"Raw ORT on the same images (pre-resized, pre-padded; session.run only): batch 1 "
        f"{raw1:.2f} img/s, {lat1 * 1e3:.0f} ms per image; batch {args.max_batch_size} {rawb:.2f} img/s. "
        f"Ratios below are against the better of the two ({raw_best:.2f} img/s).",
        "",
        table(["concurrency", "requests", "img/s", "vs raw", "p50 ms", "p95 ms", "p99 ms", "mean batch"], rows),
        "",
        f"p50 at concurrency 1 / one raw inference: {p50_c1 / (lat1 * 1e3):.2f}x (target <= 1.15x). "
        f"Throughput at the highest concurrency / raw: {float(rows[-1][2]) / raw_best:.2f}x (target >= 0.85x).",
    ])
    print(body)
    if not args.no_write:
        write_section("serve_load", body)


if __name__ == "__main__":
    main()
