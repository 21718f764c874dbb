"""The custom RoIAlign op against torchvision.ops.roi_align and against torchvision's formula written out
as a plain loop, with fixed and adaptive sampling, in float16/32/64; its autograd; its registration."""

import functools
import math

import pytest
import torch
import torchvision

from model.backbone import POOLED_STRIDES
from model.roi_align import MultiScaleRoIAlign, bilinear_map, fpn_level_of_rois, roi_align, sample_counts


def _rois() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = 60
    batch = torch.randint(0, 3, (k, 1), generator=g).float()
    xy = torch.rand(k, 2, generator=g) * 48 - 8  # some start outside the map
    wh = torch.rand(k, 2, generator=g) * 30
    rois = torch.cat([batch, xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([3.2, 4.1, 3.4, 4.3])  # sub-pixel
    rois[1, 1:] = torch.tensor([-100.0, -50.0, 300.0, 200.0])  # much larger than the map
    rois[2, 1:] = torch.tensor([60.0, 40.0, 90.0, 70.0])  # partly outside (map is 32 x 24 at scale 0.5)
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("pooled,sampling_ratio", [(7, 2), (14, 2), (5, 3)])
def test_forward_matches_torchvision(aligned, pooled, sampling_ratio):
    torch.manual_seed(1)
    features = torch.randn(3, 8, 24, 32)
    rois = _rois()
    ours = roi_align(features, rois, 0.5, pooled, pooled, sampling_ratio, aligned)
    ref = torchvision.ops.roi_align(features, rois, (pooled, pooled), 0.5, sampling_ratio, aligned)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("aligned", [True, False])
def test_zero_rois(aligned):
    features = torch.randn(2, 4, 10, 10)
    out = roi_align(features, torch.zeros(0, 5), 1.0, 7, 7, 2, aligned)
    assert out.shape == (0, 4, 7, 7)


@pytest.mark.parametrize("aligned", [True, False])
def test_gradients_match_torchvision(aligned):
    torch.manual_seed(2)
    base = torch.randn(3, 8, 24, 32)
    rois = _rois()
    ours_in = base.clone().requires_grad_()
    ref_in = base.clone().requires_grad_()
    upstream = torch.randn(rois.shape[0], 8, 7, 7)
    (roi_align(ours_in, rois, 0.5, 7, 7, 2, aligned) * upstream).sum().backward()
    (torchvision.ops.roi_align(ref_in, rois, (7, 7), 0.5, 2, aligned) * upstream).sum().backward()
    assert (ours_in.grad - ref_in.grad).abs().max().item() <= 1e-5


def test_an_image_without_rois_gets_no_gradient():
    features = torch.randn(3, 4, 10, 10, requires_grad=True)
    rois = torch.tensor([[2.0, 1, 1, 6, 6], [0.0, 2, 2, 8, 9]])
    roi_align(features, rois, 1.0, 7, 7, 2, False).sum().backward()
    assert (features.grad[1] == 0).all() and features.grad[0].abs().sum() > 0 and features.grad[2].abs().sum() > 0


def test_batch_index_outside_the_features_is_an_error():
    rois = torch.tensor([[0.0, 1, 1, 6, 6], [2.0, 2, 2, 8, 9]])
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
        roi_align(torch.randn(2, 4, 10, 10), rois, 1.0, 7, 7, 2, False)


@pytest.mark.slow
@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck_float64(aligned):
    torch.manual_seed(3)
    features = torch.randn(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.3, 2.2, 7.9, 6.1], [1, -2.0, 0.5, 4.0, 12.0], [1, 3.3, 3.3, 3.6, 3.9]], dtype=torch.float64
    )
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 0.9, 3, 4, 2, aligned), (features,))


def test_op_registration_is_consistent():
    """Fake (meta) kernel, autograd registration and schema agree: what torch.export relies on."""
    features = torch.randn(2, 4, 12, 12)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 9.0], [1, 0.5, 2.0, 11.0, 7.0]])
    torch.library.opcheck(roi_align, (features, rois, 0.5, 7, 7, 2, True))
    torch.library.opcheck(roi_align, (features, rois, 1.0, 14, 14, 2, False))
    torch.library.opcheck(roi_align, (features, rois, 1.0, 3, 4, 0, True))
    torch.library.opcheck(roi_align, (features.double(), rois.double(), 0.5, 3, 4, 0, False))


def _bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's bilinear_interpolate at (y, x) of ``feature`` [C, H, W] -> [C]: zero beyond one pixel
    outside the map, clamped to the border within it."""
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feature.new_zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def reference_roi_align(features, rois, scale, pooled, sampling_ratio, aligned) -> torch.Tensor:
    """torchvision's RoIAlign, one RoI, bin and sample at a time, in float64."""
    features = features.double()
    out = torch.zeros(rois.shape[0], features.shape[1], *pooled, dtype=torch.float64)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        x1, y1 = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = x2 * scale - offset - x1, y2 * scale - offset - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / pooled[0], roi_w / pooled[1]
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled[0])
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled[1])
        for i in range(pooled[0]):
            for j in range(pooled[1]):
                total = torch.zeros(features.shape[1], dtype=torch.float64)
                for iy in range(grid_h):
                    y = y1 + i * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        total += _bilinear(features[int(b)], y, x1 + j * bin_w + (ix + 0.5) * bin_w / grid_w)
                out[k, :, i, j] = total / max(grid_h * grid_w, 1)
    return out


SCALE, POOLED = 0.5, (3, 4)
TOLERANCE = {torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}


def _smooth_features() -> torch.Tensor:
    """[2, 3, 20, 26]: a smooth field plus a little noise, so that float16's rounding of sample positions
    (about 1e-2 px here) moves the interpolated values by less than the float16 tolerance."""
    y = torch.arange(20.0)[:, None]
    x = torch.arange(26.0)[None, :]
    channels = torch.arange(3.0)[:, None, None]
    field = torch.stack([torch.sin(0.3 * y + 0.2 * x + channels), torch.cos(0.25 * y - 0.15 * x + channels)])
    return field + 0.05 * torch.randn(2, 3, 20, 26, generator=torch.Generator().manual_seed(0))


def _adaptive_rois() -> torch.Tensor:
    """RoIs in input pixels (scale 0.5) on multiples of 1/8, exact in float16: 1 to 7 samples per bin side,
    some crossing the border, one empty and one inverted (no samples when aligned)."""
    g = torch.Generator().manual_seed(3)
    xy = torch.randint(-16, 40, (10, 2), generator=g) / 8 * 8 + torch.randint(0, 8, (10, 2), generator=g) / 8
    wh = torch.randint(2, 56, (10, 2), generator=g).float()
    rois = torch.cat([torch.randint(0, 2, (10, 1), generator=g).float(), xy, xy + wh], 1)
    extra = torch.tensor([[1, 10.0, 6.0, 10.0, 20.0], [0, 12.0, 8.0, 9.0, 30.0], [1, 30.0, 20.0, 52.0, 40.0]])
    return torch.cat([rois, extra])


@functools.cache
def _reference(sampling_ratio: int, aligned: bool) -> torch.Tensor:
    return reference_roi_align(_smooth_features(), _adaptive_rois(), SCALE, POOLED, sampling_ratio, aligned)


def test_adaptive_rois_cover_several_sample_counts():
    samples_h, samples_w = sample_counts(_adaptive_rois(), SCALE, POOLED, 0, aligned=True)
    counts = set(zip(samples_h.tolist(), samples_w.tolist(), strict=True))
    assert len(counts) >= 7 and max(max(c) for c in counts) >= 5
    assert ((samples_h == 0) | (samples_w == 0)).sum() == 2  # the empty and the inverted RoI


def test_bilinear_map_rows_are_each_bins_average():
    """Each bin's weights sum to the share of its samples inside the map (1 for a RoI inside it), over at most
    4 pixels per sample; a RoI far outside the map has all-zero rows."""
    rois = torch.tensor([[0, 4.0, 6.0, 30.0, 20.0], [0, -90.0, -90.0, -60.0, -70.0]])
    columns, weights = bilinear_map(rois, 24, 32, 0.5, (7, 7), (2, 2), aligned=False)
    assert columns.shape == weights.shape == (2 * 49, 16)
    assert torch.allclose(weights[:49].sum(1), torch.ones(49)) and not weights[49:].any()
    assert columns.min() >= 0 and columns.max() < 24 * 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 2])
def test_matches_torchvisions_formula(dtype, aligned, sampling_ratio):
    features, rois = _smooth_features().to(dtype), _adaptive_rois().to(dtype)
    ours = roi_align(features, rois, SCALE, *POOLED, sampling_ratio, aligned)
    assert ours.dtype == dtype
    reference = _reference(max(sampling_ratio, 0), aligned)
    assert (ours.double() - reference).abs().max().item() <= TOLERANCE[dtype]
    ref = torchvision.ops.roi_align(features, rois, POOLED, SCALE, max(sampling_ratio, 0), aligned)
    assert (ours.double() - ref.double()).abs().max().item() <= TOLERANCE[dtype]
    if aligned and sampling_ratio <= 0:
        assert not ours[-3:-1].any()  # no samples: zero, as in torchvision


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_non_contiguous_inputs(sampling_ratio):
    features = _smooth_features().transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    rois = torch.cat([_adaptive_rois(), torch.zeros(13, 3)], 1)[:, :5]
    assert not features.is_contiguous() and not rois.is_contiguous()
    ours = roi_align(features, rois, SCALE, *POOLED, sampling_ratio, True)
    assert torch.equal(ours, roi_align(features.contiguous(), rois.contiguous(), SCALE, *POOLED, sampling_ratio, True))
    assert (ours.double() - _reference(sampling_ratio, True)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_gradients_match_torchvision(aligned):
    base, rois = _smooth_features(), _adaptive_rois()
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    upstream = torch.randn(rois.shape[0], 3, *POOLED, generator=torch.Generator().manual_seed(4))
    (roi_align(ours_in, rois, SCALE, *POOLED, 0, aligned) * upstream).sum().backward()
    (torchvision.ops.roi_align(ref_in, rois, POOLED, SCALE, 0, aligned) * upstream).sum().backward()
    assert ref_in.grad.abs().max() > 0.1
    assert (ours_in.grad - ref_in.grad).abs().max().item() <= 1e-5


@pytest.mark.parametrize("aligned", [True, False])
def test_adaptive_gradcheck_float64(aligned):
    features = torch.randn(2, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 2.2, 17.9, 6.1], [1, -2.0, 0.5, 4.0, 16.0]], dtype=torch.float64)
    # fast_mode: one random projection of the Jacobian instead of a column per input element.
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 0.9, 3, 2, 0, aligned), (features,), fast_mode=True)


def test_fpn_level_assignment():
    """k = floor(4 + log2(sqrt(wh) / 224)), clamped to P2-P5 (returned as 0..3)."""
    sides = torch.tensor([8.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert fpn_level_of_rois(boxes).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_multiscale_pooler_matches_torchvision():
    torch.manual_seed(4)
    sizes = [(64, 96), (32, 48), (16, 24), (8, 12)]
    features = [torch.randn(2, 4, h, w) for h, w in sizes]
    boxes = torch.tensor([[0, 0, 20, 20], [5, 5, 200, 150], [10, 30, 380, 250], [1, 1, 60, 90]], dtype=torch.float32)
    batch = torch.tensor([0, 1, 1, 0])
    ours = MultiScaleRoIAlign(7, POOLED_STRIDES, 2, aligned=False)(features, boxes, batch)
    ref_pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    ref = torch.zeros_like(ours)
    for b in range(2):
        sel = batch == b
        feats = {str(i): f[b : b + 1] for i, f in enumerate(features)}
        ref[sel] = ref_pooler(feats, [boxes[sel]], [(256, 384)])
    assert (ours - ref).abs().max().item() <= 1e-5


def test_multiscale_pooler_output_follows_input_order():
    """RoIs are pooled in a cache-friendly spatial order internally; each output row is still its own RoI's."""
    torch.manual_seed(5)
    features = [torch.randn(2, 3, 64 // 2**i, 96 // 2**i) for i in range(4)]
    xy = torch.rand(40, 2) * torch.tensor([300.0, 200.0])
    boxes = torch.cat([xy, xy + 8 + torch.rand(40, 2) * 150], 1)
    batch = torch.randint(0, 2, (40,))
    pooler = MultiScaleRoIAlign(7, POOLED_STRIDES, 2, aligned=True)
    pooled = pooler(features, boxes, batch)
    perm = torch.randperm(40)
    assert torch.equal(pooler(features, boxes[perm], batch[perm]), pooled[perm])
    one = pooler(features, boxes[3:4], batch[3:4])
    assert torch.equal(one, pooled[3:4])
