"""Our ONNX graph in ONNX Runtime vs a PyTorch eager model doing the same work, side by side.

R-50-FPN (the default): the same random-weight model (torchvision's ``maskrcnn_resnet50_fpn`` state dict,
seed 0, batch-norm statistics calibrated on random images so activations have a trained network's scale)
is forced to 100 detections per image (score threshold 0). torchvision runs its transform, backbone, RPN and
RoI heads up to the 28x28 masks (no pasting); ours runs the exported graph. R-50-C4 (``--arch r50_c4``):
torchvision has no C4 model, so the graph is compared with our own PyTorch model in eager mode (the same
checkpoint: its body torchvision's calibrated random ResNet-50, loaded as ImageNet weights are, the rest
random; 300 proposals, the paper's C4 count), up to the 14x14 masks. Each engine lives in its own child
process (2 threads), so peak memory (max RSS) is each one's own, and the two take turns, one forward pass
each per round: this shared machine's speed drifts by 10% over minutes, and alternating makes every
round's ratio a fair one. The table gives the median and the range of those ratios, and the machine's load
average before and after the run (other work on the machine slows both engines, not their ratio alone).

    python -m benchmarks.export_speed [--rounds 7] [--arch r50_fpn|r50_c4]

Writes its table to benchmarks/RESULTS.md between the ``export_speed`` markers (``export_speed_r50_c4``
for R-50-C4).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import machine, write_section
from contract import OUTPUT_NAMES, pad_batch

THREADS = 2


class Benchmark(NamedTuple):
    name: str
    baseline: str  # the eager engine our graph ("ours", ONNX Runtime) is compared with
    masks: str
    section: str  # of RESULTS.md
    targets: str

    def eager(self, graph: Path) -> Path | None:
        """``engine_worker``'s path for the eager engine: torchvision's model, or ours from the graph's checkpoint."""
        return None if self.baseline == "torchvision" else checkpoint_path(graph)


BENCHMARKS = {
    "r50_fpn": Benchmark(
        "R-50-FPN", "torchvision", "28x28", "export_speed",
        " Targets: >= 1.7x at 800x1333; batch 4 no slower per image than batch 1.",
    ),
    "r50_c4": Benchmark("R-50-C4", "our PyTorch", "14x14", "export_speed_r50_c4", ""),
}
CASES = [("800x1333, batch 1", 800, 1333, 1), ("512x512, batch 4", 512, 512, 4)]
PER_IMAGE_BATCHES = (1, 4)


def _images(height: int, width: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)


def _torchvision_model(min_size: int):
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from tests.helpers import calibrate_batch_norms, random_images

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min_size, max_size=1333, box_score_thresh=0.0
    ).eval()
    calibrate_batch_norms(model.backbone.body, random_images(512))
    return model


def _torchvision_forward(height: int, width: int, batch: int):
    """A timed-ready call of torchvision eager up to the m x m masks; checks the forced 100 detections."""
    import torch

    model = _torchvision_model(min(height, width))
    images = [img.float() / 255 for img in _images(height, width, batch)]

    def forward():
        with torch.no_grad():
            transformed, _ = model.transform(images)
            features = model.backbone(transformed.tensors)
            proposals, _ = model.rpn(transformed, features)
            detections, _ = model.roi_heads(features, proposals, transformed.image_sizes)
        assert all(len(d["boxes"]) == 100 for d in detections)

    return forward


def _c4_checkpoint(path: Path) -> None:
    """A model.train-style R-50-C4 checkpoint: torchvision's random ResNet-50 (seed 0) calibrated on random
    images, loaded into the body and res5 as its ImageNet weights would be; the RPN and heads random."""
    import torch
    import torchvision

    from model import build_model
    from model.fine_tune import load_initial_weights, resolve_initial_weights
    from tests.helpers import calibrate_batch_norms, random_images

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    calibrate_batch_norms(resnet, random_images(512))
    model = build_model("r50_c4")
    torch.save(resnet.state_dict(), path.with_suffix(".resnet50.pth"))
    load_initial_weights(model, resolve_initial_weights(path.with_suffix(".resnet50.pth")))
    torch.save({"model": model.state_dict(), "config": {"arch": "r50_c4"}}, path)


def checkpoint_path(graph: Path) -> Path:
    return graph.with_suffix(".pt")


def export_graph(path: Path, arch: str, queue: mp.Queue) -> None:
    import torch

    from export.__main__ import main

    torch.set_num_threads(THREADS)
    ckpt = checkpoint_path(path)
    if arch == "r50_c4":
        _c4_checkpoint(ckpt)
    else:
        torch.save(_torchvision_model(800).state_dict(), ckpt)
    start = time.perf_counter()
    assert main(["--checkpoint", str(ckpt), "--out", str(path), "--score-threshold", "0"]) == 0
    elapsed = time.perf_counter() - start
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _eager_forward(checkpoint: Path, height: int, width: int, batch: int):
    """A timed-ready call of our PyTorch model (the graph's checkpoint) in eager mode on the graph's inputs."""
    import torch

    from model.checkpoint import load_model

    model = load_model(checkpoint, score_thresh=0.0).model
    images, sizes = (torch.from_numpy(a) for a in pad_batch(list(_images(height, width, batch).numpy())))

    def forward():
        with torch.no_grad():
            out = model(images, sizes)
        assert (out["num_detections"] == 100).all()

    return forward


def _onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_forward(session, height: int, width: int, batch: int):
    """A timed-ready call of the graph on ``batch`` padded random images; checks the forced 100 detections."""
    images, sizes = pad_batch(list(_images(height, width, batch).numpy()))
    feeds = {"images": images, "image_sizes": sizes}

    def forward():  # all outputs fetched, as the service does
        out = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feeds), strict=True))
        assert (out["num_detections"] == 100).all()

    return forward


def engine_worker(path: Path | None, case: tuple, conn: Connection) -> None:
    """A long-lived child running one engine: torchvision eager when ``path`` is None, the graph when it is
    an ``.onnx`` file, else our PyTorch model in eager mode from the checkpoint at ``path``. It builds the
    engine once, warms it up, then answers each request on ``conn`` with the seconds of one forward pass,
    and finally with its peak RSS in MiB."""
    import torch

    torch.set_num_threads(THREADS)
    _, height, width, batch = case
    if path is None:
        forward = _torchvision_forward(height, width, batch)
    elif path.suffix == ".onnx":
        forward = _onnx_forward(_onnx_session(path), height, width, batch)
    else:
        forward = _eager_forward(path, height, width, batch)
    forward()
    conn.send("ready")
    while conn.recv():
        start = time.perf_counter()
        forward()
        conn.send(time.perf_counter() - start)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def alternate(engines: dict[str, Path | None], case: tuple, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Engines (name -> ``engine_worker``'s path) alternating, one forward each per round, each in
    its own waiting child (only one runs at a time), so that all see the same machine and drift cancels
    in each round's ratios. Returns each engine's seconds per round and its peak RSS in MiB."""
    ctx = mp.get_context("spawn")
    pipes, children = {}, []
    for engine, path in engines.items():
        parent_end, child_end = ctx.Pipe()
        children.append(ctx.Process(target=engine_worker, args=(path, case, child_end)))
        children[-1].start()
        assert parent_end.recv() == "ready"  # built one after the other: peak memory is not shared
        pipes[engine] = parent_end
    times: dict[str, list[float]] = {engine: [] for engine in engines}
    for _ in range(rounds):
        for engine, conn in pipes.items():
            conn.send(True)
            times[engine].append(conn.recv())
    peak_mb = {}
    for (engine, conn), child in zip(pipes.items(), children, strict=True):
        conn.send(False)
        peak_mb[engine] = conn.recv()
        child.join()
    return times, peak_mb


def ratio_stats(slower: list[float], faster: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios slower / faster."""
    ratios = [s / f for s, f in zip(slower, faster, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def compare(path: Path, case: tuple, rounds: int, baseline: Path | None) -> dict:
    """The eager engine ``baseline`` (see ``engine_worker``) and ours alternating (see ``alternate``)."""
    times, peak_mb = alternate({"eager": baseline, "ours": path}, case, rounds)
    ratio, low, high = ratio_stats(times["eager"], times["ours"])
    return {
        "ms": {engine: statistics.median(t) * 1000 for engine, t in times.items()},
        "ratio": ratio,
        "ratio_range": (low, high),
        "peak_mb": peak_mb,
    }


def run_onnx_per_image(path: Path, repeats: int, queue: mp.Queue) -> None:
    """Ours at 512x512, batch 1 and batch 4 alternately in one process, so that both see the same load."""
    session = _onnx_session(path)
    calls = {batch: _onnx_forward(session, 512, 512, batch) for batch in PER_IMAGE_BATCHES}
    times: dict[int, list[float]] = {batch: [] for batch in PER_IMAGE_BATCHES}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(repeats):
        for batch, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[batch].append((time.perf_counter() - start) / batch)
    queue.put({b: statistics.median(t) * 1000 for b, t in times.items()})


def _in_child(target: Callable[..., None], *args: object) -> Any:
    """Run ``target(*args, queue)`` in a fresh process and return what it put on the queue (any picklable
    value: its type is the target's to say)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="forward passes per engine and case")
    parser.add_argument("--arch", choices=sorted(BENCHMARKS), default="r50_fpn")
    args = parser.parse_args()
    bench, load_before = BENCHMARKS[args.arch], _load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.arch}.onnx"
        export_s, export_mb = _in_child(export_graph, path, args.arch)
        for case in CASES:
            row = compare(path, case, args.rounds, bench.eager(path))
            rows.append((case, row))
            eager_ms, ort_ms = row["ms"]["eager"], row["ms"]["ours"]
            print(f"{case[0]}: {bench.baseline} {eager_ms:.0f} ms, ours {ort_ms:.0f} ms, speed-up {row['ratio']:.2f}x "
                  f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}x over {args.rounds} rounds)")
        per_image = _in_child(run_onnx_per_image, path, args.rounds)
        print(f"ours per image at 512x512: batch 1 {per_image[1]:.0f} ms, batch 4 {per_image[4]:.0f} ms")
    command = f"python -m benchmarks.export_speed --rounds {args.rounds}"
    command += "" if args.arch == "r50_fpn" else f" --arch {args.arch}"
    lines = [
        f"## Export: our ONNX graph (ONNX Runtime) vs {bench.baseline} eager, {bench.name}, 100 detections per image",
        "",
        f"Command: `{command}` ({THREADS} threads; {machine()}). {bench.baseline} eager and ours take turns, one "
        f"forward pass each per round, up to the {bench.masks} masks; ms are medians over the rounds, speed-up the "
        f"median of the rounds' ratios with their range. Export (load, trace, verify): {export_s:.0f} s, peak RSS "
        f"{export_mb:.0f} MiB. Load average of the machine before / after the run: {load_before}, {_load()}.",
        "",
        f"| case | {bench.baseline} eager ms | ours (ORT) ms | speed-up | range | per image: eager / ours ms "
        "| peak RSS eager / ours MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (case_name, _, _, batch), row in rows:
        eager_ms, ort_ms = row["ms"]["eager"], row["ms"]["ours"]
        low, high = row["ratio_range"]
        lines.append(
            f"| {case_name} | {eager_ms:.0f} | {ort_ms:.0f} | {row['ratio']:.2f}x | {low:.2f}-{high:.2f}x | "
            f"{eager_ms / batch:.0f} / {ort_ms / batch:.0f} | "
            f"{row['peak_mb']['eager']:.0f} / {row['peak_mb']['ours']:.0f} |"
        )
    lines += [
        "",
        f"Ours per image at 512x512, batch 1 and batch 4 alternating in one process (median of "
        f"{args.rounds}): batch 1 {per_image[1]:.0f} ms, batch 4 {per_image[4]:.0f} ms per image "
        f"({per_image[1] / per_image[4]:.2f}x the throughput of batch 1).{bench.targets}",
    ]
    write_section(bench.section, "\n".join(lines))


if __name__ == "__main__":
    main()
