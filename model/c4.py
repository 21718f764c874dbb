"""The ResNet C4 head (Mask R-CNN, section 3.1 and Figure 4 left): Faster R-CNN's ResNet head, as in
Detectron2's ``Res5ROIHeads``.

The backbone is the ResNet body up to C4 (stride 16). The RPN runs on C4 alone, with the paper's 5 scales
x 3 aspect ratios at that one level (15 anchors per location). RoIs are RoIAligned 14x14 from C4 and the
5th stage (res5: torchvision's ``layer4``, whose first block has stride 2) runs per RoI; its 7x7 output,
average-pooled (2048-d), is the box head, and the mask branch is a 2x2 stride-2 deconvolution of that
same output (2048 -> 256) followed by the per-class 1x1 predictor, giving 14x14 masks (the paper's C4
mask size). In training res5 runs once on the sampled RoIs and the mask branch reads the positives'
output; in inference it runs again on the final detections' boxes, as the FPN mask branch does.

Padding invariance as in the FPN backbone: the body zeroes activations outside each image before every
convolution wider than 1x1, and C4 is zero there before the RPN reads it. res5 runs on pooled RoIs,
which carry no padding.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.resnet import Bottleneck

from model.anchor_utils import ANCHOR_SIZES, AnchorLevels
from model.backbone import STAGE_STRIDES, PaddingMasks, resnet_body, resnet_stages, stage_channels
from model.roi_align import MultiScaleRoIAlign
from model.roi_heads import MASK_HEAD_CHANNELS, SAMPLING_RATIO, RoIHeads

C4_STRIDE = STAGE_STRIDES[2]
C4_ANCHORS: AnchorLevels = ((C4_STRIDE, ANCHOR_SIZES),)
C4_POOL_SIZE = 14
C4_MASK_SIZE = C4_POOL_SIZE  # res5 halves the pooled 14x14 RoIs, the deconvolution doubles them back


class ResNetC4(nn.Module):
    """The ResNet body's stem and stages 1-4 (C2..C4), padding-invariant; its output is [C4]."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.out_channels = stage_channels(body, 3)[-1]

    def forward(self, x: Tensor, image_sizes: Tensor) -> list[Tensor]:
        masks = PaddingMasks(image_sizes)
        c4 = resnet_stages(self.body, x, masks, stages=3)[-1]
        return [masks.zero(c4, C4_STRIDE)]


def resnet_c4(body: str, norm_layer: type[nn.Module], width: int = 64) -> tuple[ResNetC4, nn.Sequential]:
    """torchvision's ResNet body ``body`` split at C4: the backbone, and res5 (its ``layer4``) for the heads."""
    resnet = resnet_body(body, norm_layer, width)
    res5 = resnet.layer4
    del resnet.layer4
    return ResNetC4(resnet), res5


class Res5RoIHeads(RoIHeads):
    """RoIAlign 14x14 on C4, res5 per RoI, average pooling -> box predictor; res5's 7x7 -> mask predictor
    (MaskRCNNPredictor: the 2x2 stride-2 deconvolution, ReLU and the per-class 1x1 convolution)."""

    def __init__(
        self,
        res5: nn.Sequential,
        num_classes: int,
        mask_channels: int = MASK_HEAD_CHANNELS,
        aligned: bool = False,
        **settings,
    ):
        super().__init__((C4_STRIDE,), C4_MASK_SIZE, aligned, **settings)
        self.roi_pool = MultiScaleRoIAlign(C4_POOL_SIZE, (C4_STRIDE,), SAMPLING_RATIO, aligned)
        self.res5 = res5
        last: Bottleneck = res5[-1]
        channels = last.conv3.out_channels
        self.box_predictor = FastRCNNPredictor(channels, num_classes)
        self.mask_predictor = MaskRCNNPredictor(channels, mask_channels, num_classes)
        self._init_predictors()

    def res5_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """res5 on the RoIs pooled 14x14 from C4: [N, 2048, 7, 7] (at the paper's widths)."""
        return self.res5(self.roi_pool(features, boxes, batch_index))

    def box_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        return self.res5_features(features, boxes, batch_index).mean((2, 3))

    def mask_features(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        return self.res5_features(features, boxes, batch_index)

    def training_features(
        self, features: list[Tensor], boxes: Tensor, batch_index: Tensor, positive: Tensor
    ) -> tuple[Tensor, Tensor]:
        """res5 once for all sampled RoIs; the mask branch reads the positives' output (Figure 4, left)."""
        x = self.res5_features(features, boxes, batch_index)
        return x.mean((2, 3)), x[positive]
