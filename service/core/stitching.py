"""Sliced inference's stitching: the detections of every tile shifted back into the image, and the pieces
of one object that several tiles saw merged into one instance with one mask.

``tile_pieces`` pastes each tile's m x m masks into their boxes at the tile's original resolution
(postprocess.paste_local: box-local, never a full-image mask) and moves boxes and blocks to image
coordinates. ``merge`` is greedy non-maximum merging (SAHI's GREEDYNMM) on masks instead of boxes: best
score first, each detection takes every remaining one of its class whose mask matches it, the merged mask
being the union, the box the union of boxes, the score the highest. An object cut by a seam comes back as
one instance, and an object two overlapping tiles both saw whole as one too.

The match is the intersection over the smaller (IoS) of the two masks *inside the part of the image both
detections' tiles saw*: one tile sees an object whole and the next only the part left of its border, but
inside their shared strip both saw the same pixels, so the two masks agree there whatever each missed
outside it. Detections of the same tile (or of the whole-image pass) share the whole window, which makes it
plain mask IoS. Masks are compared only where their blocks meet: the cost is that of the overlaps.

Shapely could intersect polygons instead, but the masks are rasters: turning them into polygons and back
would be approximate and cost more than counting the pixels of two small blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.core.postprocess import LocalMasks, paste_local
from service.core.tiling import Window

if TYPE_CHECKING:  # annotations only: the merge alone (benchmarks) loads no ONNX Runtime
    from service.core.runtime import Prediction

MERGE_THRESHOLD = 0.5  # mask IoS in the shared view at or above which two detections are one object


@dataclass(frozen=True)
class Pieces:
    """Detections in image coordinates, each mask a box-local block; ``views`` is the window each was seen
    in (x0, y0, x1, y1: its tile, or the whole image)."""

    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N]
    views: np.ndarray  # int64 [N, 4]
    origins: np.ndarray  # int64 [N, 2] x, y of each block's top-left pixel in the image
    masks: list[np.ndarray]  # bool [h_i, w_i] each

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> Pieces:
        """The detections at the indices ``keep``, in that order."""
        return Pieces(self.boxes[keep], self.scores[keep], self.labels[keep], self.views[keep],
                      self.origins[keep], [self.masks[i] for i in keep.tolist()])

    @property
    def extents(self) -> np.ndarray:
        """int64 [N, 4]: each block as x0, y0, x1, y1 (exclusive) in the image."""
        sizes = np.array([m.shape[::-1] for m in self.masks], dtype=np.int64).reshape(-1, 2)
        return np.concatenate([self.origins, self.origins + sizes], axis=1)


def tile_pieces(preds: Sequence[Prediction], views: Sequence[Window]) -> Pieces:
    """Each tile's detections (boxes in the tile's original pixels) pasted box-locally and shifted by the
    tile's position into the image."""
    boxes, scores, labels, seen, origins = [], [], [], [], []
    masks: list[np.ndarray] = []
    for pred, view in zip(preds, views, strict=True):
        local = paste_local(pred.masks, pred.boxes, pred.image_size)
        shift = np.array([view.x0, view.y0], dtype=np.int64)
        boxes.append(pred.boxes + np.tile(shift, 2).astype(np.float32))
        scores.append(pred.scores)
        labels.append(pred.labels)
        seen.append(np.tile([view.x0, view.y0, view.x1, view.y1], (len(pred.scores), 1)))
        origins.append(np.stack([local.x0, local.y0], axis=1).astype(np.int64) + shift)
        masks.extend(local.mask(i).astype(bool) for i in range(len(local)))
    return Pieces(
        boxes=np.concatenate(boxes).astype(np.float32).reshape(-1, 4),
        scores=np.concatenate(scores).astype(np.float32),
        labels=np.concatenate(labels).astype(np.int64),
        views=np.concatenate(seen).astype(np.int64).reshape(-1, 4),
        origins=np.concatenate(origins).reshape(-1, 2),
        masks=masks,
    )


def _inside(mask: np.ndarray, origin: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The part of a block (placed at ``origin``) inside ``box`` (x0, y0, x1, y1), as a view."""
    x0, y0 = int(origin[0]), int(origin[1])
    return mask[max(box[1] - y0, 0) : max(box[3] - y0, 0), max(box[0] - x0, 0) : max(box[2] - x0, 0)]


def match(p: Pieces, i: int, j: int, extents: np.ndarray) -> float:
    """Mask IoS of detections i and j inside the window both were seen in (0 when either has no pixel
    there)."""
    shared = np.concatenate([np.maximum(p.views[i, :2], p.views[j, :2]), np.minimum(p.views[i, 2:], p.views[j, 2:])])
    meet = np.concatenate([np.maximum(extents[i, :2], extents[j, :2]), np.minimum(extents[i, 2:], extents[j, 2:])])
    meet = np.concatenate([np.maximum(meet[:2], shared[:2]), np.minimum(meet[2:], shared[2:])])
    if (meet[2:] <= meet[:2]).any():
        return 0.0
    area_i = int(np.count_nonzero(_inside(p.masks[i], p.origins[i], shared)))
    area_j = int(np.count_nonzero(_inside(p.masks[j], p.origins[j], shared)))
    smaller = min(area_i, area_j)
    if smaller == 0:
        return 0.0
    both = _inside(p.masks[i], p.origins[i], meet) & _inside(p.masks[j], p.origins[j], meet)
    return int(np.count_nonzero(both)) / smaller


def merge_groups(p: Pieces, threshold: float = MERGE_THRESHOLD) -> list[list[int]]:
    """Greedy non-maximum merging: best score first, each detection not yet taken takes every remaining
    detection of its class whose mask matches it at ``threshold`` or more. Groups in score order, each
    led by its best."""
    order = np.argsort(-p.scores, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    ext = p.extents
    taken = np.zeros(len(p), dtype=bool)
    groups = []
    for i in order.tolist():
        if taken[i]:
            continue
        taken[i] = True
        near = (~taken & (p.labels == p.labels[i]) & (ext[:, 0] < ext[i, 2]) & (ext[:, 2] > ext[i, 0])
                & (ext[:, 1] < ext[i, 3]) & (ext[:, 3] > ext[i, 1]))
        candidates = np.flatnonzero(near)
        group = [i]
        for j in candidates[np.argsort(rank[candidates])].tolist():
            if match(p, i, j, ext) >= threshold:
                group.append(j)
                taken[j] = True
        groups.append(group)
    return groups


def union(p: Pieces, group: list[int], extents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of a group's masks, as a block, and its top-left pixel."""
    if len(group) == 1:
        return p.masks[group[0]], p.origins[group[0]]
    lo = extents[group, :2].min(axis=0)
    hi = extents[group, 2:].max(axis=0)
    block = np.zeros((int(hi[1] - lo[1]), int(hi[0] - lo[0])), dtype=bool)
    for k in group:
        x, y = (p.origins[k] - lo).tolist()
        h, w = p.masks[k].shape
        block[y : y + h, x : x + w] |= p.masks[k]
    return block, lo


def merge(p: Pieces, threshold: float = MERGE_THRESHOLD) -> Pieces:
    """One detection per object: each group of ``merge_groups`` as its union mask, its union box, its
    best score and class; best score first."""
    groups = merge_groups(p, threshold)
    ext = p.extents
    blocks = [union(p, g, ext) for g in groups]
    boxes = np.array([np.concatenate([p.boxes[g, :2].min(axis=0), p.boxes[g, 2:].max(axis=0)]) for g in groups],
                     dtype=np.float32).reshape(-1, 4)
    lead = np.array([g[0] for g in groups], dtype=np.int64)
    return Pieces(
        boxes=boxes,
        scores=p.scores[lead],
        labels=p.labels[lead],
        views=p.views[lead],
        origins=np.array([o for _, o in blocks], dtype=np.int64).reshape(-1, 2),
        masks=[b for b, _ in blocks],
    )


def local_masks(p: Pieces, image_size: tuple[int, int]) -> LocalMasks:
    """The blocks in postprocess's layout (transposed, a zero separator after each column), for encoding."""
    heights = np.array([m.shape[0] for m in p.masks], dtype=np.int64)
    widths = np.array([m.shape[1] for m in p.masks], dtype=np.int64)
    sizes = widths * (heights + 1)
    offsets = np.cumsum(sizes) - sizes
    local = LocalMasks(np.zeros(int(sizes.sum()), dtype=np.uint8), offsets, widths, heights,
                       p.origins[:, 0].copy(), p.origins[:, 1].copy(), image_size)
    for i, mask in enumerate(p.masks):
        local.block_t(i)[:, :-1] = mask.T
    return local
