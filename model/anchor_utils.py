"""Anchors for the RPN (Mask R-CNN, section 3; FPN paper, section 4.1): 5 scales, 32 to 512 pixels, x 3
aspect ratios. With FPN one scale per level, P2 to P6; with the C4 head all five on its one level."""

from __future__ import annotations

import torch
from torch import Tensor

from contract import padded_size
from model.backbone import FPN_STRIDES, valid_extent

ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per FPN level, P2..P6
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# The RPN's levels: (stride, anchor sizes at that level).
AnchorLevels = tuple[tuple[int, tuple[int, ...]], ...]
FPN_ANCHORS: AnchorLevels = tuple((stride, (size,)) for stride, size in zip(FPN_STRIDES, ANCHOR_SIZES, strict=True))


def cell_anchors(sizes: int | tuple[int, ...], ratios: tuple[float, ...] = ASPECT_RATIOS) -> Tensor:
    """The [A, 4] anchors of one level centred on (0, 0), A = len(ratios) x len(sizes), ordered and rounded
    like torchvision's AnchorGenerator (all sizes of the first ratio, then of the next)."""
    scales = torch.as_tensor(sizes if isinstance(sizes, tuple) else (sizes,), dtype=torch.float32)
    ratios_t = torch.as_tensor(ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def anchor_strides(image_sizes: Tensor, stride: int) -> Tensor:
    """Each image's anchor stride (height, width) [B, 2] on the level of nominal ``stride``, as torchvision
    derives it for the image alone: its padded size // its feature map's size.

    The padded size is the image's own (its real size rounded up to the contract's divisibility), not
    the batch's, so an image's anchors do not depend on what it is batched with. For P2-P5 this is the
    nominal stride; for P6 it is not when the padded side is an odd multiple of 32: an image padded to
    800 rows has a P6 map of ceil(800 / 64) = 13 rows and torchvision's anchors 800 // 13 = 61 px apart.
    """
    padded = torch.stack(padded_size(image_sizes[:, 0], image_sizes[:, 1]), dim=1)
    return torch.div(padded, valid_extent(padded, stride), rounding_mode="floor")


def grid_anchors(height: int, width: int, strides: Tensor, cells: Tensor) -> Tensor:
    """Anchors [B, H * W * A, 4] for a feature map, ordered (row, column, anchor) like the RPN outputs;
    image ``i``'s are ``strides[i]`` (height, width) apart, in the dtype of ``cells``."""
    b = strides.shape[0]
    rows = torch.arange(height, device=cells.device)[None, :] * strides[:, 0:1]
    cols = torch.arange(width, device=cells.device)[None, :] * strides[:, 1:2]
    sy = rows[:, :, None].expand(b, height, width).to(cells.dtype)
    sx = cols[:, None, :].expand(b, height, width).to(cells.dtype)
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(b, -1, 1, 4)
    return (shifts + cells.view(1, 1, -1, 4)).reshape(b, -1, 4)
