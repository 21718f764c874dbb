"""RoIAlign (Mask R-CNN, section 3): the project's own custom op, and the multi-level FPN pooler.

RoIAlign keeps RoI coordinates and bin edges unquantized, samples each bin at ``sampling_ratio``
x ``sampling_ratio`` regularly spaced points with bilinear interpolation, and averages them; with
``sampling_ratio <= 0`` the number of points adapts to each RoI's size (torchvision's and ONNX's
``sampling_ratio=0``, Detectron2's default pooler).

The op ``maskrcnn::roi_align`` is registered with ``torch.library`` so that

* eager PyTorch runs it as one sparse matrix product per image: RoIAlign is linear in the features, and
  each output bin reads at most 4 pixels per sample, so ``bilinear_map`` writes the op as a sparse matrix
  [bins, H * W] (no loop over RoIs, channels or samples; no per-channel sample tensor),
* autograd uses a registered backward (``maskrcnn::roi_align_backward``): the same matrix, transposed, so
  the gradient is one more sparse product instead of a scatter of every sample of every channel,
* ``torch.export`` traces it through its fake implementation, and the ONNX exporter maps it to the
  standard ONNX ``RoiAlign`` (see ``export/onnx_ops.py``).

Boundary semantics follow torchvision's CPU/CUDA kernels (and ONNX Runtime's): a sample further
than one pixel outside the feature map contributes zero, one within a pixel of the border is clamped
to the border (``_axis_weights``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

# RoIs are pooled in bands of this many feature-map rows, left to right within a band (see spatial_order).
ORDER_BAND_ROWS = 32


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


def _axis_weights(start: Tensor, size: Tensor, pooled: int, samples: int, limit: int) -> tuple[Tensor, Tensor]:
    """Along one axis, the two pixels each sample lies between and their bilinear weights, [K, pooled,
    2 * samples] each, by torchvision's rules: a sample more than one pixel outside the map weighs zero, one
    within a pixel of the border is clamped onto it."""
    coords, inside = _sample_coords(start, size, pooled, samples, limit)
    coords = coords.clamp(min=0)
    low = coords.floor()
    at_end = low >= limit - 1
    low = low.clamp(max=limit - 1)
    frac = torch.where(at_end, 0.0, coords - low)
    index = torch.stack([low, torch.where(at_end, low, low + 1)], dim=-1).to(torch.int64)
    weight = torch.stack([1 - frac, frac], dim=-1) * inside[..., None]
    shape = (start.shape[0], pooled, 2 * samples)
    return index.view(shape), weight.view(shape)


def bilinear_map(
    rois: Tensor, height: int, width: int, spatial_scale: float, pooled: tuple[int, int], samples: tuple[int, int],
    aligned: bool,
) -> tuple[Tensor, Tensor]:
    """RoIAlign of ``rois`` with ``samples`` (sh, sw) points per bin as a sparse linear map from feature pixels
    (``y * width + x``) to bins (RoI by RoI, row by row): each bin's pixels and their weights (the bilinear
    weight over the number of samples averaged), [K * PH * PW, 4 * sh * sw] each.

    The weights are outer products of the two axes' weights. A pixel read by several samples appears several
    times; the sparse product adds them up."""
    x1, y1, roi_w, roi_h = _roi_extents(rois, spatial_scale, aligned)
    ys, wy = _axis_weights(y1, roi_h, pooled[0], samples[0], height)
    xs, wx = _axis_weights(x1, roi_w, pooled[1], samples[1], width)
    columns = ys[:, :, None, :, None] * width + xs[:, None, :, None, :]
    weights = wy[:, :, None, :, None] * (wx[:, None, :, None, :] / max(samples[0] * samples[1], 1))
    shape = (rois.shape[0] * pooled[0] * pooled[1], 4 * samples[0] * samples[1])
    return columns.reshape(shape), weights.reshape(shape)


def sample_counts(
    rois: Tensor, spatial_scale: float, pooled: tuple[int, int], sampling_ratio: int, aligned: bool
) -> tuple[Tensor, Tensor]:
    """Samples per bin side for each RoI, (samples_h [K], samples_w [K]): ``sampling_ratio`` when it is > 0;
    otherwise adaptive, ceil(roi_h / PH) x ceil(roi_w / PW), as torchvision's kernel and ONNX ``RoiAlign``
    with ``sampling_ratio=0`` take them. An empty aligned RoI gets no samples: its output is zero, as in
    torchvision."""
    if sampling_ratio > 0:
        fixed = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.int64, device=rois.device)
        return fixed, fixed
    _, _, roi_w, roi_h = _roi_extents(rois, spatial_scale, aligned)
    samples_h = torch.ceil(roi_h / pooled[0]).clamp(min=0).to(torch.int64)
    samples_w = torch.ceil(roi_w / pooled[1]).clamp(min=0).to(torch.int64)
    return samples_h, samples_w


def _check_args(features: Tensor, rois: Tensor) -> None:
    if features.dim() != 4 or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"expected features [N, C, H, W] and rois [K, 5], got {tuple(features.shape)} and {tuple(rois.shape)}"
        )


def _image_maps(
    rois: Tensor, n: int, height: int, width: int, spatial_scale: float, pooled: tuple[int, int],
    sampling_ratio: int, aligned: bool,
) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """For each image with RoIs: its index, its RoIs (indices into ``rois``), the pixels they read (indices
    into H * W) and the sparse CSR matrix [their bins, those pixels] that pools them (``bilinear_map``).

    The RoIs are grouped by image and then by sample counts (stably: within a group they keep their order,
    which MultiScaleRoIAlign makes spatial); each group is mapped in one call.
    """
    if rois.shape[0] == 0:
        return []
    batch_index = rois[:, 0].long()
    if int(batch_index.min()) < 0 or int(batch_index.max()) >= n:
        raise ValueError(f"RoI batch indices must lie in [0, {n}), the feature batch")
    samples_h, samples_w = sample_counts(rois, spatial_scale, pooled, sampling_ratio, aligned)
    key = (batch_index * (int(samples_h.max()) + 1) + samples_h) * (int(samples_w.max()) + 1) + samples_w
    order = torch.argsort(key, stable=True)
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    groups: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {}
    for index in order.split(counts.tolist()):
        first = int(index[0])
        samples = (int(samples_h[first]), int(samples_w[first]))
        columns, weights = bilinear_map(rois[index], height, width, spatial_scale, pooled, samples, aligned)
        groups.setdefault(int(batch_index[first]), []).append((index, columns, weights))
    maps = []
    for b, parts in groups.items():
        pixels, columns = _compact(torch.cat([c.flatten() for _, c, _ in parts]), height * width)
        row_sizes = torch.cat([torch.full((c.shape[0],), c.shape[1], dtype=torch.int64) for _, c, _ in parts])
        crow = torch.cat([row_sizes.new_zeros(1), row_sizes.cumsum(0)]).to(rois.device)
        with warnings.catch_warnings():  # PyTorch calls all of sparse CSR beta; its matrix products are not
            warnings.simplefilter("ignore")
            matrix = torch.sparse_csr_tensor(
                crow, columns, torch.cat([w.flatten() for _, _, w in parts]),
                size=(int(row_sizes.numel()), pixels.numel()), check_invariants=False,
            )
        maps.append((b, torch.cat([index for index, _, _ in parts]), pixels, matrix))
    return maps


def _compact(columns: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The pixels a map reads (ascending) and its columns renumbered to index them: the products then touch
    those pixels only, not the whole map (a few RoIs on P2 read a small part of it)."""
    read = torch.zeros(size, dtype=torch.bool, device=columns.device)
    read[columns] = True
    return read.nonzero().squeeze(1), (read.cumsum(0) - 1)[columns]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sparse products run in float32 or float64 (MKL has no half-precision kernel); float16 and
    bfloat16 are computed in float32 and rounded once at the end."""
    return dtype if dtype == torch.float64 else torch.float32


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
    ``sample_counts``). Per image, one sparse product: its bins = ``bilinear_map`` @ its pixels.
    """
    _check_args(features, rois)
    n, c, h, w = features.shape
    dtype = _compute_dtype(features.dtype)
    values, rois = features.to(dtype), rois.to(dtype)
    out = values.new_empty(rois.shape[0], c, pooled_height, pooled_width)
    maps = _image_maps(rois, n, h, w, spatial_scale, (pooled_height, pooled_width), sampling_ratio, aligned)
    with torch.autocast(features.device.type, enabled=False):  # an op's body still sees the caller's autocast
        for b, index, pixels, matrix in maps:
            pooled = torch.sparse.mm(matrix, values[b].reshape(c, h * w).t().index_select(0, pixels))  # [bins, C]
            out[index] = pooled.view(-1, pooled_height, pooled_width, c).permute(0, 3, 1, 2)
    return out.to(features.dtype)


@roi_align.register_fake
def _roi_align_fake(features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return features.new_empty((rois.shape[0], features.shape[1], pooled_height, pooled_width))


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
    """Gradient of ``roi_align`` with respect to the features: per image, the transposed map times the bins'
    gradient, each pixel summing what its samples' weights sent to the bins (torchvision's kernel's order)."""
    c = grad.shape[1]
    dtype = _compute_dtype(grad.dtype)
    values, rois = grad.to(dtype), rois.to(dtype)
    grad_features = values.new_zeros(batch_size, c, height * width)
    maps = _image_maps(rois, batch_size, height, width, spatial_scale, (pooled_height, pooled_width),
                       sampling_ratio, aligned)
    with torch.autocast(grad.device.type, enabled=False):
        for b, index, pixels, matrix in maps:
            read = torch.sparse.mm(matrix.t(), values[index].permute(0, 2, 3, 1).reshape(-1, c))  # [pixels, C]
            grad_features[b].index_copy_(1, pixels, read.t())
    return grad_features.view(batch_size, c, height, width).to(grad.dtype)


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
