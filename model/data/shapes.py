"""Synthetic "shapes" instance-segmentation data: deterministic, COCO-format, hard enough to matter.

No data set can be downloaded here, so the demo model trains on images this module draws. Each image
is a function of (seed, index) alone, so the same call streams the same pixels in memory or writes
them as a COCO folder, and a validation seed never seen in training gives a clean held-out set.

What makes it hard: textured, noisy, gradient backgrounds; non-class clutter (lines, arcs, crosses,
elongated ellipses, dots); objects sometimes coloured close to the background; shading and noise over
the objects; overlapping objects whose masks are the exact visible pixels (later shapes occlude
earlier ones; nearly hidden instances are dropped rather than kept as unlearnable slivers).

CLI: ``python -m model.data.shapes --out DIR --num N --seed S`` writes DIR/images/*.png and
DIR/instances.json (RLE segmentations, iscrowd 0, category ids 1..4).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from commandline import ArgumentParser, CommandError, output_folder, positive_int, run_command
from model.data.sample import Sample, boxes_from_masks

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star")
MIN_SIDE, MAX_SIDE = 256, 640
SIZE_RANGE = (0.16, 0.50)  # object extent as a fraction of the image's short side
MAX_OBJECTS = 6
MIN_VISIBLE_FRACTION = 0.25  # drop an instance when less than this share of it stays visible
MIN_VISIBLE_PIXELS = 64
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertices, so small rotations really rotate
_SCALE = 1 << _SHIFT
# Seeds of the bundled demo model's data (models/demo/README.md): it trains on seed 1; seed 1000 is its
# validation set and seed 2000 its int8 calibration set, images neither of the other two ever saw.
VALIDATION_SEED = 1000
CALIBRATION_SEED = 2000


def categories() -> list[dict]:
    """COCO categories of the data set: ids 1..4 in CLASS_NAMES order."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]


def _rng(seed: int, index: int) -> np.random.Generator:
    """A generator that depends on (seed, index) only, so any image can be drawn alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear two-colour gradient in a random direction, float32 [H, W, 3]."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs * math.cos(angle) + ys * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    return c0 + t[..., None] * (c1 - c0)


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth coloured blotches: low-resolution noise upsampled, float32 [H, W, 3] around zero."""
    cells = int(rng.integers(3, 24))
    low = rng.normal(0, 1, size=(cells, cells, 3)).astype(np.float32)
    return cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC) * float(rng.uniform(10, 60))


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Periodic stripes or a checker-like weave, a texture a model must learn to ignore."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 60)
        out += np.sin((xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period))
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    return out[..., None] * tint * float(rng.uniform(8, 40))


def _clutter(rng: np.random.Generator, canvas: np.ndarray, short: int) -> None:
    """Draw non-class distractors (lines, arcs, crosses, thin ellipses, dots) onto the background."""
    h, w = canvas.shape[:2]
    for _ in range(int(rng.integers(0, 12))):
        colour = tuple(float(c) for c in _random_colour(rng))
        kind = int(rng.integers(0, 5))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        if kind == 0:  # line
            x2, y2 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(canvas, (cx, cy), (x2, y2), colour, int(rng.integers(1, 6)), cv2.LINE_AA)
        elif kind == 1:  # open arc
            axes = (int(rng.integers(8, short // 3)), int(rng.integers(8, short // 3)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(
                canvas,
                (cx, cy),
                axes,
                float(rng.uniform(0, 180)),
                start,
                start + float(rng.uniform(60, 270)),
                colour,
                int(rng.integers(1, 5)),
                cv2.LINE_AA,
            )
        elif kind == 2:  # cross / plus sign
            arm = int(rng.integers(6, max(short // 8, 7)))
            thick = int(rng.integers(2, max(arm // 2, 3)))
            cv2.line(canvas, (cx - arm, cy), (cx + arm, cy), colour, thick)
            cv2.line(canvas, (cx, cy - arm), (cx, cy + arm), colour, thick)
        elif kind == 3:  # elongated filled ellipse: round but not a circle
            a = int(rng.integers(10, max(short // 5, 11)))
            axes = (a, max(2, int(a / rng.uniform(2.5, 5.0))))
            cv2.ellipse(canvas, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
        else:  # small dots, below the smallest object size
            cv2.circle(canvas, (cx, cy), int(rng.integers(2, 9)), colour, -1, cv2.LINE_AA)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A gradient plus optional blotches and stripes plus clutter, float32 [H, W, 3]."""
    bg = _gradient(rng, h, w)
    if rng.random() < 0.7:
        bg += _blobs(rng, h, w)
    if rng.random() < 0.35:
        bg += _stripes(rng, h, w)
    _clutter(rng, bg, min(h, w))
    return bg


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices [V, 2] of a square, triangle or star with circumradius r, rotated by angle."""
    if kind == "square":
        t = angle + math.pi / 4 + np.arange(4) * (math.pi / 2)
        radii = np.full(4, r)
    elif kind == "triangle":
        t = angle + np.arange(3) * (2 * math.pi / 3)
        radii = np.full(3, r)
    else:  # star: 5 outer points alternating with inner vertices
        t = angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.38, 0.5))
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)


def _shape_mask(
    kind: str, h: int, w: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Binary mask uint8 [H, W] of one whole shape, drawn with sub-pixel precision and no anti-aliasing
    so the mask is exactly the set of pixels that get painted."""
    mask = np.zeros((h, w), np.uint8)
    if kind == "circle":
        centre = (round(cx * _SCALE), round(cy * _SCALE))
        cv2.circle(mask, centre, round(r * _SCALE), 1, -1, cv2.LINE_8, _SHIFT)
    else:
        pts = np.round(_polygon(kind, cx, cy, r, angle, rng) * _SCALE).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, _SHIFT)
    return mask


def _object_colour(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Mostly a random colour; sometimes one close to the local background, so contrast is not free."""
    if rng.random() < 0.2:
        local = canvas[int(cy), int(cx)]
        offset = rng.normal(0, 1, size=3)
        offset *= rng.uniform(30, 55) / max(float(np.linalg.norm(offset)), 1e-6)
        return np.clip(local + offset, 0, 255).astype(np.float32)
    return _random_colour(rng)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Fill the mask with the colour, with a gentle linear shading so fills are not perfectly flat."""
    ys, xs = np.nonzero(mask)
    shade = np.zeros(len(ys), np.float32)
    if rng.random() < 0.5:
        g = rng.normal(0, 1, size=2) * 0.25
        shade = (xs - xs.mean()) * g[0] + (ys - ys.mean()) * g[1]
    canvas[ys, xs] = colour[None, :] + shade[:, None]


def occlude(masks: np.ndarray) -> np.ndarray:
    """Visible parts of stacked shapes [N, H, W] drawn in order: each mask loses every pixel that a later
    shape covers, so a mask is exactly what can be seen of its object."""
    if len(masks) < 2:
        return masks.copy()
    covered_after = np.logical_or.accumulate(masks[::-1].astype(bool), axis=0)[::-1]
    visible = masks.copy()
    visible[:-1] &= ~covered_after[1:]
    return visible


def _draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """An image's (height, width): the first draw of its generator."""
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    return h, w


def generate(seed: int, index: int) -> Sample:
    """Draw image `index` of the data set with this seed. Labels are category ids 1..4 (also the
    contiguous labels, as the categories are contiguous); image_id is index + 1."""
    rng = _rng(seed, index)
    h, w = _draw_size(rng)
    short = min(h, w)
    canvas = _background(rng, h, w)
    full: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        label = int(rng.integers(0, len(CLASS_NAMES)))
        r = float(rng.uniform(*SIZE_RANGE)) * short / 2
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        mask = _shape_mask(CLASS_NAMES[label], h, w, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), rng)
        _paint(rng, canvas, mask, _object_colour(rng, canvas, cx, cy))
        full.append(mask)
        labels.append(label + 1)
    sigma = float(rng.uniform(0, 18))
    if sigma > 1:
        canvas += rng.normal(0, sigma, size=canvas.shape).astype(np.float32)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    full_arr = np.stack(full)
    visible = occlude(full_arr).astype(np.uint8)
    area, full_area = visible.sum(axis=(1, 2)), full_arr.sum(axis=(1, 2))
    keep = (area >= MIN_VISIBLE_PIXELS) & (area >= MIN_VISIBLE_FRACTION * full_area)
    visible = visible[keep]
    return Sample(
        image=image,
        boxes=boxes_from_masks(visible),
        labels=np.asarray(labels, dtype=np.int64)[keep],
        masks=visible,
        image_id=index + 1,
    )


class ShapesDataset:
    """`num` generated images streamed in memory; item i is generate(seed, i).

    Offers the same `class_names` / `__len__` / `load` interface as the COCO loader, so training can
    run on it without anything written to disk.
    """

    def __init__(self, num: int, seed: int = 0) -> None:
        self.num = int(num)
        self.seed = int(seed)
        self.class_names: list[str] = ["__background__", *CLASS_NAMES]

    def __len__(self) -> int:
        return self.num

    def load(self, index: int) -> Sample:
        if not 0 <= index < self.num:
            raise IndexError(index)
        return generate(self.seed, index)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image `index`, without drawing it."""
        return _draw_size(_rng(self.seed, index))


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a binary [H, W] mask with a JSON-ready str `counts`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_annotations(sample: Sample, first_id: int) -> list[dict]:
    """COCO annotation dicts (RLE segmentation, xywh bbox, mask area) of one generated sample (full masks)."""
    masks = np.asarray(sample.masks)
    anns = []
    for k in range(len(sample.labels)):
        x1, y1, x2, y2 = (float(v) for v in sample.boxes[k])
        anns.append(
            {
                "id": first_id + k,
                "image_id": sample.image_id,
                "category_id": int(sample.labels[k]),
                "segmentation": encode_rle(masks[k]),
                "area": float(masks[k].sum()),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
            }
        )
    return anns


def write_coco(out: str | os.PathLike, num: int, seed: int, image_format: str = "png") -> Path:
    """Write `num` images to out/images/ and out/instances.json; returns the JSON path.

    PNG by default so files hold exactly the streamed pixels (a model trained on the stream is then
    evaluated on the same distribution); "jpg" (quality 95) for smaller files. The JSON is written
    last via a temporary file so a half-finished run never looks like a complete data set.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
    for i in range(num):
        sample = generate(seed, i)
        name = f"{sample.image_id:06d}.{image_format}"
        if not cv2.imwrite(str(out / "images" / name), sample.image[..., ::-1], params):
            raise OSError(f"could not write {out / 'images' / name}")
        images.append({"id": sample.image_id, "file_name": name, "width": sample.width, "height": sample.height})
        annotations += coco_annotations(sample, first_id=len(annotations) + 1)
    dataset = {
        "info": {"description": f"synthetic shapes, seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    path = out / "instances.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataset))
    os.replace(tmp, path)
    return path


def run(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m model.data.shapes",
                            description="Write a synthetic shapes data set in COCO format.")
    parser.add_argument("--out", required=True, type=output_folder, help="output folder (images/ and instances.json)")
    parser.add_argument("--num", type=positive_int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="data set seed; use a fresh one for validation")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image file format")
    args = parser.parse_args(argv)
    try:
        path = write_coco(args.out, args.num, args.seed, args.format)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise CommandError(f"cannot write the data set: {exc}") from None
    print(f"wrote {args.num} images to {path.parent} ({path.name})")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m model.data.shapes``: one ``error:`` line and exit status 2 / 1 for what goes wrong."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
