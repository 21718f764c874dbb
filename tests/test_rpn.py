"""model/rpn.py: the RPN head's outputs do not depend on padding, with one 3x3 convolution (v1) or two (v2)."""

import pytest
import torch

from model.backbone import FPN_STRIDES
from model.rpn import RegionProposalNetwork


@pytest.mark.parametrize("conv_depth", [1, 2])
def test_head_outputs_alone_equal_those_in_a_padded_batch(conv_depth):
    """Features zero outside the image (as the backbone gives them); the first convolution's bias makes its
    output nonzero in the padding, which a second convolution would read near the image's edge."""
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(8, conv_depth=conv_depth).eval()
    with torch.no_grad():
        for conv in rpn.head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0, 0.3)
                conv.bias.uniform_(0.5, 1.0)
    size = (72, 100)  # not a multiple of any level's stride
    alone, batch = [], []
    for stride in FPN_STRIDES:
        h, w = -(-size[0] // stride), -(-size[1] // stride)
        feature = torch.randn(8, h, w)
        alone.append(feature[None])
        padded = torch.zeros(2, 8, 160 // stride + 1, 192 // stride + 1)
        padded[1, :, :h, :w] = feature
        batch.append(padded)
    with torch.no_grad():
        logits_alone, deltas_alone = rpn.head_outputs(alone, torch.tensor([size]))
        logits_batch, deltas_batch = rpn.head_outputs(batch, torch.tensor([[160, 192], list(size)]))
        plain, _ = rpn.head(batch)  # torchvision's forward, without the masks
    h, w = alone[0].shape[-2:]
    assert torch.allclose(plain[0][1, :, :h, :w], logits_alone[0][0], atol=1e-5) == (conv_depth == 1)
    for a, b, c, d in zip(logits_alone, logits_batch, deltas_alone, deltas_batch, strict=True):
        h, w = a.shape[-2:]
        torch.testing.assert_close(b[1, :, :h, :w], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d[1, :, :h, :w], c[0], rtol=1e-5, atol=1e-5)
