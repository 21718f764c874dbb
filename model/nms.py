"""Multi-class non-maximum suppression as a custom op with the semantics of ONNX ``NonMaxSuppression``.

One op serves both stages: the RPN (one "class" per FPN level, NMS within each level) and the box
head (one batch entry per image and class, so every class keeps its own class-specific boxes). The
op exports to the standard ONNX node, so ONNX Runtime and TensorRT run it natively; eagerly it runs
torchvision's NMS once over all (batch, class) groups.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms


@torch.library.custom_op("maskrcnn::multiclass_nms", mutates_args=())
def multiclass_nms(
    boxes: Tensor, scores: Tensor, max_output_per_class: int, iou_threshold: float, score_threshold: float
) -> Tensor:
    """Greedy NMS of ``boxes`` [B, N, 4] (x1, y1, x2, y2) under ``scores`` [B, C, N].

    Within each (batch, class) group, candidates scoring above ``score_threshold`` are visited in
    decreasing score order and a box is dropped when its IoU with a kept box exceeds
    ``iou_threshold``; at most ``max_output_per_class`` are kept per group. Returns the kept
    (batch, class, box) index triples [S, 3], ordered by batch, class, then decreasing score.
    """
    num_classes = scores.shape[1]
    b, c, n = (scores > score_threshold).nonzero(as_tuple=True)
    group = b * num_classes + c
    dtype = torch.promote_types(boxes.dtype, torch.float32)  # torchvision's CPU NMS has no float16 kernel
    keep = batched_nms(boxes[b, n].to(dtype), scores[b, c, n].to(dtype), group, iou_threshold)
    # keep is sorted by score; a stable sort by group keeps that order inside each group.
    order = torch.sort(group[keep], stable=True).indices
    keep = keep[order]
    kept_group = group[keep]
    first_of_group = torch.searchsorted(kept_group, kept_group, right=False)
    rank = torch.arange(keep.numel(), device=keep.device) - first_of_group
    keep = keep[rank < max_output_per_class]
    return torch.stack([b[keep], c[keep], n[keep]], dim=1)


@multiclass_nms.register_fake
def _multiclass_nms_fake(boxes, scores, max_output_per_class, iou_threshold, score_threshold):
    num_selected = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((num_selected, 3), dtype=torch.int64)


def keep_mask(selected: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Scatter the (batch, class, box) triples of ``multiclass_nms`` into a boolean mask of ``shape`` [B, C, N]."""
    mask = torch.zeros(shape, dtype=torch.bool, device=selected.device)
    return mask.index_put(
        (selected[:, 0], selected[:, 1], selected[:, 2]), torch.ones_like(selected[:, 0], dtype=torch.bool)
    )


# A dropped candidate's score: below every probability. NMS is told to keep scores above the floor,
# halfway between the two, so it visits exactly the candidates that were not dropped.
DROPPED_SCORE = -1.0
_NMS_SCORE_FLOOR = -0.5


def nms_top_k(
    boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float, max_per_group: int, k: int, images: int
) -> tuple[Tensor, Tensor, Tensor]:
    """NMS within groups, then the ``k`` best survivors of each image, as fixed-size tensors.

    ``boxes`` [E, N, 4] and ``scores``, ``valid`` [E, G, N] in ``multiclass_nms``'s layout, where the
    ``E`` entries are ``images`` consecutive blocks of ``E / images`` entries (one entry per image for
    the RPN, whose groups are FPN levels; one per image and class for the box head). Candidates that
    are not ``valid`` are neither suppressors nor kept. Returns the top scores [B, k'], each one's flat
    index into its image's (entry, group, box) candidates [B, k'], and whether it is real [B, k']
    (k' = min(k, candidates per image); rows past an image's survivors are not real).
    """
    masked = torch.where(valid, scores, DROPPED_SCORE)
    selected = multiclass_nms(boxes, masked, max_per_group, iou_threshold, _NMS_SCORE_FLOOR)
    kept = keep_mask(selected, tuple(masked.shape)).reshape(images, -1)
    kept_scores = torch.where(kept, masked.reshape(images, -1), DROPPED_SCORE)
    top, index = kept_scores.topk(torch.sym_min(k, kept_scores.shape[1]), dim=1)
    return top, index, top > _NMS_SCORE_FLOOR
