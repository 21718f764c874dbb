"""Training-time assignment of anchors / proposals to ground truth, and balanced sampling.

Batched over images: ground truth is padded to a common count with a validity mask, so one set of
tensor ops serves the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def pairwise_iou(boxes: Tensor, gt: Tensor) -> Tensor:
    """IoU [B, R, G] between ``boxes`` [B, R, 4] (or [R, 4], shared) and ``gt`` [B, G, 4]."""
    if boxes.dim() == 2:
        boxes = boxes.expand(gt.shape[0], -1, -1)
    area_b = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    area_g = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    lt = torch.maximum(boxes[:, :, None, :2], gt[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], gt[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_b[:, :, None] + area_g[:, None, :] - inter)


def match(iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool) -> Tensor:
    """Index of the matched ground truth per row of ``iou`` [B, R, G], or BELOW_LOW_THRESHOLD /
    BETWEEN_THRESHOLDS (Faster R-CNN's rule; with ``allow_low_quality_matches`` each ground truth also
    keeps the rows it overlaps best, so that no object is left without an anchor)."""
    iou = torch.where(gt_valid[:, None, :], iou, torch.full_like(iou, -1.0))
    best, matches = iou.max(dim=2)
    result = torch.where(best < low, torch.full_like(matches, BELOW_LOW_THRESHOLD), matches)
    result = torch.where((best >= low) & (best < high), torch.full_like(matches, BETWEEN_THRESHOLDS), result)
    if allow_low_quality_matches:
        best_per_gt = iou.max(dim=1).values
        is_best = (iou == best_per_gt[:, None, :]) & (best_per_gt[:, None, :] > 0) & gt_valid[:, None, :]
        result = torch.where(is_best.any(dim=2), matches, result)
    return result


def sample_balanced(labels: Tensor, batch_size_per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random positive / negative masks [B, R]: at most ``positive_fraction`` positives per image, the
    rest negatives, ``batch_size_per_image`` in all (fewer when an image lacks candidates).

    ``labels``: > 0 positive, 0 negative, < 0 ignored.
    """
    positive = labels > 0
    negative = labels == 0
    num_pos = positive.sum(1).clamp(max=int(batch_size_per_image * positive_fraction))
    num_neg = negative.sum(1).clamp(max=batch_size_per_image - num_pos)
    return (_random_subset(positive, num_pos, batch_size_per_image),
            _random_subset(negative, num_neg, batch_size_per_image))


def _random_subset(candidates: Tensor, count: Tensor, most: int) -> Tensor:
    """``count`` [B] (at most ``most``) random members of each row of the boolean ``candidates`` [B, R]: those
    with the smallest random keys. A partial selection of ``most``, not a sort of the row: the RPN's rows are
    every anchor, 267k at 800x1333."""
    keys = torch.where(candidates, torch.rand(candidates.shape, device=candidates.device), 2.0)
    k = min(most, candidates.shape[1])
    smallest = keys.topk(k, dim=1, largest=False).indices  # ascending keys
    chosen = torch.arange(k, device=candidates.device)[None, :] < count[:, None]
    return torch.zeros_like(candidates).scatter_(1, smallest, chosen)


def pad_targets(
    targets: list[dict[str, Tensor]], device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image ground truth into boxes [B, G, 4] (of ``dtype``), labels [B, G], valid [B, G] (G >= 1)."""
    count = max([1] + [len(t["boxes"]) for t in targets])
    boxes = torch.zeros(len(targets), count, 4, device=device, dtype=dtype)
    labels = torch.zeros(len(targets), count, dtype=torch.int64, device=device)
    valid = torch.zeros(len(targets), count, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        boxes[i, :n] = t["boxes"].to(device, dtype)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid
