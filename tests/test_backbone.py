"""model/backbone.py: the padding masks (valid extent, masks, edge replication) and padding-invariant features
(FPN, ResNeXt, and model/c4.py's body up to C4)."""

import pytest
import torch
import torch.nn.functional as F

from model.backbone import PaddingMasks, ResNetFPN, replicate_edges, valid_extent, valid_mask
from model.c4 import resnet_c4


def test_valid_extent_is_ceil_of_size_over_stride():
    sizes = torch.tensor([[100, 64], [33, 1], [32, 31]])
    assert valid_extent(sizes, 1).tolist() == sizes.tolist()
    assert valid_extent(sizes, 4).tolist() == [[25, 16], [9, 1], [8, 8]]
    assert valid_extent(sizes, 32).tolist() == [[4, 2], [2, 1], [1, 1]]


def test_valid_mask_small_cases():
    mask = valid_mask(torch.tensor([[5, 3], [8, 6]]), 2, 4, 3, torch.float32)
    assert mask.shape == (2, 1, 4, 3)
    # 5 x 3 at stride 2 -> 3 x 2 valid cells; 8 x 6 -> 4 x 3, the whole map.
    assert mask[0, 0].tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert (mask[1] == 1).all()


def _feature() -> torch.Tensor:
    return torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))


def test_replicate_edges_copies_the_last_valid_row_and_column():
    feature = _feature()
    out = replicate_edges(feature, torch.tensor([[16, 12], [24, 28]]), 4)  # extents 4 x 3 and 6 x 7 (no padding)
    h, w = 4, 3
    first, last = out[0], feature[0]
    assert torch.equal(first[:, :h, :w], last[:, :h, :w])
    assert torch.equal(first[:, h, :w], last[:, h - 1, :w])
    assert torch.equal(first[:, :h, w], last[:, :h, w - 1])
    assert torch.equal(first[:, h, w], last[:, h - 1, w - 1])
    untouched = torch.ones(6, 7, dtype=torch.bool)
    untouched[h] = untouched[:, w] = False
    assert torch.equal(first[:, untouched], last[:, untouched])
    assert torch.equal(out[1], feature[1])


def test_replicate_edges_without_padding_changes_nothing():
    """Eager mode returns the map itself (no copy); a trace keeps the scatters, which write the same values."""
    feature = _feature()
    sizes = torch.tensor([[6, 7], [6, 7]])
    assert replicate_edges(feature, sizes, 1) is feature
    traced = torch.jit.trace(lambda f, s: replicate_edges(f, s, 1), (feature, sizes), check_trace=False)
    assert torch.equal(traced(feature, sizes), feature)
    assert "scatter" in str(traced.graph)


def test_replicate_edges_along_one_padded_axis_only():
    """Rows padded (extent 4 of 6), columns not: the row is replicated, the columns are left as they are."""
    feature = _feature()
    out = replicate_edges(feature, torch.tensor([[16, 28], [24, 28]]), 4)
    assert torch.equal(out[0, :, 4], feature[0, :, 3]) and torch.equal(out[0, :, :4], feature[0, :, :4])
    assert torch.equal(out[1], feature[1])


def test_masks_leave_a_map_without_padding_alone():
    """In eager mode a map that no image is padded in is not masked at all (the same values, no pass)."""
    x = _feature()
    masks = PaddingMasks(torch.tensor([[12, 14], [11, 13]]))  # at stride 2: 6 x 7 both
    assert masks.zero(x, 2) is x
    assert torch.equal(masks.relu(x, 2), F.relu(x))


def test_masks_relu_and_zero():
    x = _feature()
    sizes = torch.tensor([[8, 6], [12, 14]])  # at stride 2: 4 x 3 and 6 x 7
    inside = valid_mask(sizes, 2, 6, 7, torch.bool)
    masks = PaddingMasks(sizes)
    assert torch.equal(masks.relu(x, 2), torch.where(inside, F.relu(x), 0.0))
    assert torch.equal(masks.zero(x, 2), torch.where(inside, x, 0.0))
    assert (masks.relu(x, 2)[0, :, 4:] == 0).all() and (masks.relu(x, 2)[0, :, :, 3:] == 0).all()


# Backbones whose padding handling differs: R-18's basic blocks, with and without batch norms in the FPN
# (torchvision's v2), ResNeXt's grouped bottlenecks (slim X-101), and the body up to C4 alone (slim R-50-C4).
BN = torch.nn.BatchNorm2d
BACKBONES = {
    "fpn": lambda: ResNetFPN("resnet18", BN, width=32, fpn_channels=32),
    "fpn-with-batch-norm": lambda: ResNetFPN("resnet18", BN, width=32, fpn_channels=32, fpn_norm=True),
    "x101-fpn": lambda: ResNetFPN("resnext101_32x8d", BN, width=8, fpn_channels=32),
    "r50-c4": lambda: resnet_c4("resnet50", BN, width=16)[0],
}


def _backbone(kind: str) -> torch.nn.Module:
    """A slim backbone whose batch norms shift and scale (random statistics), so padding would leak into
    borders; where the FPN has them too (torchvision's v2), their shifts land in the padding."""
    torch.manual_seed(0)
    backbone = BACKBONES[kind]().eval()
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    return backbone


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("size", [(96, 128), (70, 90)], ids=["unpadded-alone", "padded-alone"])
def test_features_alone_equal_features_in_a_padded_batch(size, kind):
    backbone = _backbone(kind)
    if kind == "fpn-with-batch-norm":
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.fpn.modules())
    h, w = size
    alone_h, alone_w = h + (-h % 32), w + (-w % 32)
    image = torch.randn(3, h, w, generator=torch.Generator().manual_seed(1))
    alone = torch.zeros(1, 3, alone_h, alone_w)
    alone[0, :, :h, :w] = image
    batch = torch.zeros(2, 3, 160, 192)
    batch[0] = torch.randn(3, 160, 192, generator=torch.Generator().manual_seed(2))
    batch[1, :, :h, :w] = image
    with torch.no_grad():
        single = backbone(alone, torch.tensor([[h, w]]))
        batched = backbone(batch, torch.tensor([[160, 192], [h, w]]))
    for level, (a, b) in enumerate(zip(single, batched, strict=True)):
        ah, aw = a.shape[-2:]
        assert (a.abs().amax() > 0.1) and (b[1, :, ah:].abs().amax() == 0) and (b[1, :, :, aw:].abs().amax() == 0)
        torch.testing.assert_close(b[1, :, :ah, :aw], a[0], rtol=1e-4, atol=1e-4, msg=f"level {level}")
