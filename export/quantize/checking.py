"""The int8 graph checked against the float32 one on held-out images (never the calibration ones): each
confident float32 detection must have an int8 one of the same class whose box overlaps it with IoU >= 0.9
(``match_detections``); the share of those matched and their mean mask IoU must reach a documented bar
(``VerificationBar``). Also: every quantization scale calibrated (``check_scales``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from pycocotools import mask as mask_utils

from export.quantize import QuantizeError
from export.quantize.calibration import read_rgb
from export.verification import box_iou
from service.core.postprocess import encode_masks
from service.core.runtime import OnnxModel, Prediction

# The verification bar (the quantization contract). Detections of the float32 graph scoring at least
# VERIFY_SCORE_THRESHOLD are compared; an int8 detection matches one when it has the same label and its
# box has IoU >= MATCH_IOU with it. At least MIN_MATCHED of them must be matched, with a mean mask IoU
# (masks pasted into the image, as served) of at least MIN_MASK_IOU.
VERIFY_SCORE_THRESHOLD = 0.5
MATCH_IOU = 0.9
MIN_MATCHED = 0.9
MIN_MASK_IOU = 0.9


def check_scales(graph_model: onnx.ModelProto) -> None:
    """Every quantization scale finite and positive: a tensor that calibration never saw a value of (one
    that was empty on every calibration image) gets none, and must not reach a file."""
    inits = {init.name: init for init in graph_model.graph.initializer}
    for node in graph_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise QuantizeError(f"no calibrated range for {node.input[0]} (empty on every calibration image)")


@dataclass
class Agreement:
    """How the int8 graph's detections agree with the float32 graph's on held-out images."""

    images: int
    reference: int  # float32 detections scoring >= the verification threshold
    matched: int
    mask_iou: float  # mean over matched pairs
    mean_score_error: float
    max_score_error: float

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference if self.reference else 0.0

    def ok(self, min_matched: float = MIN_MATCHED, min_mask_iou: float = MIN_MASK_IOU) -> bool:
        return self.reference > 0 and self.matched_fraction >= min_matched and self.mask_iou >= min_mask_iou

    def __str__(self) -> str:
        return (
            f"{self.images} held-out images: {self.matched}/{self.reference} float32 detections matched "
            f"({100 * self.matched_fraction:.1f}%, same label, box IoU >= {MATCH_IOU}), mean mask IoU "
            f"{self.mask_iou:.4f}, score error mean {self.mean_score_error:.4f} max {self.max_score_error:.4f}"
        )


def match_detections(reference: Prediction, candidate: Prediction, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (reference rows, candidate rows): each reference detection scoring >= ``threshold``, best
    first, takes the unmatched candidate of its label with the highest box IoU, if that is >= MATCH_IOU.
    Candidates of any score may match, so a detection whose score crossed the threshold still counts."""
    rows = np.flatnonzero(reference.scores >= threshold)
    iou = box_iou(reference.boxes[rows], candidate.boxes)
    iou[reference.labels[rows][:, None] != candidate.labels[None, :]] = 0.0
    pairs = []
    for r in range(len(rows)):  # rows are sorted by score; greedy, as COCO's matching is
        c = int(np.argmax(iou[r])) if iou.shape[1] else 0
        if iou.shape[1] and iou[r, c] >= MATCH_IOU:
            pairs.append((rows[r], c))
            iou[:, c] = 0.0
    matched = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return matched[:, 0], matched[:, 1]


def pasted_mask_iou(
    reference: Prediction, ref_rows: np.ndarray, candidate: Prediction, cand_rows: np.ndarray
) -> np.ndarray:
    """Mask IoU of each pair, the masks pasted into the image and binarized by the service's post-processing."""
    def rles(pred: Prediction, rows: np.ndarray) -> list[dict[str, object]]:
        encoded = encode_masks(pred.masks[rows], pred.boxes[rows], pred.image_size, polygons=False).rles
        assert encoded is not None  # rle is on by default
        return encoded

    if not len(ref_rows):
        return np.zeros(0)
    return np.diag(mask_utils.iou(rles(reference, ref_rows), rles(candidate, cand_rows), [0] * len(cand_rows)))


def predict_each(model: OnnxModel, files: Sequence[Path]) -> list[Prediction]:
    """``model`` on each image alone, at the file's default score threshold."""
    return [model.predict([read_rgb(path)])[0] for path in files]


def compare_graphs(
    references: Sequence[Prediction], candidate: Sequence[Prediction], threshold: float = VERIFY_SCORE_THRESHOLD
) -> Agreement:
    """The float32 graph's predictions and the int8 graph's on the same images, compared."""
    ious, score_errors = [], []
    for ref, cand in zip(references, candidate, strict=True):
        ref_rows, cand_rows = match_detections(ref, cand, threshold)
        ious.append(pasted_mask_iou(ref, ref_rows, cand, cand_rows))
        score_errors.append(np.abs(ref.scores[ref_rows] - cand.scores[cand_rows]))
    ious_all, errors = np.concatenate(ious), np.concatenate(score_errors)
    return Agreement(
        images=len(references),
        reference=confident(references, threshold),
        matched=len(ious_all),
        mask_iou=float(ious_all.mean()) if len(ious_all) else 0.0,
        mean_score_error=float(errors.mean()) if len(errors) else 0.0,
        max_score_error=float(errors.max()) if len(errors) else 0.0,
    )


def confident(predictions: Sequence[Prediction], threshold: float) -> int:
    return sum(int((pred.scores >= threshold).sum()) for pred in predictions)


@dataclass(frozen=True)
class VerificationBar:
    """What verification must reach (defaults: the documented bar)."""

    min_matched: float = MIN_MATCHED
    min_mask_iou: float = MIN_MASK_IOU
    score_threshold: float = VERIFY_SCORE_THRESHOLD
