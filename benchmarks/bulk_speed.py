"""Images/s over a data set, four ways side by side: the HTTP server at concurrency 16 through the Python
client (service/client.py), the local bulk job, and the bulk job on a Ray cluster of one node and of two
nodes started on this machine (same CPUs in all: one node with all of them, or two with half each).

Every way segments the same JPEG files with the same model and options (RLE masks); the server's figure
excludes its start-up, the bulk jobs' figures are their own ``this_run.images_per_s`` (summary.json: from
the listing to the last record, Ray's connection and actor start-up included).

Run: ``python -m benchmarks.bulk_speed --model models/demo/model.onnx`` (writes its section of
benchmarks/RESULTS.md; needs the ray extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import machine, table, write_section
from benchmarks.serve_load import free_port, images, jpeg, server_env, start_server
from bulk.records import SUMMARY
from service.client import SegmentClient
from service.core.settings import DEFAULT_MODEL_PATH

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def display(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it."""
    return str(path.absolute().relative_to(ROOT)) if path.absolute().is_relative_to(ROOT) else str(path)


def write_images(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images(n, size)):
        paths.append(folder / f"{i:04d}.jpg")
        paths[-1].write_bytes(jpeg(img))
    return paths


def through_server(model: Path, paths: list[Path], concurrency: int, batch_size: int) -> float:
    """Images/s of the server (its own batching) answering ``concurrency`` client threads."""
    port = free_port()
    server = start_server(model, port, server_env(batch_size, 5.0, concurrency))
    try:
        client = SegmentClient(f"http://127.0.0.1:{port}", timeout=3600)
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda p: client.request(p, formats="rle"), paths))
        return len(paths) / (time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(60)


def bulk_job(model: Path, folder: Path, out: Path, *options: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRCNN_")} | {"PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "bulk", str(folder), "--out", str(out), "--model", str(model), "--quiet",
                    *options], env=env, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    return float(json.loads((out / SUMMARY).read_text())["this_run"]["images_per_s"])


def on_ray(model: Path, folder: Path, out: Path, nodes: int, batch_size: int) -> float:
    """The bulk job on a fresh local Ray cluster of ``nodes`` nodes sharing this machine's CPUs."""
    cpus = max(1, (os.cpu_count() or 1) // nodes)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    temp_dir, port = tempfile.mkdtemp(prefix="ray", dir="/tmp"), free_port()
    common = ["--num-cpus", str(cpus), "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True)
        for _ in range(nodes - 1):
            subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *common], env=env, check=True,
                           capture_output=True)
        return bulk_job(model, folder, out, "--ray", f"127.0.0.1:{port}", "--batch-size", str(batch_size))
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bulk_speed", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="the server's max batch size and the jobs' batches")
    p.add_argument("--no-write", action="store_true", help="print the section without writing RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bulk_speed") as tmp:
        work = Path(tmp)
        paths = write_images(work / "images", args.images, tuple(args.size))
        batch = ["--batch-size", str(args.batch_size)]
        cpus = os.cpu_count() or 1
        rows = [
            [f"HTTP server, {args.concurrency} client threads (service/client.py)",
             f"{through_server(args.model, paths, args.concurrency, args.batch_size):.2f}"],
            ["bulk job, local (one process)", f"{bulk_job(args.model, work / 'images', work / 'local', *batch):.2f}"],
            [f"bulk job, Ray, 1 node x {cpus} CPUs",
             f"{on_ray(args.model, work / 'images', work / 'ray1', 1, args.batch_size):.2f}"],
            [f"bulk job, Ray, 2 nodes x {max(1, cpus // 2)} CPU",
             f"{on_ray(args.model, work / 'images', work / 'ray2', 2, args.batch_size):.2f}"],
        ]
    cmd = "python -m benchmarks.bulk_speed " + shlex.join(argv if argv is not None else sys.argv[1:])
    body = "\n".join([
        "## A data set, four ways: HTTP server vs bulk job, local and on Ray",
        "",
        f"Command: `{cmd.strip()}`. {args.images} JPEGs of {args.size[0]}x{args.size[1]}, model {args.model}, "
        f"RLE masks, batches of {args.batch_size}. {machine()}. The machine is shared with other sessions "
        "working at the same time: the figures are one run under that load, compare them with each other only.",
        "",
        table(["way", "images/s"], rows),
        "",
        "The two Ray rows run on the same CPUs as the others: two Ray nodes on this machine cannot beat one "
        "(they split the same cores and add Ray's scheduling, object store and actor start-up, included in "
        "the figure), nor the local job. What they show is that the same command runs unchanged on a cluster "
        "of two nodes, and keeps going when one dies (tests/test_bulk_ray.py); on real machines each node "
        "brings its own cores. On these two cores the model's own compute dominates every row, and the "
        "server's HTTP and JSON cost is small beside it: the local job about matches the server here; what it "
        "adds is no server to run, COCO files and resuming.",
    ])
    print(body)
    if not args.no_write:
        write_section("bulk_speed", body)


if __name__ == "__main__":
    main()
