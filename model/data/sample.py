"""The one in-memory form of an annotated image that every data source produces.

Keeping a single numpy-only record lets the synthetic generator (torch-free, usable by
service tests) and the COCO loader feed the same resize/flip/collate code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One image and its instances, in original pixels.

    image: uint8 [H, W, 3] RGB. boxes: float32 [N, 4] x1, y1, x2, y2 (exclusive right/bottom,
    i.e. COCO's x, y, x + w, y + h). labels: int64 [N] contiguous labels 1..K. masks: uint8 [N, H, W]
    of 0/1. image_id: the COCO image id, so predictions can be matched back to ground truth.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    image_id: int = 0

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (exclusive right/bottom) of binary masks [N, H, W]; empty masks give zeros.

    Deriving boxes from masks guarantees every mask lies inside its box, which the evaluation
    and the mask head's targets both rely on.
    """
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes
