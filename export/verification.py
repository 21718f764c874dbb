"""Verifying an exported graph: ONNX Runtime against PyTorch, with float32's own noise as the yardstick.

Two float32 implementations of one network never agree exactly: convolutions sum in different orders,
and through a deep network the rounding grows, by how much depends on the weights (a random-weight
R-50-FPN moves its scores by ~2e-4, a small model by ~1e-7). No fixed tolerance fits every checkpoint, so
each export measures it: PyTorch float32 and ONNX Runtime both run against PyTorch float64 (the same
folded weights, exactly) on the same samples, and the graph passes when ONNX Runtime is at most
``factor`` times further from float64 than PyTorch float32 is, plus a tiny floor (for outputs that
float32 gets exactly right), in box coordinates, scores and mask probabilities alike.

Detections are compared as sets, not row by row. Two detections are the same one when they have the
same class and an IoU above (1 + nms_threshold) / 2: within one output, NMS leaves no two detections of
a class overlapping more than nms_threshold, and 1 - IoU is a metric, so no detection can have two
counterparts. Near ties are the same noise as any other: detections whose scores differ by less than the
tolerance may come in either order (pairing as sets ignores order), and one side may keep a detection
the other drops only where a cut falls, at the score threshold or at the top-D limit, and only when the
detection's score is within the tolerance of that cut. Any other difference refuses the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ONNX Runtime may be this many times further from float64 than PyTorch float32 is.
DEFAULT_FACTOR = 4.0


@dataclass(frozen=True)
class Figures:
    """How far one set of outputs is from another, over their paired detections."""

    box: float = 0.0  # largest coordinate error, relative to max(1 px, the box's extent)
    score: float = 0.0  # largest score error
    mask: float = 0.0  # largest error of an m x m mask probability

    def __str__(self) -> str:
        return f"box {self.box:.1e}, score {self.score:.1e}, mask {self.mask:.1e}"

    def within(self, tolerance: Figures) -> bool:
        return self.box <= tolerance.box and self.score <= tolerance.score and self.mask <= tolerance.mask

    def worst(self, other: Figures) -> Figures:
        return Figures(max(self.box, other.box), max(self.score, other.score), max(self.mask, other.mask))


# The floor added to every tolerance: float32's rounding of an output near 1 (and of a box relative to its
# size), so that an export whose float32 run is exact is not held to zero.
FLOOR = Figures(box=1e-6, score=1e-6, mask=1e-6)


def box_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest coordinate difference of paired boxes [N, 4], in px for boxes up to 1 px and relative to the
    box's extent for larger ones: box regressions of large boxes scale float rounding with the box."""
    if len(reference) == 0:
        return 0.0
    extent = np.maximum(reference[:, 2:] - reference[:, :2], 0).max(1, keepdims=True)
    return float((np.abs(reference - candidate) / np.maximum(1.0, extent)).max())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Mean IoU of two stacks of binary masks [N, ...]; two empty masks count as identical."""
    if len(a) == 0:
        return 1.0
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes [N, 4] and [M, 4] (x1, y1, x2, y2)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def pair_detections(
    reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], image: int, nms_threshold: float
) -> np.ndarray:
    """Rows (reference, candidate) [P, 2] of image ``image``'s detections that are the same detection:
    same class, IoU above (1 + nms_threshold) / 2, each the other's best match (see the module's docstring)."""
    n_ref, n_cand = int(reference["num_detections"][image]), int(candidate["num_detections"][image])
    if n_ref == 0 or n_cand == 0:
        return np.zeros((0, 2), dtype=np.int64)
    iou = box_iou(reference["boxes"][image, :n_ref], candidate["boxes"][image, :n_cand])
    iou[reference["labels"][image, :n_ref][:, None] != candidate["labels"][image, :n_cand][None, :]] = 0.0
    best_cand = iou.argmax(1)
    best_ref = iou.argmax(0)
    rows = np.arange(n_ref)
    paired = (best_ref[best_cand] == rows) & (iou[rows, best_cand] > (1 + nms_threshold) / 2)
    return np.stack([rows[paired], best_cand[paired]], axis=1)


@dataclass(frozen=True)
class Unpaired:
    """A detection one side has and the other does not."""

    image: int
    side: str  # "reference" or "candidate": who has it
    score: float
    other_full: bool  # the other side holds its maximum number of detections for this image
    other_lowest: float  # the other side's lowest score on this image (inf when it has none)

    def at_a_cut(self, score_tolerance: float, score_threshold: float) -> bool:
        """Whether the other side may have dropped it by noise: it is within the tolerance of the score
        threshold, or of the other side's lowest score when the other side is full (the top-D cut)."""
        at_threshold = self.score <= score_threshold + score_tolerance
        at_top_cut = self.other_full and self.score <= self.other_lowest + score_tolerance
        return at_threshold or at_top_cut

    def __str__(self) -> str:
        return f"image {self.image}: a detection of score {self.score:.4f} only in the {self.side}"


@dataclass
class Comparison:
    """Two sets of graph outputs for one batch, detections paired as sets."""

    batch_size: int
    paired: int
    figures: Figures
    mask_iou: float  # mean IoU of the paired m x m masks thresholded at 0.5
    unpaired: list[Unpaired] = field(default_factory=list)

    def unexplained(self, score_tolerance: float, score_threshold: float) -> list[Unpaired]:
        return [u for u in self.unpaired if not u.at_a_cut(score_tolerance, score_threshold)]


def _unpaired(
    outputs: dict[str, np.ndarray], other: dict[str, np.ndarray], image: int, rows: np.ndarray, side: str
) -> list[Unpaired]:
    n, n_other = int(outputs["num_detections"][image]), int(other["num_detections"][image])
    lonely = np.setdiff1d(np.arange(n), rows)
    other_lowest = float(other["scores"][image, n_other - 1]) if n_other else float("inf")
    full = n_other == other["scores"].shape[1]
    return [Unpaired(image, side, float(outputs["scores"][image, r]), full, other_lowest) for r in lonely]


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], nms_threshold: float) -> Comparison:
    """Pair each image's detections and measure the paired ones; list the unpaired ones."""
    figures, ious, paired, unpaired = Figures(), [], 0, []
    for i in range(len(reference["num_detections"])):
        pairs = pair_detections(reference, candidate, i, nms_threshold)
        r, c = pairs[:, 0], pairs[:, 1]
        ref_masks, cand_masks = reference["masks"][i, r], candidate["masks"][i, c]
        image_figures = Figures(
            box=box_error(reference["boxes"][i, r], candidate["boxes"][i, c]),
            score=float(np.abs(reference["scores"][i, r] - candidate["scores"][i, c]).max(initial=0)),
            mask=float(np.abs(ref_masks - cand_masks).max(initial=0)),
        )
        figures = figures.worst(image_figures)
        if len(pairs):
            ious.append(mask_iou(ref_masks > 0.5, cand_masks > 0.5))
        paired += len(pairs)
        unpaired += _unpaired(reference, candidate, i, r, "reference")
        unpaired += _unpaired(candidate, reference, i, c, "candidate")
    mean_iou = float(np.mean(ious)) if ious else 1.0
    return Comparison(len(reference["num_detections"]), paired, figures, mean_iou, unpaired)


@dataclass(frozen=True)
class Rule:
    """The verification rule: ONNX Runtime within ``factor`` x float32's measured noise + FLOOR."""

    score_threshold: float
    nms_threshold: float
    factor: float = DEFAULT_FACTOR

    def __str__(self) -> str:
        return (
            f"ONNX Runtime's distance to PyTorch float64 <= {self.factor:g} x PyTorch float32's + ({FLOOR}); "
            f"detections paired as sets (same class, IoU > {(1 + self.nms_threshold) / 2:g}); one side may lack a "
            f"detection only within the score tolerance of the threshold {self.score_threshold:g} or of the top-D cut"
        )

    def tolerance(self, noise: Figures) -> Figures:
        return Figures(
            box=self.factor * noise.box + FLOOR.box,
            score=self.factor * noise.score + FLOOR.score,
            mask=self.factor * noise.mask + FLOOR.mask,
        )

    def judge(self, float32: Comparison, onnx: Comparison) -> SampleVerification:
        return SampleVerification(float32, onnx, self.tolerance(float32.figures), self.score_threshold)


@dataclass
class SampleVerification:
    """One sample batch: PyTorch float32 and ONNX Runtime, each against PyTorch float64."""

    float32: Comparison
    onnx: Comparison
    tolerance: Figures
    score_threshold: float

    @property
    def unexplained(self) -> list[Unpaired]:
        return self.onnx.unexplained(self.tolerance.score, self.score_threshold)

    def ok(self) -> bool:
        return self.onnx.figures.within(self.tolerance) and not self.unexplained

    def problem(self) -> str:
        """What fails, in one line ('' when nothing does)."""
        over = [
            f"{name} error {getattr(self.onnx.figures, name):.1e} > {getattr(self.tolerance, name):.1e}"
            for name in ("box", "score", "mask")
            if getattr(self.onnx.figures, name) > getattr(self.tolerance, name)
        ]
        return "; ".join(over + [str(u) for u in self.unexplained[:3]])

    def __str__(self) -> str:
        at_cut = len(self.onnx.unpaired) - len(self.unexplained)
        return (
            f"batch {self.onnx.batch_size}: {self.onnx.paired} detections paired; "
            f"PyTorch float32 (noise): {self.float32.figures}; tolerance: {self.tolerance}; "
            f"ONNX Runtime: {self.onnx.figures}, {at_cut} unpaired at a cut, mask IoU {self.onnx.mask_iou:.4f}"
            + ("" if self.ok() else f"; FAILS: {self.problem()}")
        )
