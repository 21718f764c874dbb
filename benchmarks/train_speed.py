"""One training step, ours against torchvision's: R-50-FPN in train mode, the same weights, batch of images
and targets, and RoI sampling settings (512 RoIs per image, 1:3; 256 anchors per image, 1:1; 2000 proposals),
forward + backward + SGD, alternating engines; our RoIAlign forward + backward against torchvision.ops.roi_align
at the FPN levels' shapes; our step in float32 against bf16 autocast; and where our step's time goes.

Run: ``python -m benchmarks.train_speed`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks import machine, table, write_section

SETTINGS = [("800x1333, batch 1", (800, 1333), 1), ("512x512, batch 2", (512, 512), 2)]
INSTANCES = 8
CHANGED = (
    "What the profile changed. Convolutions are three quarters of the step, and in torchvision's NCHW layout "
    "oneDNN reorders every input and gradient into its own: model.train builds the model channels-last "
    "(TrainConfig.channels_last), which pays most at 800x1333, where the maps are largest. Of the rest: RoIAlign's "
    "backward was grid_sample's, a scatter of every sample of every channel; the op is now one sparse product per "
    "image each way (model/roi_align.py), its gradients bit-equal to torchvision's. replicate_edges wrote P2 anew "
    "twice, and its gradient four more times, on maps no image is padded in; eager mode leaves those alone. The "
    "RPN's balanced sampling ranked all 267k anchors with two argsorts, twice; a topk of 256 picks the same ones. "
    "Before those: torchvision's transform had been left at min_size 512 (it trained on 512x853 images at "
    "'800x1333'), the padding masks now broadcast from [B, 1, H, W] and skip unpadded maps in eager mode, and the "
    "bottleneck's residual is added in place, as torchvision's."
)


def batch(size: tuple[int, int], n: int, seed: int = 0):
    """``n`` random images of ``size`` with ``INSTANCES`` rectangles each as ground truth."""
    rng = np.random.default_rng(seed)
    h, w = size
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8))
    targets = []
    for _ in range(n):
        x0, y0 = rng.uniform(0, w * 0.7, INSTANCES), rng.uniform(0, h * 0.7, INSTANCES)
        bw, bh = rng.uniform(32, w * 0.3, INSTANCES), rng.uniform(32, h * 0.3, INSTANCES)
        boxes = torch.tensor(np.stack([x0, y0, x0 + bw, y0 + bh], 1), dtype=torch.float32)
        masks = torch.zeros((INSTANCES, h, w), dtype=torch.uint8)
        for k, (a, b, c, d) in enumerate(boxes.round().long().tolist()):
            masks[k, b:d, a:c] = 1
        targets.append({"boxes": boxes, "labels": torch.from_numpy(rng.integers(1, 91, INSTANCES)), "masks": masks})
    return images, targets


def models():
    """torchvision's maskrcnn_resnet50_fpn (random weights: trainable batch norms, all stages trained) as it
    ships and in channels-last, and our r50_fpn with its state dict in the layout model.train builds it in
    (TrainConfig.channels_last)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from model import build_model
    from model.train import TrainConfig, memory_format

    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = build_model("r50_fpn", norm="bn")
    ours.load_state_dict(tv.state_dict())
    ours.to(memory_format=memory_format(TrainConfig()))
    tv_nhwc = copy.deepcopy(tv).to(memory_format=torch.channels_last)
    return tv.train(), tv_nhwc.train(), ours.train()


def keep_size(tv, size: tuple[int, int]) -> None:
    """Make torchvision's transform resize ``size`` by exactly 1 (its default, 800 / 1333, would scale a
    512x512 image up), so that both models see the same pixels."""
    tv.transform.min_size, tv.transform.max_size = (min(size),), max(size)


def speed_up(rounds: dict[str, list[float]], theirs: str) -> list[str]:
    """Ours against ``theirs``: the ratio of the medians, and the range of the rounds' own ratios."""
    ratios = [t / o for o, t in zip(rounds["ours"], rounds[theirs], strict=True)]
    medians = statistics.median(rounds[theirs]) / statistics.median(rounds["ours"])
    return [f"{medians:.2f}x", f"{min(ratios):.2f}x-{max(ratios):.2f}x"]


def step_fn(model, images, targets, ours: bool, amp: torch.dtype | None = None) -> Callable[[], None]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    sizes = torch.tensor([images.shape[-2:]] * len(images))
    floats = [im.float() / 255 for im in images]

    def step() -> None:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            losses = model(images, sizes, targets) if ours else model(floats, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def timed_rounds(fns: dict[str, Callable[[], None]], rounds: int, warm_up: int = 2) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run in turn after ``warm_up`` untimed rounds (a
    training step's first runs are slower while the allocator and oneDNN's kernel caches settle)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(warm_up):
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
    return times


def alternate(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each function over ``timed_rounds``."""
    return {name: statistics.median(t) for name, t in timed_rounds(fns, rounds).items()}


def roi_align_rows(rounds: int) -> list[list[str]]:
    """Forward + backward of 512 RoIs per FPN level at 800x1344, ours vs torchvision.ops.roi_align."""
    from torchvision.ops import roi_align as tv_roi_align

    from model.roi_align import roi_align

    rows = []
    rng = np.random.default_rng(1)
    for level, stride in enumerate((4, 8, 16, 32), start=2):
        h, w = 800 // stride, 1344 // stride
        features = torch.randn(2, 256, h, w, requires_grad=True)
        x0, y0 = rng.uniform(0, 1000, 512), rng.uniform(0, 600, 512)
        side = rng.uniform(32, 300, 512)
        rois = torch.tensor(np.stack([rng.integers(0, 2, 512), x0, y0, x0 + side, y0 + side], 1), dtype=torch.float32)

        def run(fn, features=features, rois=rois, stride=stride) -> Callable[[], None]:
            def once() -> None:
                features.grad = None
                fn(features, rois, 1 / stride, 7, 7, 2, False).sum().backward()

            return once

        ours = lambda f, r, s, ph, pw, ratio, al: roi_align(f, r, s, ph, pw, ratio, al)  # noqa: E731
        theirs = lambda f, r, s, ph, pw, ratio, al: tv_roi_align(f, r, (ph, pw), s, ratio, al)  # noqa: E731
        t = alternate({"ours": run(ours), "torchvision": run(theirs)}, rounds)
        rows.append([f"P{level} {h}x{w}", f"{1000 * t['ours']:.1f}", f"{1000 * t['torchvision']:.1f}",
                     f"{t['torchvision'] / t['ours']:.2f}x"])
    return rows


def profile_rows(model, images, targets) -> str:
    """Our step's time by operator (self CPU time), from torch.profiler."""
    step = step_fn(model, images, targets, ours=True)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    tv, tv_nhwc, ours = models()
    step_rows = []
    for name, size, n in SETTINGS:
        images, targets = batch(size, n)
        keep_size(tv, size)
        keep_size(tv_nhwc, size)
        fns = {"ours": step_fn(ours, images, targets, True), "torchvision": step_fn(tv, images, targets, False),
               "torchvision NHWC": step_fn(tv_nhwc, images, targets, False)}
        rounds = timed_rounds(fns, args.rounds)
        t = {engine: f"{statistics.median(times):.2f}" for engine, times in rounds.items()}
        step_rows.append([name, t["ours"], t["torchvision"], *speed_up(rounds, "torchvision"),
                          t["torchvision NHWC"], *speed_up(rounds, "torchvision NHWC")])
        print(step_rows[-1], flush=True)
    images, targets = batch((512, 512), 2)
    amp = alternate({"float32": step_fn(ours, images, targets, True),
                     "bf16": step_fn(ours, images, targets, True, torch.bfloat16)}, args.rounds)
    roi_rows = roi_align_rows(max(args.rounds, 5))
    profile = profile_rows(ours, images, targets)
    body = "\n\n".join([
        "## Training step: our R-50-FPN vs torchvision's maskrcnn_resnet50_fpn",
        f"Command: `python -m benchmarks.train_speed --rounds {args.rounds}`. {machine()}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. Same weights (torchvision's random init loaded "
        f"into ours; trainable batch norms, every stage trained), same images and {INSTANCES} instances per image, "
        "same sampling settings; forward + backward + SGD step; medians over alternating rounds after two warm-up "
        "rounds. torchvision's transform is set to scale by exactly 1 at each size (min_size, max_size = the "
        "image's sides); ours takes the padded uint8 batch. Ours runs channels-last, as model.train builds it "
        "(TrainConfig.channels_last, the default); torchvision as it ships (contiguous NCHW) and, for the same "
        "layout, with its model moved to channels-last too.",
        table(["input", "ours s", "torchvision s", "speed-up", "each round's", "torchvision channels-last s",
               "speed-up", "each round's"], step_rows),
        "Our step in float32 vs bf16 autocast (512x512, batch 2; RoIAlign, box decoding and losses in float32):",
        table(["precision", "s per step", "vs float32"],
              [[k, f"{v:.2f}", f"{amp['float32'] / v:.2f}x"] for k, v in amp.items()]),
        "RoIAlign forward + backward, 512 RoIs over 2 images, 256 channels, 7x7, sampling ratio 2:",
        table(["level", "ours ms", "torchvision ms", "speed-up"], roi_rows),
        "Where our step goes (512x512, batch 2, float32; torch.profiler, self CPU time):",
        "```\n" + profile + "\n```",
        CHANGED,
    ])
    print(body)
    if not args.no_write:
        write_section("train_speed", body)


if __name__ == "__main__":
    main()
