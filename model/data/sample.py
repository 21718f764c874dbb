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
    of 0/1 (generated images, which are small), or BoxMasks (COCO files, whose photos may be large).
    image_id: the COCO image id, so predictions can be matched back to ground truth.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | BoxMasks
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
    rows = np.asarray(masks.any(axis=2))  # numpy's stubs type any() as a scalar or an array
    cols = np.asarray(masks.any(axis=1))
    for i in range(n):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size:
            boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


@dataclass
class BoxMasks:
    """Instance masks kept within their boxes: memory in proportion to the objects, not to N full images.

    A 12-megapixel photo with 100 instances holds 1.2 G mask pixels as full-size masks; its objects cover a
    small fraction of that. ``crops[i]`` is uint8 [h_i, w_i] of 0/1 whose top-left pixel sits at
    ``origins[i]`` = (x0, y0) of an image of ``image_size`` (height, width); every pixel outside a crop is 0.
    """

    crops: list[np.ndarray]
    origins: np.ndarray  # int64 [N, 2]: x0, y0
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_full(cls, masks: np.ndarray) -> BoxMasks:
        """Crop full-size masks [N, H, W] to their tight boxes (an empty mask keeps a 0 x 0 crop)."""
        boxes = boxes_from_masks(masks).astype(np.int64)
        crops = [np.ascontiguousarray(m[y0:y1, x0:x1]) for m, (x0, y0, x1, y1) in zip(masks, boxes, strict=True)]
        return cls(crops, boxes[:, :2].copy(), (int(masks.shape[1]), int(masks.shape[2])))

    def full(self) -> np.ndarray:
        """The masks at the image's size, uint8 [N, H, W]: for small images and tests."""
        out = np.zeros((len(self), *self.image_size), np.uint8)
        for i, (crop, (x0, y0)) in enumerate(zip(self.crops, self.origins.tolist(), strict=True)):
            out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return out

    def hflip(self) -> BoxMasks:
        """Mirrored left-right in the image: each crop mirrored, its origin moved."""
        width = self.image_size[1]
        origins = self.origins.copy()
        origins[:, 0] = width - self.origins[:, 0] - np.array([c.shape[1] for c in self.crops], np.int64)
        return BoxMasks([np.ascontiguousarray(c[:, ::-1]) for c in self.crops], origins, self.image_size)
