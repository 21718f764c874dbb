"""RoIAlign (Mask R-CNN, section 3): the project's own custom op, and the multi-level FPN pooler.

RoIAlign keeps RoI coordinates and bin edges unquantized, samples each bin at ``sampling_ratio``
x ``sampling_ratio`` regularly spaced points with bilinear interpolation, and averages them; with
``sampling_ratio <= 0`` the number of points adapts to each RoI's size (torchvision's and ONNX's
``sampling_ratio=0``, Detectron2's default pooler).

The op ``maskrcnn::roi_align`` is registered with ``torch.library`` so that

* eager PyTorch runs a vectorized kernel (one ``grid_sample`` per image, no loop over RoIs; adaptive
  sampling loops over the distinct sample counts, one such call each),
* autograd uses a registered backward (``maskrcnn::roi_align_backward``),
* ``torch.export`` traces it through its fake implementation, and the ONNX exporter maps it to the
  standard ONNX ``RoiAlign`` (see ``export/onnx_ops.py``).

Boundary semantics follow torchvision's CPU/CUDA kernels (and ONNX Runtime's): a sample further
than one pixel outside the feature map contributes zero, one within a pixel of the border is clamped
to the border. ``grid_sample`` with ``padding_mode="border"`` and ``align_corners=True`` clamps the
same way, so the only extra step is zeroing the far-outside samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# RoIs are pooled in bands of this many feature-map rows, left to right within a band (see spatial_order).
ORDER_BAND_ROWS = 32
# Adaptive sampling pools a group's RoIs in chunks of at most this many samples (RoIs x channels x
# samples per RoI): one RoI over a whole P2 map takes ceil(roi / bin) samples per bin side, tens of millions.
MAX_CHUNK_SAMPLES = 2**25
# grid_sample's integer codes, as aten.grid_sampler_2d_backward takes them.
_BILINEAR = 0
_BORDER = 1


def _sample_coords(start: Tensor, size: Tensor, pooled: int, samples: int, limit: int) -> tuple[Tensor, Tensor]:
    """Sample positions along one axis, [K, pooled * samples], and whether each lies in range.

    Written in the same arithmetic order as torchvision's kernel, so that float32 results agree.
    """
    bin_size = size / pooled
    index = torch.arange(pooled * samples, device=start.device, dtype=start.dtype)
    bin_index = torch.div(index, samples, rounding_mode="floor")
    sub_index = index - bin_index * samples
    coords = (
        start[:, None]
        + bin_index[None, :] * bin_size[:, None]
        + (sub_index[None, :] + 0.5) * bin_size[:, None] / samples
    )
    inside = (coords >= -1.0) & (coords <= limit)
    return coords, inside


def _roi_extents(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each RoI's start (x1, y1) and size (width, height) in feature-map pixels, as torchvision's kernel has them."""
    offset = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # torchvision's legacy behaviour: RoIs are at least one feature pixel
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    return x1, y1, roi_w, roi_h


def _sampling_grid(
    rois: Tensor, height: int, width: int, spatial_scale: float, pooled: tuple[int, int], samples: tuple[int, int],
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """The normalized grid_sample grid [K, PH*sh, PW*sw, 2] and the in-range mask [K, PH*sh, PW*sw]."""
    x1, y1, roi_w, roi_h = _roi_extents(rois, spatial_scale, aligned)
    xs, x_in = _sample_coords(x1, roi_w, pooled[1], samples[1], width)
    ys, y_in = _sample_coords(y1, roi_h, pooled[0], samples[0], height)
    # align_corners=True maps -1 / +1 to the centres of the first / last pixel.
    # Normalized in float64: grid_sample un-normalizes in the feature dtype, and the round trip
    # should not add more than one rounding to the sample positions.
    gx = (xs.double() * (2.0 / max(width - 1, 1)) - 1.0).to(xs.dtype)
    gy = (ys.double() * (2.0 / max(height - 1, 1)) - 1.0).to(ys.dtype)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    inside = y_in[:, :, None] & x_in[:, None, :]
    return grid, inside


def adaptive_groups(
    rois: Tensor, channels: int, spatial_scale: float, pooled: tuple[int, int], aligned: bool
) -> list[tuple[tuple[int, int], Tensor]]:
    """Adaptive sampling (``sampling_ratio <= 0``): ceil(roi_h / PH) x ceil(roi_w / PW) samples per bin, per
    RoI, as torchvision's kernel and ONNX ``RoiAlign`` with ``sampling_ratio=0`` take them.

    Returns the RoIs grouped by their sample counts, ((samples_h, samples_w), indices), each group cut into
    chunks of at most MAX_CHUNK_SAMPLES samples. RoIs with no samples (an empty aligned RoI) are in no
    group: their output is zero, as in torchvision.
    """
    _, _, roi_w, roi_h = _roi_extents(rois, spatial_scale, aligned)
    samples_h = torch.ceil(roi_h / pooled[0]).to(torch.int64)
    samples_w = torch.ceil(roi_w / pooled[1]).to(torch.int64)
    sampled = ((samples_h > 0) & (samples_w > 0)).nonzero().squeeze(1)
    if sampled.numel() == 0:
        return []
    keys = samples_h[sampled] * (int(samples_w.max()) + 1) + samples_w[sampled]
    groups: list[tuple[tuple[int, int], Tensor]] = []
    for key in torch.unique(keys).tolist():
        index = sampled[keys == key]
        sh, sw = int(samples_h[index[0]]), int(samples_w[index[0]])
        per_chunk = max(1, MAX_CHUNK_SAMPLES // (channels * pooled[0] * sh * pooled[1] * sw))
        groups.extend(((sh, sw), chunk) for chunk in index.split(per_chunk))
    return groups


def _check_args(features: Tensor, rois: Tensor) -> None:
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"expected features [N, C, H, W] and rois [K, 5], got {tuple(features.shape)} and {tuple(rois.shape)}"
        )


def _by_image(rois: Tensor, n: int) -> tuple[Tensor, list[tuple[int, slice]], Tensor | None]:
    """``rois`` sorted by image, each image's slice of them, and the order that restores theirs (None when
    they came sorted, as MultiScaleRoIAlign's do): a slice costs no gather, where per-image indices would
    copy every RoI's samples twice more."""
    batch_index = rois[:, 0].long()
    order = None
    if not bool((batch_index[1:] >= batch_index[:-1]).all()):
        order = torch.argsort(batch_index, stable=True)
        rois, batch_index = rois[order], batch_index[order]
    counts = torch.bincount(batch_index, minlength=n).tolist()
    if sum(counts[:n]) != rois.shape[0] or (rois.shape[0] and int(batch_index[0]) < 0):
        raise ValueError(f"RoI batch indices must lie in [0, {n}), the feature batch")
    slices, start = [], 0
    for b, count in enumerate(counts[:n]):
        if count:
            slices.append((b, slice(start, start + count)))
        start += count
    return rois, slices, None if order is None else torch.argsort(order)


def _pool(
    features: Tensor, rois: Tensor, spatial_scale: float, pooled: tuple[int, int], samples: tuple[int, int],
    aligned: bool,
) -> Tensor:
    """RoIAlign with ``samples`` (sh, sw) points per bin for every RoI: [K, C, PH, PW].

    The samples stay in grid_sample's channel-first layout [C, K, PH*sh, PW*sw]; the average pool reads
    it as is (K as its channels), so only the pooled results, sh*sw times smaller, are joined and transposed.
    """
    n, c, h, w = features.shape
    sh, sw = samples
    if rois.shape[0] == 0:
        return features.new_zeros(0, c, *pooled)
    rois, slices, restore = _by_image(rois, n)
    grid, inside = _sampling_grid(rois, h, w, spatial_scale, pooled, samples, aligned)
    check_inside = not bool(inside.all())  # RoIs inside the map (proposals are clipped to the image) skip it
    parts = []
    for b, rows in slices:  # one grid_sample per image; the RoIs of an image are sampled together
        image_grid = grid[rows].reshape(1, -1, pooled[1] * sw, 2)
        sampled = F.grid_sample(
            features[b : b + 1], image_grid, mode="bilinear", padding_mode="border", align_corners=True
        ).view(c, -1, pooled[0] * sh, pooled[1] * sw)
        if check_inside:
            sampled = sampled * inside[rows].to(sampled.dtype)
        parts.append(F.avg_pool2d(sampled, kernel_size=samples, stride=samples))
    out = torch.cat(parts, dim=1).transpose(0, 1).contiguous()
    return out if restore is None else out[restore]


@torch.library.custom_op("maskrcnn::roi_align", mutates_args=())
def roi_align(
    features: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """RoIAlign of ``rois`` [K, 5] (batch index, x1, y1, x2, y2) on ``features`` [N, C, H, W] -> [K, C, PH, PW].

    ``sampling_ratio`` > 0 samples each bin at that many points per side; <= 0 samples adaptively (see
    ``adaptive_groups``).
    """
    _check_args(features, rois)
    rois = rois.to(features.dtype)
    pooled = (pooled_height, pooled_width)
    if sampling_ratio > 0:
        return _pool(features, rois, spatial_scale, pooled, (sampling_ratio, sampling_ratio), aligned)
    out = features.new_zeros(rois.shape[0], features.shape[1], pooled_height, pooled_width)
    for samples, index in adaptive_groups(rois, features.shape[1], spatial_scale, pooled, aligned):
        out[index] = _pool(features, rois[index], spatial_scale, pooled, samples, aligned)
    return out


@roi_align.register_fake
def _roi_align_fake(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], pooled_height, pooled_width))


def _pool_backward(
    grad: Tensor, rois: Tensor, spatial_scale: float, pooled: tuple[int, int], samples: tuple[int, int],
    aligned: bool, grad_features: Tensor, written: set[int],
) -> None:
    """Add the gradient of ``_pool`` with respect to the features into ``grad_features`` [N, C, H, W]: copied
    into an image's slice the first time (``written`` records which), added after, so the common case of
    one pass per image never fills the whole map with zeros first."""
    n, c, h, w = grad_features.shape
    sh, sw = samples
    rois, slices, restore = _by_image(rois, n)
    if restore is not None:
        grad = grad[torch.argsort(restore)]
    grid, inside = _sampling_grid(rois, h, w, spatial_scale, pooled, samples, aligned)
    # Undo the average pool (each sample gets 1 / (sh * sw) of its bin's gradient) and the out-of-range
    # zeroing, straight into grid_sample's layout [C, K, PH, sh, PW, sw]: one pass over the samples.
    weight = grad.new_tensor(1.0 / (sh * sw)).expand(rois.shape[0], pooled[0], sh, pooled[1], sw)
    if not bool(inside.all()):
        weight = inside.view(-1, pooled[0], sh, pooled[1], sw).to(grad.dtype) * weight
    shape_only = grad.new_empty(1, c, h, w)
    for b, rows in slices:
        # Written into a channel-first tensor: the product of a transposed view would keep its strides.
        image_grad = grad.new_empty(c, rows.stop - rows.start, pooled[0], sh, pooled[1], sw)
        torch.mul(grad[rows].transpose(0, 1)[:, :, :, None, :, None], weight[rows], out=image_grad)
        image_grid = grid[rows].reshape(1, -1, pooled[1] * sw, 2)
        grad_input, _ = torch.ops.aten.grid_sampler_2d_backward(
            image_grad.view(1, c, -1, pooled[1] * sw), shape_only, image_grid, _BILINEAR, _BORDER, True, [True, False]
        )
        if b in written:
            grad_features[b] += grad_input[0]
        else:
            grad_features[b].copy_(grad_input[0])
            written.add(b)


@torch.library.custom_op("maskrcnn::roi_align_backward", mutates_args=())
def roi_align_backward(
    grad: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    batch_size: int,
    height: int,
    width: int,
) -> Tensor:
    """Gradient of ``roi_align`` with respect to the features: the bilinear weights scattered back."""
    rois = rois.to(grad.dtype)
    pooled = (pooled_height, pooled_width)
    grad_features = grad.new_empty(batch_size, grad.shape[1], height, width)
    written: set[int] = set()
    if sampling_ratio > 0:
        _pool_backward(grad, rois, spatial_scale, pooled, (sampling_ratio,) * 2, aligned, grad_features, written)
    else:
        for samples, index in adaptive_groups(rois, grad.shape[1], spatial_scale, pooled, aligned):
            _pool_backward(grad[index], rois[index], spatial_scale, pooled, samples, aligned, grad_features, written)
    for b in set(range(batch_size)) - written:  # images without RoIs get no gradient
        grad_features[b].zero_()
    return grad_features


@roi_align_backward.register_fake
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, batch_size, height, width
):
    return grad.new_empty((batch_size, grad.shape[1], height, width))


def _setup_context(ctx, inputs, output) -> None:
    features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    ctx.feature_shape = (features.shape[0], features.shape[2], features.shape[3])


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    n, h, w = ctx.feature_shape
    grad_features = roi_align_backward(grad.contiguous(), rois, *ctx.args, n, h, w)
    return grad_features, None, None, None, None, None, None


roi_align.register_autograd(_backward, setup_context=_setup_context)


def _roi_align_fp32(features: Tensor, rois: Tensor, *args) -> Tensor:
    """``roi_align`` in float32 under autocast, as torchvision runs its own: in float16 the RoIs' coordinates
    (and so the sampling points) would lose precision. Outside autocast, the features' dtype."""
    if not torch.is_autocast_enabled(features.device.type):
        return roi_align(features, rois, *args)
    with torch.autocast(features.device.type, enabled=False):
        return roi_align(features.float(), rois.float(), *args)


def fpn_level_of_rois(boxes: Tensor, min_level: int = 2, max_level: int = 5) -> Tensor:
    """FPN level per RoI (FPN paper eq. 1): k = floor(4 + log2(sqrt(wh) / 224)), clamped to [min, max].

    The 1e-6 matches torchvision's LevelMapper, so boundary cases land on the same level.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    level = torch.floor(4 + torch.log2(torch.sqrt(area) / 224) + 1e-6)
    return level.clamp(min_level, max_level).to(torch.int64) - min_level


def spatial_order(boxes: Tensor, batch_index: Tensor, stride: float) -> Tensor:
    """An order of RoIs that visits each image in horizontal bands, left to right within a band.

    The result of RoIAlign does not depend on the order of its RoIs, but its speed does: each RoI reads
    a window of every channel plane, and neighbouring RoIs read overlapping windows that are still in
    the cache. On P2 of an 800x1333 image with 942 proposals, ONNX Runtime's RoiAlign takes about half
    the time in this order than in the proposals' score order.
    """
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    band = torch.floor(centers[:, 1] / (stride * ORDER_BAND_ROWS)).to(torch.int64)
    column = torch.floor(centers[:, 0]).to(torch.int64)
    # Keys stay exact in int64: 2**20 columns and 2**20 bands per image cover any image size.
    return torch.argsort((batch_index.to(torch.int64) * 2**20 + band) * 2**20 + column)


class MultiScaleRoIAlign(torch.nn.Module):
    """RoIAlign over FPN levels P2-P5 (``strides`` 4..32): each RoI is pooled from the level its size maps to.
    With one stride (C4's 16) every RoI is pooled from that one map."""

    def __init__(self, output_size: int, strides: tuple[int, ...], sampling_ratio: int = 2, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.strides = strides
        self.levels = (int(math.log2(strides[0])), int(math.log2(strides[-1])))  # P2..P5 for strides 4..32
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: list[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        """Pool ``boxes`` [K, 4] (image pixels) of images ``batch_index`` [K] from P2..P5 -> [K, C, S, S]."""
        rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1)
        levels = fpn_level_of_rois(boxes, *self.levels)
        size, ratio = self.output_size, self.sampling_ratio
        pooled, order = [], []
        for level, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            idx = (levels == level).nonzero().squeeze(1)
            idx = idx[spatial_order(boxes[idx], batch_index[idx], stride)]
            pooled.append(_roi_align_fp32(feature, rois[idx], 1 / stride, size, size, ratio, self.aligned))
            order.append(idx)
        # One gather back into the RoIs' order (scattering each level into a zero tensor copies it 4 times).
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]
