"""A large synthetic photo with many small shapes, for sliced inference (tests/test_tiling.py,
benchmarks/tiling_speed.py): the demo model's four classes (model/data/shapes.py) drawn at the size it was
trained to see them *after* a 2x shrink, on a 4000 x 3000 canvas the model's policy shrinks 9.4x.

The demo model learnt objects of 0.16 to 0.5 of a 256-640 px image's short side, i.e. radii of about 20 to
80 px at its input (short side 320). Radii of 60 to 110 px here become 6 to 12 px when the whole image is
shrunk to 426 x 320 (too small for it) and 30 to 55 px in tiles of 640 shrunk to 320.

``seam_objects`` places objects no tile sees whole; ``scores`` measures an answer against the scene.

Masks are kept box-local (a 12-megapixel mask per object would cost 12 MB each); ``rle`` gives each as a
full-image COCO RLE for pycocotools' IoU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    from service.core.tiling import Window

KINDS = ("circle", "square", "triangle", "star")  # class ids 1..4, as the demo model's
RADII = (60, 110)
GAP = 24  # px between two objects' circumcircles


@dataclass(frozen=True)
class Shape:
    label: int  # 1..4
    x0: int
    y0: int
    mask: np.ndarray  # bool [h, w], placed at (x0, y0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 (exclusive) of the block."""
        return self.x0, self.y0, self.x0 + self.mask.shape[1], self.y0 + self.mask.shape[0]


@dataclass(frozen=True)
class LargeScene:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    shapes: list[Shape]

    def rles(self) -> list[dict[str, object]]:
        """Each shape's mask as a full-image COCO RLE (pycocotools' own encoding)."""
        h, w = self.image.shape[:2]
        out = []
        for s in self.shapes:
            full = np.zeros((h, w), np.uint8, order="F")
            x0, y0, x1, y1 = s.box
            full[y0:y1, x0:x1] = s.mask
            out.append(mask_utils.encode(full))
        return out


def _outline(kind: str, r: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Vertices [V, 2] about (0, 0) of a square, triangle or star of circumradius r."""
    if kind == "square":
        t, radii = angle + math.pi / 4 + np.arange(4) * (math.pi / 2), np.full(4, r)
    elif kind == "triangle":
        t, radii = angle + np.arange(3) * (2 * math.pi / 3), np.full(3, r)
    else:
        t = angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, r, r * rng.uniform(0.4, 0.5))
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _shape_block(kind: str, r: int, rng: np.random.Generator) -> np.ndarray:
    """A bool block of side 2r + 1 holding the shape centred in it."""
    side = 2 * r + 1
    block = np.zeros((side, side), np.uint8)
    if kind == "circle":
        cv2.circle(block, (r, r), r, 1, -1)
    else:
        pts = np.round(_outline(kind, r, float(rng.uniform(0, 2 * math.pi)), rng) + r).astype(np.int32)
        cv2.fillPoly(block, [pts], 1)
    return block.astype(bool)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour gradient with blotches and a little noise, float32 [H, W, 3]."""
    low = rng.uniform(60, 200, size=(6, 8, 3)).astype(np.float32)
    bg = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    bg += rng.normal(0, 6, size=(h // 4, w // 4, 3)).astype(np.float32).repeat(4, 0).repeat(4, 1)[:h, :w]
    return bg


def large_scene(
    seed: int = 0, size: tuple[int, int] = (3000, 4000), count: int = 80,
    placed: Sequence[tuple[int, int, int]] = (),
) -> LargeScene:
    """``count`` shapes at most (``placed`` ones first, as (x, y, radius), then random ones that keep
    ``GAP`` from every other) of random classes and colours on a (height, width) canvas."""
    rng = np.random.default_rng(seed)
    h, w = size
    canvas = _background(rng, h, w)
    circles: list[tuple[int, int, int]] = list(placed)
    tries = 0
    while len(circles) < count and tries < 100 * count:
        tries += 1
        r = int(rng.integers(*RADII))
        x, y = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        if all(math.hypot(x - a, y - b) > r + c + GAP for a, b, c in circles):
            circles.append((x, y, r))
    shapes = []
    for x, y, r in circles:
        label = int(rng.integers(1, len(KINDS) + 1))
        block = _shape_block(KINDS[label - 1], r, rng)
        region = canvas[y - r : y + r + 1, x - r : x + r + 1]
        local = region[block].mean(axis=0)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        while np.abs(colour - local).max() < 90:  # stands out from the background around it
            colour = rng.uniform(0, 255, 3).astype(np.float32)
        region[block] = colour
        ys, xs = np.nonzero(block)
        shapes.append(Shape(label, x - r + int(xs.min()), y - r + int(ys.min()),
                            block[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return LargeScene(np.clip(canvas, 0, 255).astype(np.uint8), shapes)


def seam_objects(tiles: list[Window]) -> list[tuple[int, int, int]]:
    """Objects of radius 100 centred in the strips neighbouring tiles share (160 px wide with tiles=auto on
    4000 x 3000): no tile sees them whole."""
    xs, ys = sorted({t.x0 for t in tiles}), sorted({t.y0 for t in tiles})
    side = tiles[0].width
    placed = [((a + b + side) // 2, ys[1 + k % (len(ys) - 2)] + side // 2, 100) for k, (a, b) in
              enumerate(zip(xs, xs[1:], strict=False))]
    placed += [(xs[1 + k % (len(xs) - 2)] + side // 2, (a + b + side) // 2, 100) for k, (a, b) in
               enumerate(zip(ys, ys[1:], strict=False))]
    return placed


def scores(found: dict[str, Any], scene: LargeScene, tiles: list[Window]) -> dict[str, object]:
    """Recall and precision at mask IoU 0.5 against the scene's objects (same class), the objects no tile saw
    whole with the number of detections mostly inside each and their best IoU, and the same-class pairs of
    detections overlapping by IoU > 0.5."""
    dets = found["detections"]
    truth, labels = scene.rles(), np.array([s.label for s in scene.shapes])
    rles = [d["mask"] for d in dets]
    classes = np.array([d["class_id"] for d in dets], np.int64)
    if not rles:
        return {"recall": 0.0, "precision": 0.0}
    same = classes[:, None] == labels[None]
    iou = np.asarray(mask_utils.iou(rles, truth, [0] * len(truth))) * same
    inside = np.asarray(mask_utils.iou(rles, truth, [1] * len(truth))) * same  # share of each detection in it
    cut = [i for i, s in enumerate(scene.shapes)
           if not any(t.x0 <= s.box[0] and t.y0 <= s.box[1] and t.x1 >= s.box[2] and t.y1 >= s.box[3] for t in tiles)]
    pairs = np.asarray(mask_utils.iou(rles, rles, [0] * len(rles))) * (classes[:, None] == classes[None])
    np.fill_diagonal(pairs, 0)
    return {"recall": float((iou.max(axis=0) >= 0.5).mean()), "precision": float((iou.max(axis=1) >= 0.5).mean()),
            "cut": [(int((inside[:, i] >= 0.5).sum()), float(iou[:, i].max())) for i in cut],
            "duplicates": int((pairs > 0.5).sum() // 2)}
