"""The Mask R-CNN instantiations this project builds, one explicit entry each.

An entry says what tells it from the others (Mask R-CNN, section 3.1 "Network Architecture": the
backbone's body, the heads); ``build_model`` reads it. The paper's Table 2a compares R-50-C4, R-101-C4,
R-50-FPN, R-101-FPN and X-101-FPN (ResNeXt-101 32x8d, Xie et al., arXiv 1611.05431); the C4 entries
are the Faster R-CNN ResNet head (model/c4.py). ``r50_fpn_v2`` is torchvision's improved
recipe (``maskrcnn_resnet50_fpn_v2``, after Li et al., "Benchmarking Detection Transfer Learning with
Vision Transformers", arXiv 2111.11429): batch norm in the FPN and in the heads, a two-convolution RPN
head and a box head of four convolutions and one fully connected layer. Adding an instantiation is
adding an entry here, and a field where it needs a kind of layer no entry has yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

# ``norm`` option of build_model -> batch-norm layer: frozen statistics for fine-tuning and inference
# (torchvision's checkpoints load into either), trainable ones to train from scratch.
# "syncbn" builds batch norms that model.train converts to SyncBatchNorm under DDP (same state dict as "bn").
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "syncbn": nn.BatchNorm2d,
}


class ProposalCounts(NamedTuple):
    """RPN proposals per image: the best ``pre_nms_*`` anchors of each level go into NMS, the best
    ``post_nms_*`` survivors are kept, in training and at test time."""

    pre_nms_train: int
    post_nms_train: int
    pre_nms_test: int
    post_nms_test: int


# FPN: torchvision's and Detectron2's counts. C4: Detectron2's C4 counts (Faster R-CNN's 6000 before NMS at
# test time) and the paper's 300 proposals at test time (section 3.1, "Inference": 300 for C4, 1000 for FPN).
FPN_PROPOSALS = ProposalCounts(2000, 2000, 1000, 1000)
C4_PROPOSALS = ProposalCounts(12000, 2000, 6000, 300)


@dataclass(frozen=True)
class Architecture:
    body: str  # torchvision's ResNet builder of the body (model.backbone.RESNET_LAYOUTS); its ImageNet weights load
    head: str = "fpn"  # "fpn": FPN backbone and heads; "c4": RoIs from C4, res5 per RoI as the box head
    proposals: ProposalCounts = FPN_PROPOSALS
    fpn_norm: bool = False  # a batch norm after each FPN convolution
    rpn_convs: int = 1  # 3x3 convolutions of the RPN head before its two 1x1 outputs
    box_head_convs: int = 0  # 0: the paper's two fully connected layers; n: n 3x3 convolutions, then one
    head_norm: bool = False  # a batch norm after each convolution of the box and mask heads
    torchvision_builder: str | None = None  # the torchvision builder whose state dicts load as they are


ARCHITECTURES: dict[str, Architecture] = {
    "r18_fpn": Architecture(body="resnet18"),
    "r50_fpn": Architecture(body="resnet50", torchvision_builder="maskrcnn_resnet50_fpn"),
    "r101_fpn": Architecture(body="resnet101"),
    "x101_fpn": Architecture(body="resnext101_32x8d"),
    "r50_fpn_v2": Architecture(
        body="resnet50",
        fpn_norm=True,
        rpn_convs=2,
        box_head_convs=4,
        head_norm=True,
        torchvision_builder="maskrcnn_resnet50_fpn_v2",
    ),
    "r50_c4": Architecture(body="resnet50", head="c4", proposals=C4_PROPOSALS),
    "r101_c4": Architecture(body="resnet101", head="c4", proposals=C4_PROPOSALS),
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
