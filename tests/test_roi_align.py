"""The custom RoIAlign op against torchvision.ops.roi_align, its autograd, and its registration."""

import pytest
import torch
import torchvision

from model.backbone import POOLED_STRIDES
from model.roi_align import MultiScaleRoIAlign, fpn_level_of_rois, roi_align


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


def test_invalid_sampling_ratio_is_refused():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(torch.randn(1, 1, 4, 4), torch.zeros(1, 5), 1.0, 2, 2, 0, True)


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
