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
import contextlib
import io
import os
import shlex
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
from service.core.runtime import OnnxModel
from service.core.settings import DEFAULT_MODEL_PATH

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


def raw_ort(
    model: OnnxModel, imgs: list[np.ndarray], batch: int, seconds: float, threshold: float | None
) -> tuple[float, float]:
    """(images per second, median seconds per call) of session.run on pre-resized, pre-padded batches."""
    resized = [model.resize(im) for im in imgs]
    batches = [model.collate([resized[(i + k) % len(resized)] for k in range(batch)]) for i in range(len(imgs))]
    model.run(*batches[0], threshold)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        model.run(*batches[i % len(batches)], threshold)
        times.append(time.perf_counter() - t)
        i += 1
    return batch * len(times) / sum(times), statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, port: int, env: dict[str, str], log_level: str = "warning", output: Path | None = None
) -> subprocess.Popen:
    """``python -m service`` with ``env`` over none of this shell's MRCNN_*/OTEL_* settings, its stdout and
    stderr in ``output``.stdout / .stderr when given; returns once ready."""
    import httpx

    # No gRPC door unless ``env`` asks for one: its default port is fixed, and other servers may hold it.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MRCNN_", "OTEL_"))}
    argv = [sys.executable, "-m", "service", "--model", str(model), "--port", str(port), "--log-level", log_level]
    with contextlib.ExitStack() as files:
        stdout = stderr = None  # inherited
        if output is not None:
            stdout = files.enter_context(output.with_suffix(".stdout").open("ab"))
            stderr = files.enter_context(output.with_suffix(".stderr").open("ab"))
        proc = subprocess.Popen(argv, cwd=ROOT, env=base | {"MRCNN_GRPC_PORT": "0"} | env, stdout=stdout,
                                stderr=stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}" + (f"; see {output}.stderr" if output else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def server_env(max_batch_size: int, max_batch_wait_ms: float, concurrency: int) -> dict[str, str]:
    """The server's settings for a load test: batching as given, room in the queue for every client, and
    no deadline (a slow machine must not turn latency into errors)."""
    return {"MRCNN_MAX_BATCH_SIZE": str(max_batch_size), "MRCNN_MAX_BATCH_WAIT_MS": str(max_batch_wait_ms),
            "MRCNN_QUEUE_CAPACITY": str(max(64, 2 * concurrency)), "MRCNN_REQUEST_TIMEOUT_S": "3600"}


def batch_stats(url: str) -> tuple[float, float]:
    """(count, sum) of the server's mrcnn_batch_size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values.get("mrcnn_batch_size_count", 0.0), values.get("mrcnn_batch_size_sum", 0.0)


async def load(
    url: str, bodies: list[bytes], concurrency: int, requests: int, params: dict[str, str],
    headers: dict[str, str] | None = None,
) -> tuple[float, list[float], list[dict[str, float]]]:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last is answered, with
    ``headers`` besides the content type (an API key).

    Returns the wall time, each request's latency and each response's server-side timings (plus its
    detection count).
    """
    import httpx

    latencies: list[float] = []
    timings: list[dict[str, float]] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                r = await client.post("/segment", content=bodies[i % len(bodies)], params=params,
                                      headers={"content-type": "image/jpeg", **(headers or {})})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
                body = r.json()
                timings.append({**body["timings"], "detections": len(body["detections"])})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, timings


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
    p.add_argument("--score-threshold", type=float, default=None,
                   help="sent with every request and given to raw ORT (default: the server's, 0.5)")
    p.add_argument("--section", default="serve_load", help="RESULTS.md section to (re)write")
    p.add_argument("--note", default="", help="a line about the model, added under the table")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    imgs = images(args.images, tuple(args.size))
    bodies = [jpeg(im) for im in imgs]
    # The server decodes JPEG; the raw baseline gets the same decoded pixels.
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bodies]
    # Same session settings as the server (ORT threads do not spin between calls).
    model = OnnxModel(args.model, allow_spinning=False)
    info = model.metadata
    threshold = 0.5 if args.score_threshold is None else args.score_threshold
    params = {"score_threshold": str(threshold)}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, server_env(args.max_batch_size, args.max_batch_wait_ms,
                                                       max(args.concurrency)))
    rows = []
    try:
        asyncio.run(load(url, bodies[:2], 1, 2, params))  # warm the server's paths
        rawb, _ = raw_ort(model, decoded, args.max_batch_size, args.raw_seconds, threshold)
        for c in args.concurrency:
            # Raw ORT right before and right after each level, the server idle, averaged: on a shared
            # machine the background load drifts.
            before = raw_ort(model, decoded, 1, args.raw_seconds / 2, threshold)
            n0, s0 = batch_stats(url)
            wall, lat, served = asyncio.run(load(url, bodies, c, args.requests, params))
            n1, s1 = batch_stats(url)
            after = raw_ort(model, decoded, 1, args.raw_seconds / 2, threshold)
            # Server time outside ORT and the queue: decoding, resizing, post-processing, JSON.
            overhead = statistics.median(t["total_ms"] - t["inference_ms"] - t["queue_ms"] for t in served)
            post = statistics.median(t["postprocess_ms"] for t in served)
            dets = statistics.mean(t["detections"] for t in served)
            raw1, lat1 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            thr = args.requests / wall
            mean_batch = (s1 - s0) / max(n1 - n0, 1)
            p50 = percentile(lat, 50)
            rows.append([str(c), str(args.requests), f"{thr:.3f}", f"{raw1:.3f}", f"{thr / raw1:.2f}x",
                         f"{p50 * 1e3:.0f}", f"{percentile(lat, 95) * 1e3:.0f}",
                         f"{percentile(lat, 99) * 1e3:.0f}", f"{lat1 * 1e3:.0f}", f"{p50 / lat1:.2f}x",
                         f"{mean_batch:.2f}", f"{dets:.0f}", f"{overhead:.1f}", f"{post:.1f}"])
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(60)

    cmd = "python -m benchmarks.serve_load " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        f"## Serving ({info.model_name} {info.architecture}): HTTP load on the real server vs raw ONNX Runtime",
        "",
        f"Command: `{cmd.strip()}`. Model {info.model_name} {info.model_version} ({info.architecture}, "
        f"min/max size {info.min_size}/{info.max_size}); {args.images} distinct {args.size[0]}x{args.size[1]} "
        f"JPEGs; server `python -m service` on loopback, max batch {args.max_batch_size}, max wait "
        f"{args.max_batch_wait_ms:g} ms; closed-loop asyncio httpx clients on the same machine. {machine()}.",
        "",
        "Raw = `session.run` alone on the same decoded images, pre-resized and pre-padded, one image per "
        f"call, measured for {args.raw_seconds / 2:g} s right before and right after each level with the "
        f"server idle, averaged (same ORT settings as the server). Raw at batch {args.max_batch_size}: "
        f"{rawb:.3f} img/s.",
        "",
        table(["concurrency", "requests", "HTTP img/s", "raw img/s", "HTTP / raw", "p50 ms", "p95 ms",
               "p99 ms", "raw ms/img", "p50 / raw", "mean batch", "detections", "server non-ORT ms",
               "of which post-proc ms"], rows),
        "",
        f"Score threshold {threshold:g} for both. \"server non-ORT ms\": median of the server's own "
        "total - inference - queue time per request (decode, resize, post-processing, JSON).",
        "",
        "Targets: HTTP / raw >= 0.85x at concurrency 16; p50 / raw <= 1.15x at concurrency 1.",
        *([""] + [args.note] if args.note else []),
    ])
    print(body)
    if not args.no_write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
