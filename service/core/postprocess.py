"""Mask post-processing: m x m probabilities -> binary masks as COCO RLE, areas and polygons.

Everything here works on *box-local* masks. A detection's mask is resized to its (expanded) box exactly
like torchvision's ``paste_masks_in_image`` (1-pixel zero padding, box scaled by (m+2)/m, integer box,
bilinear ``align_corners=False``), thresholded, and then encoded straight from that box-sized array:
COCO RLE runs are computed in column-major order of the box and offset into the full image, so no
full-image array is ever allocated per detection. Cost is proportional to the box area.

The RLE run finding and the COCO string compression are vectorized over *all* detections of an image
at once; the only per-detection Python work is the OpenCV resize and contour calls, which are C loops.

A request's own choices come first: ``select_detections`` keeps its classes and count, and
``encode_detections`` computes only the mask formats it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # annotations only: the mask code alone (benchmarks, evaluation) loads no ONNX Runtime
    from service.core.options import Resolved
    from service.core.runtime import Prediction

MASK_THRESHOLD = 0.5
# A value v (or ~v for negatives) at or above 2^(5k-1) needs more than k 5-bit groups.
_GROUP_LIMITS = np.array([1 << (5 * k - 1) for k in range(1, 13)], dtype=np.int64)


@dataclass(frozen=True)
class LocalMasks:
    """Binary masks of N detections, each stored only inside its clipped box.

    All masks live in one flat uint8 buffer. Detection i occupies ``buffer[offsets[i]:offsets[i] +
    widths[i] * (heights[i] + 1)]`` as a *transposed* (width x (height + 1)) 0/1 array: one row per
    image column, each followed by a zero separator. The C-order ravel is thus COCO's column-major
    order, and the separators close every run at a column end, so one comparison pass over the whole
    buffer finds all runs of all detections. ``x0``/``y0`` place each box in the image.
    """

    buffer: np.ndarray
    offsets: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.offsets)

    def block_t(self, i: int) -> np.ndarray:
        """Detection i as a contiguous (width, height + 1) array: transposed, zero last column."""
        w, h = int(self.widths[i]), int(self.heights[i])
        start = int(self.offsets[i])
        return self.buffer[start : start + w * (h + 1)].reshape(w, h + 1)

    def mask(self, i: int) -> np.ndarray:
        """Detection i as a (height, width) 0/1 view in box coordinates (for callers and tests)."""
        return self.block_t(i)[:, :-1].T


@dataclass(frozen=True)
class EncodedMasks:
    """Per-detection outputs: COCO RLE dicts, pixel areas, and polygons (or None when not asked)."""

    rles: list[dict[str, object]] | None
    areas: np.ndarray
    polygons: list[list[list[float]]] | None


def expanded_int_boxes(boxes: np.ndarray, mask_size: int, padding: int = 1) -> np.ndarray:
    """Boxes grown by (m + 2p) / m around their centre and truncated to int, as torchvision does.

    The padded mask has a zero border; scaling the box the same way keeps the mask edge soft and
    makes our masks pixel-compatible with ``paste_masks_in_image``.
    """
    scale = float(mask_size + 2 * padding) / mask_size
    b = boxes.astype(np.float32, copy=False)
    half = (b[:, 2:4] - b[:, 0:2]) * np.float32(0.5) * np.float32(scale)
    centre = (b[:, 2:4] + b[:, 0:2]) * np.float32(0.5)
    out = np.concatenate([centre - half, centre + half], axis=1)
    return out.astype(np.int64)  # truncation toward zero, like Tensor.to(torch.int64)


def paste_local(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    threshold: float = MASK_THRESHOLD,
) -> LocalMasks:
    """Resize each m x m mask into its box, binarize, clip to the image; keep it box-local.

    ``masks`` is float [N, m, m], ``boxes`` float [N, 4] x1, y1, x2, y2 in the pixels of the image of
    ``image_size`` (height, width). The transposed mask is resized directly (bilinear is separable, so
    this equals transposing the result), which hands RLE its column-major layout for free, and the
    threshold writes straight into the shared buffer.
    """
    height, width = image_size
    n, m = masks.shape[0], masks.shape[-1]
    ib = expanded_int_boxes(boxes, m)
    bw = np.maximum(ib[:, 2] - ib[:, 0] + 1, 1)
    bh = np.maximum(ib[:, 3] - ib[:, 1] + 1, 1)
    x0 = np.clip(ib[:, 0], 0, width)
    y0 = np.clip(ib[:, 1], 0, height)
    cw = np.maximum(np.clip(ib[:, 2] + 1, 0, width) - x0, 0)
    ch = np.maximum(np.clip(ib[:, 3] + 1, 0, height) - y0, 0)
    sizes = cw * (ch + 1)
    offsets = np.cumsum(sizes) - sizes
    buffer = np.zeros(int(sizes.sum()), dtype=np.uint8)
    # Pad once for all detections, transposed: [N, m+2, m+2] with axes (x, y).
    padded_t = np.zeros((n, m + 2, m + 2), dtype=np.float32)
    padded_t[:, 1:-1, 1:-1] = masks.transpose(0, 2, 1)
    local = LocalMasks(buffer, offsets, cw, ch, x0, y0, (height, width))
    thr = np.float32(threshold)  # strictly above, like torchvision's `masks > 0.5`
    for i in np.flatnonzero(cw * ch).tolist():
        res = cv2.resize(padded_t[i], (int(bh[i]), int(bw[i])), interpolation=cv2.INTER_LINEAR)
        res = res.reshape(int(bw[i]), int(bh[i]))  # OpenCV may drop a unit axis
        cx, cy = int(x0[i] - ib[i, 0]), int(y0[i] - ib[i, 1])
        w, h = int(cw[i]), int(ch[i])
        np.greater(res[cx : cx + w, cy : cy + h], thr, out=local.block_t(i)[:, :h].view(bool))
    return local


def rle_runs(local: LocalMasks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground runs of all detections in full-image column-major coordinates.

    Returns (det, start, end): run i belongs to detection det[i] and covers flat pixels
    [start[i], end[i]) of the image in Fortran order. Runs are sorted by (det, start), and runs that
    touch across a column boundary (a box as tall as the image) are merged, as pycocotools would.
    """
    height = local.image_size[0]
    buf = local.buffer
    empty = np.zeros(0, dtype=np.int64)
    if buf.size == 0:
        return empty, empty, empty
    # Every column ends with a 0 separator, so changes alternate rise, fall, rise, fall, ...
    change = np.flatnonzero(buf[1:] != buf[:-1]) + 1
    if buf[0]:
        change = np.concatenate([[0], change])
    starts, stops = change[0::2], change[1::2]
    # A zero-size detection shares its offset with the next one; side="right" picks the latter.
    det = np.searchsorted(local.offsets, starts, side="right") - 1
    col, row = np.divmod(starts - local.offsets[det], local.heights[det] + 1)
    g_start = (local.x0[det] + col) * height + local.y0[det] + row
    g_end = g_start + (stops - starts)
    touching = (g_end[:-1] == g_start[1:]) & (det[:-1] == det[1:])
    if touching.any():
        g_start, det = g_start[np.concatenate([[True], ~touching])], det[np.concatenate([[True], ~touching])]
        g_end = g_end[np.concatenate([~touching, [True]])]
    return det, g_start, g_end


def rle_counts(
    det: np.ndarray, start: np.ndarray, end: np.ndarray, n: int, total: int
) -> tuple[np.ndarray, np.ndarray]:
    """COCO RLE counts of n detections, flat, plus the number of counts of each detection.

    Counts alternate 0-runs and 1-runs and start with zeros (possibly 0), as pycocotools writes
    them; a trailing 0-run of length 0 is not written.
    """
    runs = np.bincount(det, minlength=n).astype(np.int64)
    group = 2 * runs + 2  # boundaries 0, s0, e0, ..., s_k, e_k, total
    first = np.cumsum(group) - group
    bounds = np.empty(int(group.sum()), dtype=np.int64)
    bounds[first] = 0
    bounds[first + group - 1] = total
    inner_first = np.repeat(first + 1 - (np.cumsum(2 * runs) - 2 * runs), 2 * runs)
    bounds[inner_first + np.arange(2 * start.size)] = np.stack([start, end], axis=1).ravel()
    diffs = np.diff(bounds)
    keep = np.ones(diffs.size, dtype=bool)
    keep[first[1:] - 1] = False  # differences across two detections
    last = first + group - 2
    keep[last[(diffs[last] == 0) & (runs > 0)]] = False
    lens = group - 1 - ((diffs[last] == 0) & (runs > 0))
    return diffs[keep], lens


def rle_strings(counts: np.ndarray, lens: np.ndarray) -> list[str]:
    """Compress RLE counts to COCO's string form (``rleToString`` in pycocotools' maskApi.c).

    Each count (from the 4th on, minus the count two places back) is written as little-endian 5-bit
    groups, each + 48 as an ASCII char, 0x20 meaning "more follows"; the last group's 0x10 bit is
    the sign. All counts of all detections are encoded at once, one column per 5-bit group (rarely
    more than 4), then cut per detection.

    Kept rather than pycocotools' own ``frPyObjects`` on the uncompressed counts (the same C code, same
    strings): for 100 detections of an 800x1333 image this takes 0.56 ms, pycocotools 0.75 ms, most of it
    turning the counts into the Python lists it takes (benchmarks/libraries_vs_ours.py, RESULTS.md).
    """
    if lens.size == 0:
        return []
    first = np.cumsum(lens) - lens
    dtype = np.int32 if counts.size == 0 or counts.max() < 2**31 - 1 else np.int64
    c = counts.astype(dtype, copy=False)
    back2 = np.empty_like(c)
    back2[:2] = 0
    back2[2:] = c[:-2]
    idx = np.arange(c.size, dtype=dtype) - np.repeat(first.astype(dtype), lens)
    x = np.where(idx > 2, c - back2, c)
    mag = np.where(x < 0, ~x, x)  # ~x = -x - 1 makes the signed range symmetric
    ngroups = np.searchsorted(_GROUP_LIMITS, mag, side="right") + 1
    kmax = int(ngroups.max())
    chars = np.empty((c.size, kmax), dtype=np.uint8)
    for k in range(kmax):
        more = (ngroups > k + 1).astype(np.uint8) << 5
        chars[:, k] = ((x >> (5 * k)) & 0x1F).astype(np.uint8) | more
    chars += 48
    flat = chars[np.arange(kmax)[None, :] < ngroups[:, None]].tobytes()
    per_det = np.add.reduceat(ngroups, first)
    ends = np.cumsum(per_det).tolist()
    begins = [0, *ends[:-1]]
    return [flat[b:e].decode("ascii") for b, e in zip(begins, ends, strict=True)]


def polygons_of(local: LocalMasks) -> list[list[list[float]]]:
    """Outer contours of each mask as COCO polygons [x1, y1, x2, y2, ...] in image pixels.

    Holes are dropped (RETR_EXTERNAL). As in Detectron2, OpenCV's integer pixel coordinates get +0.5
    (pixel centres in COCO's continuous coordinates). Unlike Detectron2, outlines of fewer than 3
    points (a lone pixel, a 1-pixel-thin straight run) are kept, padded to 3 points by repeating the
    last one, so every pixel of the mask is covered by some polygon and COCO tools still read each list
    as a polygon (4 numbers would be taken for a box). Contours are found on the transposed block
    (its zero separator column changes nothing), so x and y come back swapped. The coordinate
    arithmetic and the conversion to Python floats are done once for all contours of all detections.
    """
    contours: list[np.ndarray] = []
    owner: list[int] = []
    for i in range(len(local)):
        block = local.block_t(i)
        if block.size:
            found, _ = cv2.findContours(block, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            contours.extend(found)
            owner.extend([i] * len(found))
    out: list[list[list[float]]] = [[] for _ in range(len(local))]
    if not contours:
        return out
    # Gather all points at once; a contour shorter than 3 points repeats its last point.
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    sizes = np.maximum(lengths, 3)
    contour = np.repeat(np.arange(len(contours)), sizes)
    step = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    src = (np.cumsum(lengths) - lengths)[contour] + np.minimum(step, lengths[contour] - 1)
    pts = np.concatenate(contours).reshape(-1, 2)[src, ::-1].astype(np.float64)
    det = np.asarray(owner)[contour]
    pts += np.stack([local.x0[det], local.y0[det]], axis=1) + 0.5
    flat = pts.ravel().tolist()
    ends = np.cumsum(2 * sizes).tolist()
    begins = [0, *ends[:-1]]
    for i, b, e in zip(owner, begins, ends, strict=True):
        out[i].append(flat[b:e])
    return out


def encode_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    rle: bool = True,
    polygons: bool = True,
    threshold: float = MASK_THRESHOLD,
) -> EncodedMasks:
    """Full post-processing of one image's detections: paste box-locally, then RLE, area, polygons."""
    return encode_local(paste_local(masks, boxes, image_size, threshold), rle, polygons)


def encode_local(local: LocalMasks, rle: bool = True, polygons: bool = True) -> EncodedMasks:
    """Box-local binary masks (pasted here, or stitched from tiles) as RLE, areas and polygons."""
    image_size = local.image_size
    n = len(local)
    det, start, end = rle_runs(local)
    areas = np.bincount(det, weights=end - start, minlength=n).astype(np.int64)
    rles: list[dict[str, object]] | None = None
    if rle:
        height, width = image_size
        strings = rle_strings(*rle_counts(det, start, end, n, height * width))
        rles = [{"size": [height, width], "counts": s} for s in strings]
    polys = polygons_of(local) if polygons else None
    return EncodedMasks(rles=rles, areas=areas, polygons=polys)


def select_detections(pred: Prediction, options: Resolved) -> Prediction:
    """The detections the request asked for: of its classes, at most its count, best first."""
    keep = np.arange(len(pred.scores))
    if options.labels is not None:
        keep = keep[np.isin(pred.labels, options.labels)]
    if options.max_detections is not None:
        keep = keep[: options.max_detections]
    return replace(pred, boxes=pred.boxes[keep], scores=pred.scores[keep], labels=pred.labels[keep],
                   masks=pred.masks[keep])


def encode_detections(pred: Prediction, options: Resolved) -> EncodedMasks:
    """The request's detections' masks pasted box-locally into the original image, encoded as it asked."""
    return encode_masks(pred.masks, pred.boxes, pred.image_size, rle=options.rle, polygons=options.polygons)
