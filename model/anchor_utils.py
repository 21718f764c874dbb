"""Anchors for the FPN RPN (Mask R-CNN, section 3; FPN paper, section 4.1): one scale per level,
32 to 512 pixels on P2 to P6, three aspect ratios each."""

from __future__ import annotations

import torch
from torch import Tensor

ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per FPN level, P2..P6
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(size: int, ratios: tuple[float, ...] = ASPECT_RATIOS) -> Tensor:
    """The [A, 4] anchors centred on (0, 0), rounded like torchvision's AnchorGenerator."""
    ratios_t = torch.as_tensor(ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def grid_anchors(height: int, width: int, stride: int, cells: Tensor) -> Tensor:
    """Anchors [H * W * A, 4] for a feature map, ordered (row, column, anchor) like the RPN outputs."""
    shifts_x = torch.arange(width, dtype=torch.float32, device=cells.device) * stride
    shifts_y = torch.arange(height, dtype=torch.float32, device=cells.device) * stride
    sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cells.view(1, -1, 4)).reshape(-1, 4)
