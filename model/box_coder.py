"""Box regression parameterization of R-CNN (Girshick et al.): centre offsets scaled by the reference
size, log-space width/height, each divided by a weight. Kept identical to torchvision's BoxCoder so
that torchvision checkpoints decode to the same boxes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Largest log-scale change a regression may apply: exp(clip) = 1000 / 16 (torchvision's bound).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
# Where the smooth-L1 loss on these regressions turns from quadratic to linear, for the RPN and the box
# head alike (torchvision's and Detectron2's 1/9).
SMOOTH_L1_BETA = 1.0 / 9


def encode(gt: Tensor, reference: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Regression targets [..., 4] that map ``reference`` boxes onto ``gt`` boxes (both [..., 4])."""
    wx, wy, ww, wh = weights
    ref_w = reference[..., 2] - reference[..., 0]
    ref_h = reference[..., 3] - reference[..., 1]
    ref_x = reference[..., 0] + 0.5 * ref_w
    ref_y = reference[..., 1] + 0.5 * ref_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_x = gt[..., 0] + 0.5 * gt_w
    gt_y = gt[..., 1] + 0.5 * gt_h
    return torch.stack(
        [
            wx * (gt_x - ref_x) / ref_w,
            wy * (gt_y - ref_y) / ref_h,
            ww * torch.log(gt_w / ref_w),
            wh * torch.log(gt_h / ref_h),
        ],
        dim=-1,
    )


def decode(deltas: Tensor, reference: Tensor, weights: tuple[float, float, float, float]) -> Tensor:
    """Apply ``deltas`` [..., R, K*4] to ``reference`` boxes [..., R, 4] -> boxes [..., R, K, 4]."""
    wx, wy, ww, wh = weights
    deltas = deltas.unflatten(-1, (-1, 4))
    ref_w = (reference[..., 2] - reference[..., 0])[..., None]
    ref_h = (reference[..., 3] - reference[..., 1])[..., None]
    ref_x = reference[..., 0, None] + 0.5 * ref_w
    ref_y = reference[..., 1, None] + 0.5 * ref_h
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=BBOX_XFORM_CLIP)
    dh = (deltas[..., 3] / wh).clamp(max=BBOX_XFORM_CLIP)
    ctr_x = dx * ref_w + ref_x
    ctr_y = dy * ref_h + ref_y
    half_w = 0.5 * (torch.exp(dw) * ref_w)
    half_h = 0.5 * (torch.exp(dh) * ref_h)
    return torch.stack([ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h], dim=-1)


def clip_to_size(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip boxes [B, ..., 4] to each image's real size ``image_sizes`` [B, 2] (height, width)."""
    shape = (image_sizes.shape[0],) + (1,) * (boxes.dim() - 2)
    height = image_sizes[:, 0].to(boxes.dtype).view(shape)
    width = image_sizes[:, 1].to(boxes.dtype).view(shape)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), width)
    y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), height)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), width)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def is_large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """Boxes whose width and height both reach ``min_size`` (torchvision's remove_small_boxes)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)
