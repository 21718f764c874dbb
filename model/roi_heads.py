"""Stage two of Mask R-CNN (section 3): per-RoI classification, box regression and the mask branch.

``fastrcnn_loss`` / ``maskrcnn_loss`` and ``box_inference`` are standalone functions, documented on their
own; ``RoIHeads.mask_inference`` is the method that runs the mask branch. Inference is batched with
fixed-size outputs: per-class NMS, the top D detections per image, and only the real detections go through
the mask branch.
``RoIHeads`` is what the FPN and the C4 heads share (sampling, losses, inference); ``FPNRoIHeads`` has the
FPN's layers, model/c4.py the C4 head's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from contract import DEFAULT_DETECTIONS_PER_IMAGE, DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD
from model import box_coder
from model.backbone import FPN_CHANNELS, POOLED_STRIDES, replicate_edges
from model.matcher import match, pad_targets, pairwise_iou, sample_balanced
from model.nms import nms_top_k
from model.precision import float32_under_autocast
from model.roi_align import MultiScaleRoIAlign, roi_align

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BOX_POOL_SIZE = 7
MASK_POOL_SIZE = 14
MASK_SIZE = 2 * MASK_POOL_SIZE  # the mask head's deconvolution doubles its 14x14 RoIs (section 3, Figure 4)
SAMPLING_RATIO = 2
REPRESENTATION_SIZE = 1024
BOX_HEAD_CHANNELS = 256  # of the convolutional box head (torchvision's v2)
MASK_HEAD_CHANNELS = 256
MIN_DETECTION_SIZE = 1e-2


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
) -> dict[str, Tensor]:
    """L_cls + L_box (Fast R-CNN): cross-entropy over all sampled RoIs, and smooth-L1 on the
    ground-truth class's box of positive RoIs, normalized by the number of sampled RoIs."""
    loss_classifier = F.cross_entropy(class_logits, labels)
    positive = (labels > 0).nonzero().squeeze(1)
    per_class = box_regression.view(box_regression.shape[0], -1, 4)
    picked = per_class[positive, labels[positive]]
    loss_box = F.smooth_l1_loss(picked, regression_targets[positive], beta=box_coder.SMOOTH_L1_BETA, reduction="sum")
    return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box / max(labels.numel(), 1)}


def maskrcnn_loss(mask_logits: Tensor, labels: Tensor, mask_targets: Tensor) -> Tensor:
    """L_mask (section 3): mean per-pixel binary cross-entropy of a per-pixel sigmoid, on the mask of the
    RoI's ground-truth class only, for positive RoIs only. No competition between classes: the other
    K - 1 masks get no gradient. ``mask_logits`` [N, K, M, M], ``labels`` [N], ``mask_targets`` [N, M, M]."""
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(picked, mask_targets)


def box_inference(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Tensor,
    proposal_valid: Tensor,
    image_sizes: Tensor,
    score_threshold: Tensor,
    nms_thresh: float,
    detections_per_img: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections from the box branch for a batch of B images with P proposals each.

    Class-specific boxes are decoded and clipped; each (image, class) pair is one NMS batch entry,
    so classes never suppress each other; of the survivors the ``detections_per_img`` best per image
    are kept. ``score_threshold`` [B] is exclusive (score > threshold), as in torchvision.
    Returns boxes [B, D, 4], scores [B, D], labels [B, D] and valid [B, D], zero past the valid rows.
    """
    b, p = proposals.shape[:2]
    num_classes = class_logits.shape[-1]
    boxes = box_coder.decode(box_regression.view(b, p, -1), proposals, BOX_WEIGHTS)
    boxes = box_coder.clip_to_size(boxes, image_sizes)[:, :, 1:]  # drop background
    scores = F.softmax(class_logits, -1).view(b, p, num_classes)[:, :, 1:]
    ok = proposal_valid[:, :, None] & (scores > score_threshold[:, None, None])
    ok = ok & box_coder.is_large_enough(boxes, MIN_DETECTION_SIZE)
    # One NMS entry per (image, class): classes never suppress each other.
    per_class_boxes = boxes.transpose(1, 2).reshape(b * (num_classes - 1), p, 4)
    per_class_scores = scores.transpose(1, 2).reshape(b * (num_classes - 1), 1, p)
    per_class_ok = ok.transpose(1, 2).reshape(b * (num_classes - 1), 1, p)
    top, idx, valid = nms_top_k(
        per_class_boxes, per_class_scores, per_class_ok, nms_thresh, detections_per_img, detections_per_img, b
    )
    det_boxes = per_class_boxes.reshape(b, -1, 4).gather(1, idx[..., None].expand(-1, -1, 4))
    det_boxes = det_boxes * valid[..., None]
    labels = torch.where(valid, torch.div(idx, p, rounding_mode="floor") + 1, 0)
    return det_boxes, torch.where(valid, top, 0.0), labels, valid


class RoIHeads(nn.Module):
    """Stage two, shared by the FPN and the C4 heads: RoI sampling and the losses in training; in inference
    the box branch on the proposals, per-class NMS, the top D per image, and the mask branch on those
    detections only. A subclass says how RoIs become the box and mask predictors' inputs (the
    ``*_features`` methods) and owns the layers: ``box_predictor`` (FastRCNNPredictor) and
    ``mask_predictor`` (MaskRCNNPredictor) among them. ``pooled_strides`` are the strides of the feature
    maps RoIs are pooled from."""

    box_predictor: FastRCNNPredictor  # set by the subclass
    mask_predictor: MaskRCNNPredictor

    def __init__(
        self,
        pooled_strides: tuple[int, ...],
        mask_size: int,
        aligned: bool = False,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = DEFAULT_SCORE_THRESHOLD,
        nms_thresh: float = DEFAULT_NMS_THRESHOLD,
        detections_per_img: int = DEFAULT_DETECTIONS_PER_IMAGE,
    ):
        super().__init__()
        self.pooled_strides = pooled_strides
        self.mask_size = mask_size
        self.aligned = aligned
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def _init_predictors(self) -> None:
        """Small output layers (as Detectron2 initializes them): torchvision's fan-out init of the
        mask logits gives logits of std ~25 with few classes, which diverges when training from scratch."""
        nn.init.normal_(self.box_predictor.cls_score.weight, std=0.01)
        nn.init.normal_(self.box_predictor.bbox_pred.weight, std=0.001)
        nn.init.normal_(self.mask_predictor.mask_fcn_logits.weight, std=0.001)
        for layer in (self.box_predictor.cls_score, self.box_predictor.bbox_pred, self.mask_predictor.mask_fcn_logits):
            nn.init.zeros_(layer.bias)

    def box_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """The box predictor's input [N, D] for RoIs ``boxes`` [N, 4] of images ``batch_index`` [N]."""
        raise NotImplementedError

    def mask_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """The mask predictor's input [N, C, S, S] for the RoIs."""
        raise NotImplementedError

    def training_features(
        self, features: list[Tensor], boxes: Tensor, batch_index: Tensor, positive: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Box features of all sampled RoIs and mask features of the ``positive`` ones (indices)."""
        box = self.box_features(features, boxes, batch_index)
        return box, self.mask_features(features, boxes[positive], batch_index[positive])

    def forward(
        self,
        features: list[Tensor],
        proposals: Tensor,
        proposal_valid: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        score_threshold: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses (training) or the fixed-size detections dict (inference)."""
        pooled = [replicate_edges(f, image_sizes, s) for f, s in zip(features, self.pooled_strides, strict=False)]
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.loss(pooled, proposals, proposal_valid, targets)
        return self.inference(pooled, proposals, proposal_valid, image_sizes, score_threshold)

    def mask_inference(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor, labels: Tensor) -> Tensor:
        """Mask probabilities [N, M, M] of each RoI's own class. Only that class's 1x1 output
        convolution is evaluated (a per-RoI dot product), instead of all K and then discarding K - 1."""
        x = self.mask_features(features, boxes, batch_index)
        x = F.relu(self.mask_predictor.conv5_mask(x))
        logits_layer = self.mask_predictor.mask_fcn_logits
        weight = logits_layer.weight[:, :, 0, 0][labels]
        logits = torch.bmm(weight[:, None, :], x.flatten(2)).view(-1, x.shape[2], x.shape[3])
        return torch.sigmoid(logits + logits_layer.bias[labels][:, None, None])

    def inference(
        self,
        features: list[Tensor],
        proposals: Tensor,
        proposal_valid: Tensor,
        image_sizes: Tensor,
        score_threshold: Tensor | None,
    ) -> dict[str, Tensor]:
        b, p = proposals.shape[:2]
        batch_of_row = torch.div(torch.arange(b * p, device=proposals.device), p, rounding_mode="floor")
        x = self.box_features(features, proposals.reshape(-1, 4), batch_of_row)
        class_logits, box_regression = map(float32_under_autocast, self.box_predictor(x))
        threshold = torch.full((b,), self.score_thresh, device=proposals.device, dtype=class_logits.dtype)
        if score_threshold is not None:
            threshold = torch.maximum(threshold, score_threshold.to(threshold.dtype))
        boxes, scores, labels, valid = box_inference(
            class_logits,
            box_regression,
            proposals,
            proposal_valid,
            image_sizes,
            threshold,
            self.nms_thresh,
            self.detections_per_img,
        )
        d = boxes.shape[1]
        rows = valid.flatten().nonzero().squeeze(1)
        probs = self.mask_inference(
            features, boxes.flatten(0, 1)[rows], torch.div(rows, d, rounding_mode="floor"), labels.flatten()[rows]
        )
        masks = probs.new_zeros((b * d, self.mask_size, self.mask_size)).index_copy(0, rows, probs)
        return {
            "boxes": boxes,
            "scores": scores,
            "labels": labels,
            "masks": masks.view(b, d, self.mask_size, self.mask_size),
            "num_detections": valid.sum(1),
        }

    def loss(
        self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Sample 512 RoIs per image (1:3 positives to negatives) from the proposals plus the ground
        truth boxes, and compute L_cls + L_box + L_mask on them."""
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, proposals.device, proposals.dtype)
        proposals = torch.cat([proposals.detach(), gt_boxes], 1)
        proposal_valid = torch.cat([proposal_valid, gt_valid], 1)
        matches = match(pairwise_iou(proposals, gt_boxes), gt_valid, self.fg_iou_thresh, self.bg_iou_thresh, False)
        labels = torch.where(matches >= 0, gt_labels.gather(1, matches.clamp(min=0)), 0)
        labels = torch.where(proposal_valid, labels, -1)
        positive, negative = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
        image, row = (positive | negative).nonzero(as_tuple=True)
        boxes = proposals[image, row]
        matched = matches[image, row].clamp(min=0)
        sampled_labels = labels[image, row]
        pos = (sampled_labels > 0).nonzero().squeeze(1)
        box_features, mask_features = self.training_features(features, boxes, image, pos)
        class_logits, box_regression = map(float32_under_autocast, self.box_predictor(box_features))
        regression_targets = box_coder.encode(gt_boxes[image, matched], boxes, BOX_WEIGHTS)
        losses = fastrcnn_loss(class_logits, box_regression, sampled_labels, regression_targets)

        mask_targets = self.project_masks(targets, gt_valid, image[pos], matched[pos], boxes[pos])
        mask_logits = float32_under_autocast(self.mask_predictor(mask_features))
        losses["loss_mask"] = maskrcnn_loss(mask_logits, sampled_labels[pos], mask_targets)
        return losses

    def project_masks(
        self, targets: list[dict[str, Tensor]], gt_valid: Tensor, image: Tensor, gt_index: Tensor, boxes: Tensor
    ) -> Tensor:
        """Mask targets [N, M, M]: each positive RoI's ground-truth mask RoIAligned onto the RoI."""
        if boxes.shape[0] == 0:
            return boxes.new_zeros((0, self.mask_size, self.mask_size))
        height = max(t["masks"].shape[-2] for t in targets)
        width = max(t["masks"].shape[-1] for t in targets)
        masks = [
            F.pad(t["masks"].to(boxes), (0, width - t["masks"].shape[-1], 0, height - t["masks"].shape[-2]))
            for t in targets
        ]
        all_masks = torch.cat(masks, 0)[:, None]
        offsets = torch.cumsum(gt_valid.sum(1), 0) - gt_valid.sum(1)
        rois = torch.cat([(offsets[image] + gt_index).to(boxes.dtype)[:, None], boxes], 1)
        return roi_align(all_masks, rois, 1.0, self.mask_size, self.mask_size, SAMPLING_RATIO, self.aligned)[:, 0]


class FPNRoIHeads(RoIHeads):
    """The FPN heads (section 3.1, Figure 4 right): RoIs pooled 7x7 (box) and 14x14 (mask) from the level
    of P2-P5 their size maps to; the box head two fully connected layers (or torchvision v2's convolutions
    and one), the mask head four 3x3 convolutions, a deconvolution and the per-class predictor: 28x28 masks."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = FPN_CHANNELS,
        representation_size: int = REPRESENTATION_SIZE,
        mask_channels: int = MASK_HEAD_CHANNELS,
        aligned: bool = False,
        box_head_convs: int = 0,
        norm_layer: type[nn.Module] | None = None,
        **settings,
    ):
        super().__init__(POOLED_STRIDES, MASK_SIZE, aligned, **settings)
        self.box_roi_pool = MultiScaleRoIAlign(BOX_POOL_SIZE, POOLED_STRIDES, SAMPLING_RATIO, aligned)
        if box_head_convs:
            pooled_shape = (in_channels, BOX_POOL_SIZE, BOX_POOL_SIZE)
            convs = [BOX_HEAD_CHANNELS] * box_head_convs
            self.box_head = FastRCNNConvFCHead(pooled_shape, convs, [representation_size], norm_layer=norm_layer)
        else:
            self.box_head = TwoMLPHead(in_channels * BOX_POOL_SIZE**2, representation_size)
        self.box_predictor = FastRCNNPredictor(representation_size, num_classes)
        self.mask_roi_pool = MultiScaleRoIAlign(MASK_POOL_SIZE, POOLED_STRIDES, SAMPLING_RATIO, aligned)
        self.mask_head = MaskRCNNHeads(in_channels, [mask_channels] * 4, 1, norm_layer=norm_layer)
        self.mask_predictor = MaskRCNNPredictor(mask_channels, mask_channels, num_classes)
        self._init_predictors()

    def box_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        return self.box_head(self.box_roi_pool(features, boxes, batch_index))

    def mask_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        return self.mask_head(self.mask_roi_pool(features, boxes, batch_index))
