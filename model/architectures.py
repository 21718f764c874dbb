"""The Mask R-CNN instantiations this project builds, one explicit entry each.

An entry says what tells it from the others (Mask R-CNN, section 3.1 "Network Architecture": the
backbone's depth, the heads); ``build_model`` reads it. ``r50_fpn_v2`` is torchvision's improved
recipe (``maskrcnn_resnet50_fpn_v2``, after Li et al., "Benchmarking Detection Transfer Learning with
Vision Transformers", arXiv 2111.11429): batch norm in the FPN and in the heads, a two-convolution RPN
head and a box head of four convolutions and one fully connected layer. Adding an instantiation is
adding an entry here, and a field where it needs a kind of layer no entry has yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# ``norm`` option of build_model -> batch-norm layer: frozen statistics for fine-tuning and inference
# (torchvision's checkpoints load into either), trainable ones to train from scratch.
NORM_LAYERS: dict[str, type[nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


@dataclass(frozen=True)
class Architecture:
    depth: int  # ResNet depth of the body
    fpn_norm: bool = False  # a batch norm after each FPN convolution
    rpn_convs: int = 1  # 3x3 convolutions of the RPN head before its two 1x1 outputs
    box_head_convs: int = 0  # 0: the paper's two fully connected layers; n: n 3x3 convolutions, then one
    head_norm: bool = False  # a batch norm after each convolution of the box and mask heads
    torchvision_builder: str | None = None  # the torchvision builder whose state dicts load as they are


ARCHITECTURES: dict[str, Architecture] = {
    "r18_fpn": Architecture(depth=18),
    "r50_fpn": Architecture(depth=50, torchvision_builder="maskrcnn_resnet50_fpn"),
    "r101_fpn": Architecture(depth=101),
    "r50_fpn_v2": Architecture(
        depth=50,
        fpn_norm=True,
        rpn_convs=2,
        box_head_convs=4,
        head_norm=True,
        torchvision_builder="maskrcnn_resnet50_fpn_v2",
    ),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def norm_layer(norm: str) -> type[nn.Module]:
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(sorted(NORM_LAYERS))}")
    return NORM_LAYERS[norm]


def for_torchvision_builder(builder: str) -> str:
    """Our architecture that loads the state dicts of torchvision's ``builder``."""
    for name, spec in ARCHITECTURES.items():
        if spec.torchvision_builder == builder:
            return name
    loadable = ", ".join(sorted(s.torchvision_builder for s in ARCHITECTURES.values() if s.torchvision_builder))
    raise ValueError(f"no architecture here loads torchvision's {builder} weights (these do: {loadable})")
