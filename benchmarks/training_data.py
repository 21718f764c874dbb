"""What the training data path costs: peak memory of one 12-megapixel photo with 100 instances, masks decoded
at the image's size (the loader before masks were kept within their boxes) vs within the boxes (now); and
the share of padded pixels in batches of mixed portrait and landscape images, without and with
aspect-ratio grouping.

Run: ``python -m benchmarks.training_data`` (writes its section of benchmarks/RESULTS.md). Each memory
figure is the peak RSS of a fresh process that loads and prepares the one image (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import machine, table, write_section
from contract import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE

HEIGHT, WIDTH, INSTANCES = 3000, 4000, 100
MIN_SIZE, MAX_SIZE = DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE  # the contract's input size policy


def write_photo(root: Path) -> None:
    """A 4000x3000 JPEG with 100 polygon instances (ellipses of 40-400 px) in COCO format."""
    import cv2

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "photo.jpg"), rng.integers(0, 255, (HEIGHT, WIDTH, 3), np.uint8))
    anns = []
    for i in range(INSTANCES):
        r = rng.uniform(20, 200)
        cx, cy = rng.uniform(r, WIDTH - r), rng.uniform(r, HEIGHT - r)
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        xs, ys = cx + r * np.cos(t), cy + 0.6 * r * np.sin(t)
        poly = np.stack([xs, ys], 1).ravel().round(1).tolist()
        box = [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [poly],
                     "bbox": box, "area": box[2] * box[3]})
    data = {"images": [{"id": 1, "file_name": "photo.jpg", "width": WIDTH, "height": HEIGHT}],
            "annotations": anns, "categories": [{"id": 1, "name": "blob"}]}
    (root / "instances.json").write_text(json.dumps(data))


def load_once(root: str, way: str) -> None:
    """In a fresh process: load and prepare the photo one way, print peak RSS in MiB."""
    import torch
    import torch.nn.functional as F

    from contract import resized_size
    from model.data.coco import CocoDataset, prepare, resize_image

    dataset = CocoDataset(root)
    size = resized_size(HEIGHT, WIDTH, MIN_SIZE, MAX_SIZE)
    if way == "none (image only)":  # the floor: Python, torch, the photo decoded and resized
        resize_image(dataset.read_image(dataset.image_ids[0]), size)
    elif way == "full-size":  # what the loader did before: every mask at 4000x3000, resized as float32
        anns = dataset.coco.imgToAnns[dataset.image_ids[0]]
        masks = np.stack([dataset.coco.annToMask(a) for a in anns])
        resize_image(dataset.read_image(dataset.image_ids[0]), size)
        out = F.interpolate(torch.from_numpy(masks)[None].float(), size=size, mode="bilinear", align_corners=False)
        assert (out[0] >= 0.5).shape[0] == INSTANCES
    else:
        assert prepare(dataset.load(0), MIN_SIZE, MAX_SIZE).target["masks"].shape[0] == INSTANCES
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss(root: Path, way: str) -> float:
    code = f"from benchmarks.training_data import load_once; load_once({str(root)!r}, {way!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def padded_fraction(factor: int, batch_size: int = 4, steps: int = 500) -> float:
    """Padded pixels / batch pixels over ``steps`` batches of the shapes stream (sides 256-640: portrait
    and landscape mixed), resized as training resizes them (short side 800, long side at most 1333)."""
    from contract import SIZE_DIVISIBILITY, resized_size
    from model.data.sampler import ResumableSampler, aspect_ratio_groups
    from model.data.shapes import ShapesDataset

    source = ShapesDataset(2000, seed=1)
    sizes = [resized_size(*source.image_size(i), MIN_SIZE, MAX_SIZE) for i in range(len(source))]
    sampler = iter(ResumableSampler(aspect_ratio_groups(sizes, factor), batch_size, seed=0))
    padded = real = 0
    for _ in range(steps):
        batch = [sizes[i % len(sizes)] for i in next(sampler)]
        h = -(-max(s[0] for s in batch) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        w = -(-max(s[1] for s in batch) // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY
        padded += h * w * len(batch)
        real += sum(a * b for a, b in batch)
    return 1 - real / padded


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_photo(Path(tmp))
        memory = {way: peak_rss(Path(tmp), way) for way in ("none (image only)", "full-size", "within boxes")}
    padding = {factor: padded_fraction(factor) for factor in (0, 3)}
    body = "\n\n".join([
        "## Training data: mask memory and padding",
        f"Command: `python -m benchmarks.training_data`. {machine()}.",
        f"One {WIDTH}x{HEIGHT} JPEG with {INSTANCES} polygon instances, loaded and prepared for training at "
        f"{MIN_SIZE}/{MAX_SIZE}; peak RSS of a fresh process (Python, torch and the image included).",
        table(["masks decoded", "peak RSS MiB"], [[k, f"{v:.0f}"] for k, v in memory.items()]),
        "Padded share of the batch tensor, 500 batches of 4 from the shapes stream (sides 256-640, portrait and "
        "landscape mixed), resized to 800/1333 and padded to multiples of 32:",
        table(["aspect_ratio_group_factor", "padded pixels"],
              [[f"{k}" + (" (mixed batches)" if k == 0 else " (torchvision's default)"), f"{100 * v:.1f}%"]
               for k, v in padding.items()]),
    ])
    print(body)
    if not args.no_write:
        write_section("training_data", body)


if __name__ == "__main__":
    main()
