"""The production front door's cost: the real server (``python -m service``, loopback) at concurrency 16 with
API keys + JSON logs + OpenTelemetry traces (console exporter) on, against the same server with all of them
off, side by side, and each of the three alone.

The servers run one after the other, in alternating rounds (off, keys, ..., all on, off, ...), so that the
drift of a shared machine's background load falls on all. Both log at INFO to a file (the per-request line
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
from benchmarks.serve_load import free_port, images, jpeg, load, percentile, start_server
from service.core.settings import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
KEY = "benchmark-key-0123456789abcdef"
KEYS = {"MRCNN_API_KEYS": KEY}
JSON_LOGS = {"MRCNN_LOG_FORMAT": "json"}
TRACES = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mrcnn-benchmark"}
VARIANTS = {
    "all off": {},
    "keys": KEYS,
    "JSON logs": JSON_LOGS,
    "traces (console)": TRACES,
    "keys + JSON logs + traces": KEYS | JSON_LOGS | TRACES,
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat): on a shared machine a steadier measure of
    the work a request costs than the wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(model: Path, port: int, env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    """The server with ``env`` on top of the load-test settings, logging at INFO (the log line per request is
    part of what is measured), its stdout (spans) and stderr (logs) in ``out``.*; returns once ready."""
    settings = {"MRCNN_MAX_BATCH_SIZE": "8", "MRCNN_QUEUE_CAPACITY": "64", "MRCNN_REQUEST_TIMEOUT_S": "3600"}
    return start_server(model, port, settings | env, log_level="info", output=out)


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
    p.add_argument("--requests", type=int, default=64, help="requests per round")
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
    cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
    light_cpu: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
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
                    cpu0 = cpu_seconds(server.pid)
                    wall, lat, served = asyncio.run(load(url, bodies, args.concurrency, args.requests, params,
                                                         headers))
                    cpu1 = cpu_seconds(server.pid)
                    light_walls[name] += asyncio.run(light_load(url, "/v1/model", args.concurrency,
                                                                args.light_requests, headers))
                    cpu[name] += cpu1 - cpu0
                    light_cpu[name] += cpu_seconds(server.pid) - cpu1
                finally:
                    server.terminate()
                    server.wait(60)
                walls[name] += wall
                latencies[name] += lat
                server_ms[name] += [t["total_ms"] for t in served]
                print(name, f"{args.requests / wall:.2f} img/s", flush=True)
        spans = sum(1 for f in Path(folder).glob("*.stdout") for line in f.open() if line.startswith('    "name":'))
        log_bytes = {name: (Path(folder) / f"{name.replace(' ', '_')}.stderr").stat().st_size for name in VARIANTS}

    total, light = args.rounds * args.requests, args.rounds * args.light_requests
    rows = []
    base, light_base = total / walls["all off"], light / light_walls["all off"]
    for name in VARIANTS:
        thr, lat, light_thr = total / walls[name], latencies[name], light / light_walls[name]
        rows.append([name, str(total), f"{thr:.2f}", f"{thr / base - 1:+.1%}", f"{percentile(lat, 50) * 1e3:.0f}",
                     f"{percentile(lat, 95) * 1e3:.0f}", f"{percentile(lat, 99) * 1e3:.0f}",
                     f"{statistics.median(server_ms[name]):.1f}", f"{cpu[name] / total * 1e3:.0f}",
                     f"{light_thr:.0f}", f"{light_thr / light_base - 1:+.1%}",
                     f"{light_cpu[name] / light * 1e3:.2f}", f"{log_bytes[name] / (total + light):.0f}"])
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
        "keys: `MRCNN_API_KEYS` (each request sends `Authorization: Bearer`); JSON logs: `MRCNN_LOG_FORMAT=json`; "
        "traces: `OTEL_TRACES_EXPORTER=console` (batch span processor, the console exporter's indented JSON "
        f"written to a file: {spans} spans in all). Off: no keys, text logs, no tracing. All log one line per "
        "request at INFO.",
        "",
        table(["variant", "requests", "img/s", "vs off", "p50 ms", "p95 ms", "p99 ms", "server total ms (median)",
               "server CPU ms / image", "GET /v1/model req/s", "vs off", "server CPU ms / GET",
               "log bytes / request"], rows),
        "",
        "The segmenting load is bound by ONNX Runtime (hundreds of ms per image on these 2 shared cores): the "
        f"front door's cost is below its noise. `GET /v1/model` ({args.light_requests} requests a round, same "
        "concurrency, no model behind it) shows the front door's own cost per request: key check, request ID, "
        "log line, server span. Server CPU: the server process's user + system time over the load "
        "(/proc/PID/stat), divided by the requests; steadier than the wall time on a shared machine.",
    ])
    if not args.no_write:
        write_section("front_door", body)
    print(body)


if __name__ == "__main__":
    main()
