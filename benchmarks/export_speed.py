"""Our ONNX graph in ONNX Runtime vs torchvision eager, doing the same work, side by side.

The same random-weight R-50-FPN (torchvision's ``maskrcnn_resnet50_fpn`` state dict, seed 0, batch-norm
statistics calibrated on random images so activations have a trained network's scale) is forced
to 100 detections per image (score threshold 0). torchvision runs its transform, backbone, RPN and RoI
heads up to the 28x28 masks (no pasting); ours runs the exported graph. Each engine lives in its own
child process (2 threads), so peak memory (max RSS) is each one's own, and the two take turns, one
forward pass each per round: this shared machine's speed drifts by 10% over minutes, and alternating
makes every round's ratio a fair one. The table gives the median and the range of those ratios.

    python -m benchmarks.export_speed [--rounds 7]

Writes its table to benchmarks/RESULTS.md between the ``export_speed`` markers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchmarks import machine, write_section
from contract import OUTPUT_NAMES, pad_batch

THREADS = 2
CASES = [("800x1333, batch 1", 800, 1333, 1), ("512x512, batch 4", 512, 512, 4)]
PER_IMAGE_BATCHES = (1, 4)


def _images(height: int, width: int, batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)


def _torchvision_model(min_size: int):
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from model.backbone import calibrate_batch_norms, random_images

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


def export_graph(path: Path, queue: mp.Queue) -> None:
    import torch

    from export.__main__ import main

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tv.pth"
        torch.save(_torchvision_model(800).state_dict(), ckpt)
        start = time.perf_counter()
        assert main(["--checkpoint", str(ckpt), "--out", str(path), "--score-threshold", "0"]) == 0
        elapsed = time.perf_counter() - start
    queue.put((elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


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
    """A long-lived child running one engine (torchvision eager when ``path`` is None, else the graph at
    ``path``): builds it once, warms it up, then answers each request on ``conn`` with the seconds of one
    forward pass, and finally with its peak RSS in MiB."""
    import torch

    torch.set_num_threads(THREADS)
    _, height, width, batch = case
    if path is None:
        forward = _torchvision_forward(height, width, batch)
    else:
        forward = _onnx_forward(_onnx_session(path), height, width, batch)
    forward()
    conn.send("ready")
    while conn.recv():
        start = time.perf_counter()
        forward()
        conn.send(time.perf_counter() - start)
    conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def alternate(engines: dict[str, Path | None], case: tuple, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Engines (name -> graph path, None for torchvision) alternating, one forward each per round, each in
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


def compare(path: Path, case: tuple, rounds: int) -> dict:
    """torchvision and ours alternating (see ``alternate``)."""
    times, peak_mb = alternate({"torchvision": None, "ours": path}, case, rounds)
    ratio, low, high = ratio_stats(times["torchvision"], times["ours"])
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


def _in_child(target, *args) -> object:
    """Run ``target(*args, queue)`` in a fresh process and return what it put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="forward passes per engine and case")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r50.onnx"
        export_s, export_mb = _in_child(export_graph, path)
        for case in CASES:
            row = compare(path, case, args.rounds)
            rows.append((case, row))
            tv_ms, ort_ms = row["ms"]["torchvision"], row["ms"]["ours"]
            print(f"{case[0]}: torchvision {tv_ms:.0f} ms, ours {ort_ms:.0f} ms, speed-up {row['ratio']:.2f}x "
                  f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}x over {args.rounds} rounds)")
        per_image = _in_child(run_onnx_per_image, path, args.rounds)
        print(f"ours per image at 512x512: batch 1 {per_image[1]:.0f} ms, batch 4 {per_image[4]:.0f} ms")
    lines = [
        "## Export: our ONNX graph (ONNX Runtime) vs torchvision eager, R-50-FPN, 100 detections per image",
        "",
        f"Command: `python -m benchmarks.export_speed --rounds {args.rounds}` ({THREADS} threads; {machine()}). "
        "torchvision and ours take turns, one forward pass each per round; ms are medians over the rounds, "
        "speed-up the median of the rounds' ratios with their range. Export (load, trace, verify): "
        f"{export_s:.0f} s, peak RSS {export_mb:.0f} MiB.",
        "",
        "| case | torchvision eager ms | ours (ORT) ms | speed-up | range | per image: tv / ours ms "
        "| peak RSS tv / ours MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, _, _, batch), row in rows:
        tv_ms, ort_ms = row["ms"]["torchvision"], row["ms"]["ours"]
        low, high = row["ratio_range"]
        lines.append(
            f"| {name} | {tv_ms:.0f} | {ort_ms:.0f} | {row['ratio']:.2f}x | {low:.2f}-{high:.2f}x | "
            f"{tv_ms / batch:.0f} / {ort_ms / batch:.0f} | "
            f"{row['peak_mb']['torchvision']:.0f} / {row['peak_mb']['ours']:.0f} |"
        )
    lines += [
        "",
        f"Ours per image at 512x512, batch 1 and batch 4 alternating in one process (median of "
        f"{args.rounds}): batch 1 {per_image[1]:.0f} ms, batch 4 {per_image[4]:.0f} ms per image "
        f"({per_image[1] / per_image[4]:.2f}x the throughput of batch 1). Targets: >= 1.7x at 800x1333; "
        "batch 4 no slower per image than batch 1.",
    ]
    write_section("export_speed", "\n".join(lines))


if __name__ == "__main__":
    main()
