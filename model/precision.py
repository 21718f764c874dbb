"""Mixed precision (``amp`` in model.train): autocast runs convolutions and linear layers in bfloat16 or
float16; what needs float32 gets it back here. RoIAlign's sampling points, anchors, box decoding and the
losses lose real precision in 16 bits (a float16 box coordinate near 1000 px is off by up to 0.5 px), so, as
torchvision does for its roi_align, they run in float32. Outside autocast nothing changes: a model run or
exported in one dtype stays in it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# model.train's ``amp`` setting -> the dtype autocast computes in (None: autocast off).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def float32_under_autocast(x: Tensor) -> Tensor:
    """``x`` in float32 when autocast is on for its device, else ``x`` itself."""
    return x.float() if torch.is_autocast_enabled(x.device.type) else x
