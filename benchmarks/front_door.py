"""The production front door's cost: the real server (``python -m service``, loopback) at concurrency 16 with
API keys + JSON logs + OpenTelemetry traces (console exporter) on, against the same server with all of them
off, side by side.

The two servers run one after the other, in alternating rounds (off, on, off, on, ...), so that the drift
of a shared machine's background load falls on both. Both log at INFO to a file (the per-request line
included: text when off, JSON when on); the traced one's spans go to a file through the console exporter.

Run: ``python -m benchmarks.front_door`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine, table, write_section
from benchmarks.serve_load import free_port, images, jpeg, load, percentile
from service.core.settings import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
KEY = "benchmark-key-0123456789abcdef"
VARIANTS = {
    "all off": {},
    "keys + JSON logs + traces": {"MRCNN_API_KEYS": KEY, "MRCNN_LOG_FORMAT": "json", "OTEL_TRACES_EXPORTER": "console",
                                  "OTEL_SERVICE_NAME": "mrcnn-benchmark"},
}


def start(model: Path, port: int, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """The server with ``env`` on top of the load-test settings, its stdout (spans) and stderr (logs) in
    ``out``.*; returns once ready."""
    import httpx

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MRCNN_", "OTEL_"))}
    settings = {"MRCNN_MAX_BATCH_SIZE": "8", "MRCNN_QUEUE_CAPACITY": "64", "MRCNN_REQUEST_TIMEOUT_S": "3600"}
    with out.with_suffix(".stdout").open("ab") as stdout, out.with_suffix(".stderr").open("ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(model), "--port", str(port)],
                                cwd=ROOT, env=base | settings | env, stdout=stdout, stderr=stderr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {out}.stderr")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, trust_env=False).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


async def light_load(url: str, path: str, concurrency: int, requests: int, headers: dict[str, str]) -> float:
    """Closed loop of GET ``path`` (no model behind it: the front door's own cost); the wall time."""
    import httpx

    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            for _ in counter:
                r = await client.get(path, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=96, help="requests per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per variant, alternating")
    p.add_argument("--light-requests", type=int, default=1000, help="GET /v1/model requests per round")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    bodies = [jpeg(im) for im in images(args.images, tuple(args.size))]
    params = {"score_threshold": "0.5"}
    latencies: dict[str, list[float]] = {name: [] for name in VARIANTS}
    walls: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    light_walls: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    server_ms: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="front-door-") as folder:
        for _ in range(args.rounds):
            for name, env in VARIANTS.items():
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                server = start(args.model, port, env, Path(folder) / name.replace(" ", "_"))
                headers = {"Authorization": f"Bearer {KEY}"} if "MRCNN_API_KEYS" in env else {}
                try:
                    asyncio.run(load(url, bodies[:2], 1, 2, params, headers))  # warm the server's paths
                    wall, lat, served = asyncio.run(load(url, bodies, args.concurrency, args.requests, params,
                                                         headers))
                    light_walls[name] += asyncio.run(light_load(url, "/v1/model", args.concurrency,
                                                                args.light_requests, headers))
                finally:
                    server.terminate()
                    server.wait(60)
                walls[name] += wall
                latencies[name] += lat
                server_ms[name] += [t["total_ms"] for t in served]
                print(name, f"{args.requests / wall:.2f} img/s", flush=True)
        spans = sum(1 for f in Path(folder).glob("*.stdout") for line in f.open() if '"name":' in line)
        log_lines = {name: sum(1 for _ in (Path(folder) / f"{name.replace(' ', '_')}.stderr").open())
                     for name in VARIANTS}

    total, light = args.rounds * args.requests, args.rounds * args.light_requests
    rows = []
    base, light_base = total / walls["all off"], light / light_walls["all off"]
    for name in VARIANTS:
        thr, lat, light_thr = total / walls[name], latencies[name], light / light_walls[name]
        rows.append([name, str(total), f"{thr:.2f}", f"{thr / base - 1:+.1%}", f"{percentile(lat, 50) * 1e3:.0f}",
                     f"{percentile(lat, 95) * 1e3:.0f}", f"{percentile(lat, 99) * 1e3:.0f}",
                     f"{statistics.median(server_ms[name]):.1f}", f"{light_thr:.0f}",
                     f"{light_thr / light_base - 1:+.1%}", f"{1e3 / light_thr:.2f}", str(log_lines[name])])
        print(rows[-1], flush=True)
    cmd = "python -m benchmarks.front_door " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        "## Front door: API keys + JSON logs + traces on vs all off (HTTP, concurrency "
        f"{args.concurrency})",
        "",
        f"Command: `{cmd.strip()}`. The demo model; {args.images} distinct {args.size[0]}x{args.size[1]} JPEGs; "
        f"`python -m service` on loopback (max batch 8), closed-loop asyncio httpx clients on the same machine; "
        f"{args.rounds} alternating rounds of {args.requests} requests per variant. {machine()}. The machine is "
        "shared with other sessions' test runs: the figures move by several percent from run to run.",
        "",
        "On: `MRCNN_API_KEYS` (each request sends `Authorization: Bearer`), `MRCNN_LOG_FORMAT=json`, "
        "`OTEL_TRACES_EXPORTER=console` (batch span processor, spans written to a file: "
        f"{spans} spans in all). Off: no keys, text logs, no tracing. Both log one line per request at INFO.",
        "",
        table(["variant", "requests", "img/s", "vs off", "p50 ms", "p95 ms", "p99 ms", "server total ms (median)",
               "GET /v1/model req/s", "vs off", "ms per request", "log lines"], rows),
        "",
        "The segmenting load is bound by ONNX Runtime (hundreds of ms per image on these 2 shared cores): the "
        f"front door's cost is below its noise. `GET /v1/model` ({args.light_requests} requests a round, same "
        "concurrency, no model behind it) shows the front door's own cost per request: key check, request ID, "
        "log line, server span.",
    ])
    if not args.no_write:
        write_section("front_door", body)
    print(body)


if __name__ == "__main__":
    main()
