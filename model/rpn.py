"""Region Proposal Network over FPN levels, or C4 alone (Faster R-CNN; Mask R-CNN section 3, stage one).

Inference is batched and export-friendly: proposals come out as a fixed [B, post_nms_top_n, 4]
tensor with a validity mask instead of a Python list of per-image tensors. Anchors in a batch's
padding are never proposed, so an image's proposals do not depend on what it is batched with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead

from model import box_coder
from model.anchor_utils import ASPECT_RATIOS, FPN_ANCHORS, AnchorLevels, anchor_strides, cell_anchors, grid_anchors
from model.backbone import FPN_CHANNELS, PaddingMasks, valid_mask
from model.matcher import BELOW_LOW_THRESHOLD, match, pad_targets, pairwise_iou, sample_balanced
from model.nms import nms_top_k
from model.precision import float32_under_autocast

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
MIN_PROPOSAL_SIZE = 1e-3


class RPNLevel(NamedTuple):
    """The RPN head's outputs on one level, flattened in (row, column, anchor) order."""

    logits: Tensor  # [B, H*W*A] objectness
    deltas: Tensor  # [B, H*W*A, 4] box regression
    anchors: Tensor  # [B, H*W*A, 4], each image's own (see anchor_utils.anchor_strides)
    inside: Tensor  # [B, H*W*A] anchor centred inside the image's real extent (not in the padding)


class RegionProposalNetwork(nn.Module):
    def __init__(
        self,
        in_channels: int = FPN_CHANNELS,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        score_thresh: float = 0.0,
        conv_depth: int = 1,
        anchors: AnchorLevels = FPN_ANCHORS,
    ):
        super().__init__()
        self.anchors = anchors
        self.head = RPNHead(in_channels, len(ASPECT_RATIOS) * len(anchors[0][1]), conv_depth=conv_depth)
        self.pre_nms_top_n = pre_nms_top_n or {"training": 2000, "testing": 1000}
        self.post_nms_top_n = post_nms_top_n or {"training": 2000, "testing": 1000}
        self.nms_thresh = nms_thresh
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh

    def _mode(self) -> str:
        return "training" if self.training else "testing"

    def forward(
        self, features: list[Tensor], image_sizes: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Proposals [B, P, 4], their validity [B, P], and (training) the RPN losses."""
        logits, deltas = self.head_outputs(features, image_sizes)
        levels = []
        for level_logits, level_deltas, (stride, sizes) in zip(logits, deltas, self.anchors, strict=True):
            b, a, h, w = level_logits.shape
            cells = cell_anchors(sizes).to(level_logits)
            anchors = grid_anchors(h, w, anchor_strides(image_sizes, stride), cells)
            inside = valid_mask(image_sizes, stride, h, w, torch.bool)[:, 0, :, :, None].expand(b, h, w, a)
            levels.append(
                RPNLevel(
                    logits=level_logits.permute(0, 2, 3, 1).reshape(b, -1),
                    deltas=level_deltas.view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4),
                    anchors=anchors,
                    inside=inside.reshape(b, -1),
                )
            )
        proposals, valid = self.select_proposals(levels, image_sizes)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses = self.loss(levels, targets)
        return proposals, valid, losses

    def head_outputs(self, features: list[Tensor], image_sizes: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's RPNHead on each level, padding-invariant: the FPN's features are zero outside each
        image, but a 3x3 convolution's output is not (its bias), so when a second one reads it (v2's
        two-convolution head) it is zeroed there first."""
        masks = PaddingMasks(image_sizes)
        *inner, last = self.head.conv  # Conv2dNormActivation blocks: a 3x3 convolution and a ReLU
        logits, deltas = [], []
        for feature, (stride, _) in zip(features, self.anchors, strict=True):
            x = feature
            for block in inner:
                x = masks.relu(block[0](x), stride)
            x = last(x)
            # Anchors take the logits' dtype, and box decoding needs float32 (model.precision).
            logits.append(float32_under_autocast(self.head.cls_logits(x)))
            deltas.append(float32_under_autocast(self.head.bbox_pred(x)))
        return logits, deltas

    def select_proposals(self, levels: list[RPNLevel], image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k anchors per level, decoded, clipped, NMS within each level, top-k overall."""
        level_boxes, level_logits, level_of = [], [], []
        for level, lv in enumerate(levels):
            scores = torch.where(lv.inside, lv.logits.detach(), float("-inf"))
            k = torch.sym_min(self.pre_nms_top_n[self._mode()], scores.shape[1])
            top, idx = scores.topk(k, dim=1)
            picked = lv.deltas.detach().gather(1, idx[..., None].expand(-1, -1, 4))
            anchors = lv.anchors.gather(1, idx[..., None].expand(-1, -1, 4))
            level_boxes.append(box_coder.decode(picked, anchors, RPN_BOX_WEIGHTS)[..., 0, :])
            level_logits.append(top)
            level_of.append(torch.full_like(idx[0], level))
        boxes = box_coder.clip_to_size(torch.cat(level_boxes, 1), image_sizes)
        logits = torch.cat(level_logits, 1)
        level_ids = torch.cat(level_of)
        prob = torch.sigmoid(logits)
        ok = torch.isfinite(logits) & box_coder.is_large_enough(boxes, MIN_PROPOSAL_SIZE) & (prob >= self.score_thresh)
        # NMS within each level: one group per level, each candidate valid in its own level's group only.
        same_level = level_ids[None, None, :] == torch.arange(len(levels), device=logits.device)[None, :, None]
        valid = ok[:, None, :] & same_level
        by_level = prob[:, None, :].expand_as(valid)
        post_n = self.post_nms_top_n[self._mode()]
        _, index, real = nms_top_k(boxes, by_level, valid, self.nms_thresh, post_n, post_n, images=boxes.shape[0])
        n = boxes.shape[1]
        box_index = index - torch.div(index, n, rounding_mode="floor") * n  # (level, box) -> box
        return boxes.gather(1, box_index[..., None].expand(-1, -1, 4)), real

    def loss(self, levels: list[RPNLevel], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Objectness BCE and smooth-L1 box loss over 256 sampled anchors per image (half positive at most)."""
        logits = torch.cat([lv.logits for lv in levels], 1)
        deltas = torch.cat([lv.deltas for lv in levels], 1)
        anchors = torch.cat([lv.anchors for lv in levels], 1)
        inside = torch.cat([lv.inside for lv in levels], 1)
        gt_boxes, _, gt_valid = pad_targets(targets, logits.device, logits.dtype)
        matches = match(pairwise_iou(anchors, gt_boxes), gt_valid, self.fg_iou_thresh, self.bg_iou_thresh, True)
        # Matched anchors are positive, those below the low threshold negative, the rest ignored (-1).
        labels = torch.where(matches >= 0, 1, torch.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        labels = torch.where(inside, labels, -1)
        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        sampled = positive | negative
        num_sampled = sampled.sum().clamp(min=1)
        matched_gt = gt_boxes.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        targets_reg = box_coder.encode(matched_gt[positive], anchors[positive], RPN_BOX_WEIGHTS)
        box_loss = F.smooth_l1_loss(deltas[positive], targets_reg, beta=box_coder.SMOOTH_L1_BETA, reduction="sum")
        box_loss = box_loss / num_sampled
        objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled].to(logits.dtype))
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
