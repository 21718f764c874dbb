"""What one image's detections cost as Label Studio regions, by the config's control, side by side with /segment's
own encoding: postprocess_speed's detections (the first 20 of its 100, boxes scaled to each image size),
post-processed as the pipeline does for each kind (COCO RLE for brushes, polygons for polygons, nothing for boxes)
and written as regions by service/label_studio/regions.py.

Brush masks are label-studio-sdk's RLE (``mask2rle``) of the whole image's RGBA bitmap: its cost grows with the
image, not with the object, unlike our box-local COCO RLE.

Run: ``python -m benchmarks.label_studio_regions`` (writes its section of benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks import machine, table, write_section
from benchmarks.libraries_vs_ours import timed_ms
from benchmarks.postprocess_speed import HEIGHT, WIDTH, detections
from service.core.postprocess import encode_masks
from service.core.runtime import Prediction
from service.label_studio.config import Kind, Target
from service.label_studio.regions import regions_of

DETECTIONS = 20
SIZES = ((480, 640), (800, 1333), (2000, 3000))
CLASS_NAMES = ["__background__", "object"]


def prediction(size: tuple[int, int]) -> Prediction:
    """The detections with their boxes scaled from postprocess_speed's 800x1333 image to ``size``."""
    masks, boxes = detections()
    scale = np.array([size[1] / WIDTH, size[0] / HEIGHT] * 2, dtype=np.float32)
    return Prediction(boxes=boxes[:DETECTIONS] * scale, scores=np.linspace(0.99, 0.6, DETECTIONS, dtype=np.float32),
                      labels=np.ones(DETECTIONS, dtype=np.int64), masks=masks[:DETECTIONS], image_size=size)


def regions_ms(pred: Prediction, kind: Kind, repeats: int) -> float:
    """Post-processing as the pipeline does it for ``kind`` plus the regions, in ms."""
    target = Target(kind, "label", "image", "image", {"object": "object"})

    def run() -> object:
        masks = encode_masks(pred.masks, pred.boxes, pred.image_size, rle=kind == "brush", polygons=kind == "polygon")
        return regions_of(pred, masks, CLASS_NAMES, target)

    return timed_ms(run, repeats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args(argv)
    where = machine()
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every column
    rows = []
    for size in SIZES:
        pred = prediction(size)
        segment = timed_ms(lambda: encode_masks(pred.masks, pred.boxes, size), args.repeats)  # noqa: B023
        rows.append([f"{size[0]}x{size[1]}", f"{segment:.1f}", *(f"{regions_ms(pred, kind, args.repeats):.1f}"
                                                                for kind in ("rectangle", "polygon", "brush"))])
    lines = [
        f"## Label Studio regions: {DETECTIONS} detections of one image, by control (ms)",
        "",
        f"Command: `python -m benchmarks.label_studio_regions` (median of {args.repeats} runs, one CPU via "
        f"sched_setaffinity). {where}. The machine is shared with other sessions' work: expect noise.",
        "",
        table(["image", "/segment (RLE + polygons)", "RectangleLabels", "PolygonLabels", "BrushLabels (SDK)"],
              rows),
        "",
        "BrushLabels is label-studio-sdk's encoder of the whole image's RGBA bitmap, per detection; the others are "
        "proportional to the boxes. For large images with many detections, PolygonLabels is the cheap choice.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("label_studio_regions", "\n".join(lines))


if __name__ == "__main__":
    main()
