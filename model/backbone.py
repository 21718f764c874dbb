"""ResNet-FPN backbone (Mask R-CNN, section 3.1 "Network Architecture"), padding-invariant.

The layers are torchvision's (``torchvision.models.resnet*`` and ``FeaturePyramidNetwork``), so
torchvision checkpoints load as they are. The forward pass is ours for one reason: images of a batch
are zero-padded to a common size, and a convolution near an image's border would read the padding's
activations (bias, batch-norm shift) instead of the zeros it reads when the image is alone. Zeroing
everything outside each image's valid extent before every convolution wider than 1x1 (and before
max-pooling) makes each image's features exactly those it has alone. Batch norms are per-pixel maps,
so their shifts land in the padding too (torchvision's v2 FPN has one after every convolution); the
masks come after them, before the next convolution reads the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

FPN_CHANNELS = 256
# Strides of the pyramid's levels P2..P6 relative to the input (FPN paper, section 3: C2..C5 halve the
# resolution stage by stage, P6 subsamples P5). RoIs are pooled from P2..P5, anchors placed on all five.
STAGE_STRIDES = (4, 8, 16, 32)  # C2..C5: the stem and its max-pool quarter the input, each stage halves it
FPN_STRIDES = (*STAGE_STRIDES, 64)
POOLED_STRIDES = FPN_STRIDES[:4]


def valid_extent(image_sizes: Tensor, stride: int) -> Tensor:
    """Each image's valid feature-map size at ``stride`` [B, 2]: ceil(size / stride), as stride-2 convs give."""
    return torch.div(image_sizes + (stride - 1), stride, rounding_mode="floor")


def valid_mask(image_sizes: Tensor, stride: int, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """1 inside each image's valid region of a [B, C, height, width] map at ``stride``, else 0: [B, 1, H, W]."""
    extent = valid_extent(image_sizes, stride)
    rows = torch.arange(height, device=image_sizes.device)[None, :] < extent[:, 0:1]
    cols = torch.arange(width, device=image_sizes.device)[None, :] < extent[:, 1:2]
    return (rows[:, None, :, None] & cols[:, None, None, :]).to(dtype)


def replicate_edges(feature: Tensor, image_sizes: Tensor, stride: int) -> Tensor:
    """Copy each image's last valid row and column onto its first padding row and column.

    RoIAlign's bilinear samples lie inside the box, at most at the image's edge (extent - 1, extent], where
    they read row ``extent`` with a weight; alone, the map ends there and the sample is clamped to row
    ``extent - 1``. Replicating that one row (and column) makes the padded batch read what the image
    alone reads. Two scatters of one row and one column, not a select over the whole map: at P2 of an
    800x1333 image the map is 17M values, and every full pass over it costs tens of milliseconds.

    Each scatter still writes a new map (and its gradient two more), so in eager PyTorch an axis no image
    is padded along is left alone; a traced graph (``tracing``) keeps both scatters.
    """
    b, c, h, w = feature.shape
    extent = valid_extent(image_sizes, stride)
    traced = tracing()
    # With no padding the target is the last row itself: it is overwritten with its own values.
    if traced or bool((extent[:, 0] < h).any()):
        last_row = (extent[:, 0] - 1).view(b, 1, 1, 1).expand(b, c, 1, w)
        first_pad_row = extent[:, 0].clamp(max=h - 1).view(b, 1, 1, 1).expand(b, c, 1, w)
        feature = feature.scatter(2, first_pad_row, feature.gather(2, last_row))
    if traced or bool((extent[:, 1] < w).any()):
        last_col = (extent[:, 1] - 1).view(b, 1, 1, 1).expand(b, c, h, 1)
        first_pad_col = extent[:, 1].clamp(max=w - 1).view(b, 1, 1, 1).expand(b, c, h, 1)
        feature = feature.scatter(3, first_pad_col, feature.gather(3, last_col))
    return feature


def tracing() -> bool:
    """Whether the model is being traced or compiled (export): branches on data are eager-only."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _per_channel(mask: Tensor, channels: int) -> Tensor:
    """[B, 1, H, W] -> [B, channels, H, W] through a 1x1 convolution of ones, not ``expand``.

    The result is the same; the reason is ONNX Runtime's CPU layout. It runs convolutions in a blocked
    NCHWc layout and fuses an elementwise add or multiply with another convolution's output into the
    convolution itself only when both operands are in that layout. A broadcast [B, 1, H, W] operand
    forces the feature map out of the layout and back in (two reorders per masked convolution, ~6% of
    an R-50-FPN at 800x1333); a convolution's output is already in it.
    """
    return F.conv2d(mask, mask.new_ones(channels, 1, 1, 1))


class PaddingMasks:
    """Each image's valid region per stride, for zeroing activations outside it; cached per forward pass.

    ``relu(x, stride)`` is ``ReLU(x)`` zeroed outside: ReLU(x + bias) with bias 0 inside and the most
    negative float outside, which ONNX Runtime fuses into the convolution that produced ``x``.
    ``zero(x, stride)`` multiplies by 0/1, for activations without a ReLU (the FPN's). The int8 graph
    cannot quantize that bias: export/quantize/rewrites.py (``masks_as_multiplies``) recognizes this exported form
    and rewrites it as multiplies, so a change here needs one there.

    In eager PyTorch (training, evaluation) the same values come cheaper: a map no image is padded in is
    left alone, and the masks broadcast from [B, 1, H, W] instead of being widened to every channel, which
    only ONNX Runtime's layout needs (``_per_channel``). Deciding per map reads the image sizes on the host
    once, a branch on data that a traced graph cannot hold, so tracing and export keep the one form.
    """

    def __init__(self, image_sizes: Tensor):
        self.image_sizes = image_sizes
        self.cache: dict[tuple[str, int, int], Tensor | None] = {}
        self.eager = not tracing()
        self.host_sizes = image_sizes.tolist() if self.eager else []

    def _padded(self, stride: int, height: int, width: int) -> bool:
        """Whether any image of the batch ends before a [height, width] map at ``stride`` does (eager only)."""
        return any(-(-h // stride) < height or -(-w // stride) < width for h, w in self.host_sizes)

    def _mask(self, kind: str, x: Tensor, stride: int) -> Tensor | None:
        key = (kind, stride, x.shape[1])
        if key not in self.cache:
            height, width = x.shape[-2:]
            if self.eager and not self._padded(stride, height, width):
                self.cache[key] = None
                return None
            inside = valid_mask(self.image_sizes, stride, height, width, torch.bool)
            if kind == "bias":
                mask = x.new_full(inside.shape, torch.finfo(x.dtype).min).masked_fill(inside, 0.0)
            else:
                mask = inside.to(x.dtype)
            self.cache[key] = mask if self.eager else _per_channel(mask, x.shape[1])
        return self.cache[key]

    def relu(self, x: Tensor, stride: int) -> Tensor:
        bias = self._mask("bias", x, stride)
        return F.relu(x) if bias is None else (x + bias).relu_()

    def zero(self, x: Tensor, stride: int) -> Tensor:
        gate = self._mask("gate", x, stride)
        return x if gate is None else x * gate


def _bottleneck(block: Bottleneck, x: Tensor, masks: PaddingMasks, stride: int) -> Tensor:
    """torchvision's Bottleneck; only the 3x3 convolution reads neighbours, so only its input is masked."""
    identity = x if block.downsample is None else block.downsample(x)
    out = masks.relu(block.bn1(block.conv1(x)), stride)
    out = block.relu(block.bn2(block.conv2(out)))
    out = block.bn3(block.conv3(out))
    out += identity  # in place, as torchvision's block: one map fewer to allocate per block
    return block.relu(out)


def _basic_block(block: BasicBlock, x: Tensor, masks: PaddingMasks, stride: int) -> Tensor:
    """torchvision's BasicBlock; both 3x3 convolutions get masked inputs. ``x`` is a ReLU's or max-pool's
    output, >= 0, so ``masks.relu`` leaves it unchanged inside."""
    x = masks.relu(x, stride)
    identity = x if block.downsample is None else block.downsample(x)
    out = masks.relu(block.bn1(block.conv1(x)), stride * block.stride)
    out = block.bn2(block.conv2(out))
    return block.relu(out + identity)


# torchvision's ResNet builders -> their layout: block, blocks per stage, groups and width per group of the
# 3x3 convolutions (ResNeXt's cardinality and bottleneck width, Xie et al., arXiv 1611.05431). At the stem
# width 64 the builder itself makes the body (its names, shapes and init); other widths follow the layout.
RESNET_LAYOUTS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, ...], int, int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
}


def resnet_body(name: str, norm_layer: type[nn.Module], width: int = 64) -> ResNet:
    """The ResNet body of torchvision's builder ``name`` (a key of RESNET_LAYOUTS) without its classifier:
    torchvision's own at stem width 64, so its ImageNet state dicts load into it (minus ``fc``); at another
    width the same layout from torchvision's blocks with ``width`` channels in the stem (for small models)."""
    if name not in RESNET_LAYOUTS:
        raise ValueError(f"unknown ResNet body {name!r}; expected one of {', '.join(sorted(RESNET_LAYOUTS))}")
    if width == 64:
        body = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        del body.fc, body.avgpool
        return body
    return _slim_resnet(*RESNET_LAYOUTS[name], width, norm_layer)


def _slim_resnet(
    block: type[BasicBlock | Bottleneck],
    layers: tuple[int, ...],
    groups: int,
    width_per_group: int,
    width: int,
    norm_layer: type[nn.Module],
) -> nn.Module:
    """A ResNet layout with ``width`` channels in the stem (64 in the original), built from torchvision's
    blocks as its ``ResNet._make_layer`` builds them: a quarter of ResNet-18's parameters at width 32."""
    if width * width_per_group // 64 < 1:
        raise ValueError(f"width {width} leaves no channel in the groups of a {width_per_group}-wide 3x3 convolution")
    body = nn.Module()
    body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = norm_layer(width)
    body.relu = nn.ReLU(inplace=True)
    body.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    inplanes = width
    for i, count in enumerate(layers):
        planes, stride = width * 2**i, 1 if i == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion)
            )
        blocks = [block(inplanes, planes, stride, downsample, groups, width_per_group, norm_layer=norm_layer)]
        inplanes = planes * block.expansion
        for _ in range(1, count):
            blocks.append(block(inplanes, planes, groups=groups, base_width=width_per_group, norm_layer=norm_layer))
        setattr(body, f"layer{i + 1}", nn.Sequential(*blocks))
    return body


def stage_channels(body: nn.Module, stages: int = 4) -> list[int]:
    """Output channels of the body's first ``stages`` stages (C2, C3, ...)."""
    last = [getattr(body, f"layer{i + 1}")[-1] for i in range(stages)]
    return [(block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels for block in last]


def resnet_stages(body: ResNet, x: Tensor, masks: PaddingMasks, stages: int = 4) -> list[Tensor]:
    """The stem and the first ``stages`` stages of a torchvision ResNet body on a padded batch, padding-
    invariant: the features C2, C3, ... (strides STAGE_STRIDES)."""
    x = masks.relu(body.bn1(body.conv1(x)), 2)  # the stem convolution has stride 2
    x = body.maxpool(x)
    stride = STAGE_STRIDES[0]  # after the stride-2 max-pool: C2's
    outputs = []
    for i in range(stages):
        for block in getattr(body, f"layer{i + 1}"):
            x = (_bottleneck if isinstance(block, Bottleneck) else _basic_block)(block, x, masks, stride)
            stride *= block.stride
        outputs.append(x)
    return outputs


class ResNetFPN(nn.Module):
    """ResNet body (C2-C5) + FPN (P2-P5) + P6 by subsampling P5, as in torchvision's resnet_fpn_backbone.

    ``body`` names torchvision's ResNet or ResNeXt builder (see resnet_body); ``norm_layer`` is the body's
    batch norm, and the FPN's when ``fpn_norm`` (torchvision's v2).
    """

    def __init__(
        self,
        body: str = "resnet50",
        norm_layer: type[nn.Module] = FrozenBatchNorm2d,
        width: int = 64,
        fpn_channels: int = FPN_CHANNELS,
        fpn_norm: bool = False,
    ):
        super().__init__()
        self.body = resnet_body(body, norm_layer, width)
        self.fpn = FeaturePyramidNetwork(
            stage_channels(self.body), fpn_channels, norm_layer=norm_layer if fpn_norm else None
        )
        self.out_channels = fpn_channels

    def forward(self, x: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """Features [P2, P3, P4, P5, P6] of a padded batch, zero outside each image's valid region."""
        masks = PaddingMasks(image_sizes)
        return self._pyramid(resnet_stages(self.body, x, masks), masks)

    def _pyramid(self, stages: list[Tensor], masks: PaddingMasks) -> list[Tensor]:
        """FPN top-down pathway with lateral connections (FPN paper, section 3)."""
        fpn = self.fpn
        top = POOLED_STRIDES[-1]
        inner = fpn.inner_blocks[-1](stages[-1])
        outputs = [masks.zero(fpn.layer_blocks[-1](masks.zero(inner, top)), top)]
        for idx in range(len(stages) - 2, -1, -1):
            lateral = fpn.inner_blocks[idx](stages[idx])
            inner = lateral + _upsample_to(inner, lateral)
            stride = POOLED_STRIDES[idx]
            outputs.insert(0, masks.zero(fpn.layer_blocks[idx](masks.zero(inner, stride)), stride))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


def _upsample_to(x: Tensor, like: Tensor) -> Tensor:
    """Nearest upsampling of ``x`` to ``like``'s size, as torchvision's FPN does. When that is exactly 2x
    (always for inputs padded to multiples of 32) it is written as a fixed scale factor: ONNX Runtime
    keeps a fixed-scale Resize in its NCHWc layout and fuses the lateral sum into the 1x1 convolution."""
    if like.shape[-2] == 2 * x.shape[-2] and like.shape[-1] == 2 * x.shape[-1]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")
