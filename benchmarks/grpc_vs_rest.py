"""The Open Inference Protocol over REST (binary tensor extension) vs over gRPC, on one server.

One ``python -m service`` (the demo model by default) serves both doors; tritonclient's asyncio clients
(``tritonclient.http.aio``, ``tritonclient.grpc.aio``) send the same JPEGs as IMAGE and ask for the same
default outputs (boxes, scores, labels, class_names, masks), in a closed loop at each concurrency.
Reported per door and concurrency: throughput, p50/p99 latency, and the server process's CPU seconds per
request (its user + system time from /proc, so the clients' CPU is not counted). Rounds alternate which
door goes first, so that a slow spell of a shared machine does not fall on one door only.

Run: ``python -m benchmarks.grpc_vs_rest`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from benchmarks import machine, table, write_section
from benchmarks.serve_load import batch_stats, free_port, images, jpeg, percentile, server_env, start_server
from service.core.settings import DEFAULT_MODEL_PATH

OUTPUTS = ("boxes", "scores", "labels", "class_names", "masks")
DOORS = ("REST v2 binary", "gRPC")
Infer = Callable[[bytes], Awaitable[None]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def rest_infer(url: str, model: str) -> tuple[Infer, Callable[[], Awaitable[None]]]:
    import tritonclient.http.aio as httpclient

    client = httpclient.InferenceServerClient(url, conn_timeout=3600)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS]

    async def infer(body: bytes) -> None:
        image = httpclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([body], dtype=object), binary_data=True)
        result = await client.infer(model, [image], outputs=outputs, timeout=3600)
        assert result.as_numpy("scores") is not None

    return infer, client.close


async def grpc_infer(url: str, model: str) -> tuple[Infer, Callable[[], Awaitable[None]]]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    async def infer(body: bytes) -> None:
        image = grpcclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([body], dtype=object))
        result = await client.infer(model, [image], outputs=outputs, client_timeout=3600)
        assert result.as_numpy("scores") is not None

    return infer, client.close


async def closed_loop(infer: Infer, bodies: list[bytes], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """``concurrency`` clients, each sending its next request when the last is answered: wall time, latencies."""
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await infer(bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def measure(args: argparse.Namespace, pid: int, http_url: str, grpc_url: str, model: str,
                  bodies: list[bytes]) -> dict[tuple[str, int], dict[str, list[float]]]:
    clients = {"REST v2 binary": await rest_infer(http_url, model), "gRPC": await grpc_infer(grpc_url, model)}
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        for infer, _ in clients.values():  # warm both paths (connections, first allocations)
            await closed_loop(infer, bodies, 4, 8)
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                requests = args.requests_per_client * concurrency if concurrency > 1 else args.requests_alone
                order = DOORS if round_ % 2 == 0 else DOORS[::-1]
                for door in order:
                    infer = clients[door][0]
                    cpu, batches = cpu_seconds(pid), batch_stats("http://" + http_url)
                    wall, latencies = await closed_loop(infer, bodies, concurrency, requests)
                    cpu, after = cpu_seconds(pid) - cpu, batch_stats("http://" + http_url)
                    entry = results.setdefault((door, concurrency), {"wall": [], "lat": [], "cpu": [], "n": [],
                                                                      "batches": [], "images": []})
                    entry["wall"].append(wall)
                    entry["lat"].extend(latencies)
                    entry["cpu"].append(cpu)
                    entry["n"].append(requests)
                    entry["batches"].append(after[0] - batches[0])
                    entry["images"].append(after[1] - batches[1])
                    print(f"round {round_ + 1} {door:15} c={concurrency:<3} {requests / wall:6.2f} req/s "
                          f"cpu {cpu / requests * 1000:6.1f} ms/req", flush=True)
    finally:
        for _, close in clients.values():
            await close()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grpc_vs_rest", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-alone", type=int, default=24, help="requests per round at concurrency 1")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per client and round above 1")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--section", default="grpc_vs_rest", help="RESULTS.md section to (re)write")
    args = p.parse_args(argv)

    from service.core.runtime import OnnxModel

    info = OnnxModel(args.model).metadata
    bodies = [jpeg(im) for im in images(16, (480, 640))]
    port, grpc_port = free_port(), free_port()
    env = server_env(8, 5.0, max(args.concurrency)) | {"MRCNN_GRPC_PORT": str(grpc_port)}
    proc = start_server(args.model, port, env)
    try:
        results = asyncio.run(measure(args, proc.pid, f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}",
                                      info.model_name, bodies))
    finally:
        proc.terminate()
        proc.wait(60)

    rows = []
    for concurrency in args.concurrency:
        for door in DOORS:
            r = results[door, concurrency]
            n = sum(r["n"])
            rows.append([door, str(concurrency), str(n), f"{n / sum(r['wall']):.2f}",
                         f"{percentile(r['lat'], 50) * 1000:.0f}", f"{percentile(r['lat'], 99) * 1000:.0f}",
                         f"{sum(r['cpu']) / n * 1000:.1f}", f"{sum(r['images']) / max(sum(r['batches']), 1):.2f}"])
    command = "python -m benchmarks.grpc_vs_rest" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    body = "\n".join([
        "## The Open Inference Protocol: REST v2 binary vs gRPC",
        "",
        f"Command: `{command}`. Model {info.model_name} {info.model_version} ({info.architecture}); 16 distinct "
        "480x640 JPEGs sent as IMAGE, the default outputs (boxes, scores, labels, class_names, masks) asked in "
        "binary; one `python -m service` serving both doors (max batch 8, max wait 5 ms); tritonclient's "
        f"asyncio clients (http.aio, grpc.aio) in a closed loop on the same machine; {args.rounds} rounds, the "
        f"doors' order alternating. {machine()}. CPU s/request: the server process's user + system time "
        "divided by the requests (clients not counted). The machine was shared with other sessions' work "
        "while this ran: compare the two doors within this table, not with other tables.",
        "",
        table(["door", "concurrency", "requests", "req/s", "p50 ms", "p99 ms", "server CPU ms/request",
               "mean batch"], rows),
    ])
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
