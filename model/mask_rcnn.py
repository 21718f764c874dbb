"""Mask R-CNN (He et al., arXiv 1703.06870): the top-level module and its builder.

The forward pass reads like the paper: normalize -> backbone -> RPN -> RoI heads. In inference it
takes exactly the tensors of the exported ONNX graph (a zero-padded uint8 batch and each image's real
size) and returns its fixed-size outputs, so the PyTorch model and the ONNX file are one contract.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contract import (
    COCO_NUM_CLASSES,
    DEFAULT_ARCH,
    DEFAULT_DETECTIONS_PER_IMAGE,
    DEFAULT_NMS_THRESHOLD,
    DEFAULT_SCORE_THRESHOLD,
)
from model.architectures import architecture, norm_layer
from model.backbone import FPN_CHANNELS, ResNetFPN, valid_mask
from model.c4 import C4_ANCHORS, Res5RoIHeads, resnet_c4
from model.roi_heads import MASK_HEAD_CHANNELS, REPRESENTATION_SIZE, FPNRoIHeads, RoIHeads
from model.rpn import RegionProposalNetwork

# torchvision's ImageNet statistics, applied to RGB in [0, 1].
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


class MaskRCNN(nn.Module):
    image_mean: Tensor  # buffers: [1, 3, 1, 1]
    image_std: Tensor

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads):
        """``backbone`` (ResNetFPN or model.c4.ResNetC4) maps a normalized batch and its image sizes to the
        feature maps the RPN and the RoI heads read."""
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.register_buffer("image_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """uint8 RGB -> normalized float (the model's dtype), then zero outside each image (torchvision
        normalizes, then pads)."""
        x = (images.to(self.image_mean.dtype) / 255.0 - self.image_mean) / self.image_std
        return x * valid_mask(image_sizes, 1, x.shape[-2], x.shape[-1], x.dtype)

    def forward(
        self,
        images: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        score_threshold: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Training: the loss terms. Inference: boxes, scores, labels, masks, num_detections.

        ``images`` uint8 [B, 3, H, W] zero-padded; ``image_sizes`` int64 [B, 2] real (height, width);
        ``score_threshold`` float [B], optional per-image threshold above the model's own.
        """
        x = self.normalize(images, image_sizes)
        features = self.backbone(x, image_sizes)
        proposals, proposal_valid, rpn_losses = self.rpn(features, image_sizes, targets)
        heads = self.roi_heads(features, proposals, proposal_valid, image_sizes, targets, score_threshold)
        if self.training:
            return {**rpn_losses, **heads}
        return heads


def build_model(
    arch: str = DEFAULT_ARCH,
    num_classes: int = COCO_NUM_CLASSES,
    norm: str = "frozen_bn",
    aligned: bool = False,
    score_thresh: float = DEFAULT_SCORE_THRESHOLD,
    nms_thresh: float = DEFAULT_NMS_THRESHOLD,
    detections_per_img: int = DEFAULT_DETECTIONS_PER_IMAGE,
    rpn_pre_nms_top_n_test: int | None = None,
    rpn_post_nms_top_n_test: int | None = None,
    rpn_pre_nms_top_n_train: int | None = None,
    rpn_post_nms_top_n_train: int | None = None,
    box_batch_size_per_image: int = 512,
    width: int = 64,
    fpn_channels: int = FPN_CHANNELS,
    representation_size: int = REPRESENTATION_SIZE,
    mask_channels: int = MASK_HEAD_CHANNELS,
) -> MaskRCNN:
    """Mask R-CNN: ``arch`` is one of ``model.architectures.ARCHITECTURES`` (``r50_fpn``, ``r101_fpn``,
    ``r18_fpn``, ``x101_fpn``, ``r50_fpn_v2``, and the C4 heads ``r50_c4``, ``r101_c4``).

    Defaults are the paper's and torchvision's: ``norm="frozen_bn"`` for fine-tuning and torchvision
    checkpoints, ``norm="bn"`` to train from scratch (every batch norm of the model: the body's, and the
    FPN's and heads' where the architecture has them). ``aligned`` selects half-pixel RoIAlign
    (Detectron2's ROIAlignV2); torchvision's checkpoints were trained with ``aligned=False``. The RPN's
    proposal counts default to the architecture's (``Architecture.proposals``). ``width``,
    ``fpn_channels``, ``representation_size`` and ``mask_channels`` shrink the network (the paper's values
    are 64, 256, 1024, 256) for small models; the C4 heads have no FPN and no fully connected box head,
    so only ``width`` and ``mask_channels`` apply to them.
    """
    spec = architecture(arch)
    norm_cls = norm_layer(norm)
    given = {
        "pre_nms_train": rpn_pre_nms_top_n_train,
        "post_nms_train": rpn_post_nms_top_n_train,
        "pre_nms_test": rpn_pre_nms_top_n_test,
        "post_nms_test": rpn_post_nms_top_n_test,
    }
    counts = spec.proposals._replace(**{k: v for k, v in given.items() if v is not None})
    pre_nms = {"training": counts.pre_nms_train, "testing": counts.pre_nms_test}
    post_nms = {"training": counts.post_nms_train, "testing": counts.post_nms_test}
    settings = {
        "batch_size_per_image": box_batch_size_per_image,
        "score_thresh": score_thresh,
        "nms_thresh": nms_thresh,
        "detections_per_img": detections_per_img,
    }
    if spec.head == "c4":
        if (fpn_channels, representation_size) != (FPN_CHANNELS, REPRESENTATION_SIZE):
            raise ValueError(
                f"{arch} has no FPN and no fully connected box head: fpn_channels and representation_size "
                "do not apply to it"
            )
        backbone, res5 = resnet_c4(spec.body, norm_cls, width)
        return MaskRCNN(
            backbone,
            RegionProposalNetwork(backbone.out_channels, pre_nms, post_nms, conv_depth=spec.rpn_convs,
                                  anchors=C4_ANCHORS),
            Res5RoIHeads(res5, num_classes, mask_channels, aligned, **settings),
        )
    return MaskRCNN(
        ResNetFPN(spec.body, norm_cls, width, fpn_channels, fpn_norm=spec.fpn_norm),
        RegionProposalNetwork(fpn_channels, pre_nms, post_nms, conv_depth=spec.rpn_convs),
        FPNRoIHeads(
            num_classes,
            fpn_channels,
            representation_size,
            mask_channels,
            aligned=aligned,
            box_head_convs=spec.box_head_convs,
            norm_layer=norm_cls if spec.head_norm else None,
            **settings,
        ),
    )
