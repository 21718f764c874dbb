"""model/box_coder.py: R-CNN box regression encode/decode, clipping and the small-box filter."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from model import box_coder

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 0.5, 7.0)]


def _boxes(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 200 - 20
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 120 + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_inverts_encode(weights):
    gt, reference = _boxes(50, 0, torch.float64), _boxes(50, 1, torch.float64)
    deltas = box_coder.encode(gt, reference, weights)
    decoded = box_coder.decode(deltas, reference, weights)
    assert decoded.shape == (50, 1, 4)
    torch.testing.assert_close(decoded[:, 0], gt, rtol=0, atol=1e-9)


def test_hand_computed_box_pair():
    # reference [0, 0, 10, 20]: w 10, h 20, centre (5, 10); gt [1, 2, 21, 12]: w 20, h 10, centre (11, 7).
    # weights (10, 10, 5, 5): dx = 10 * 6 / 10 = 6, dy = 10 * -3 / 20 = -1.5,
    # dw = 5 * ln(20 / 10) = 3.4657359, dh = 5 * ln(10 / 20) = -3.4657359.
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[1.0, 2.0, 21.0, 12.0]])
    expected = torch.tensor([[6.0, -1.5, 3.4657359, -3.4657359]])
    torch.testing.assert_close(box_coder.encode(gt, reference, (10.0, 10.0, 5.0, 5.0)), expected)
    torch.testing.assert_close(box_coder.decode(expected, reference, (10.0, 10.0, 5.0, 5.0))[:, 0], gt)


def test_log_scale_change_is_clipped():
    # dw = dh = 10 > ln(1000 / 16) = 4.1352: the reference [0, 0, 10, 20] grows by 62.5 at most, to
    # 625 x 1250 around its centre (5, 10): [5 - 312.5, 10 - 625, 5 + 312.5, 10 + 625]. A shrink is not clipped.
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    grown = box_coder.decode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), reference, (1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(grown[:, 0], torch.tensor([[-307.5, -615.0, 317.5, 635.0]]))
    assert math.isclose(box_coder.BBOX_XFORM_CLIP, 4.1351666, rel_tol=1e-7)
    deltas = torch.tensor([[0.0, 0.0, -10.0, 0.0]], dtype=torch.float64)
    shrunk = box_coder.decode(deltas, reference.double(), (1.0, 1.0, 1.0, 1.0))
    assert (shrunk[0, 0, 2] - shrunk[0, 0, 0]).item() == pytest.approx(10 * math.exp(-10))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_matches_torchvision(weights):
    gt, reference = _boxes(40, 2), _boxes(40, 3)
    (expected,) = BoxCoder(weights).encode([gt], [reference])
    torch.testing.assert_close(box_coder.encode(gt, reference, weights), expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_matches_torchvision(weights):
    reference = _boxes(40, 4)
    deltas = torch.randn(40, 3 * 4, generator=torch.Generator().manual_seed(5)) * 3  # some past the clip
    expected = BoxCoder(weights).decode(deltas, [reference])
    torch.testing.assert_close(box_coder.decode(deltas, reference, weights), expected)


def test_decode_batched_like_per_image():
    reference = _boxes(30, 6).view(2, 15, 4)
    deltas = torch.randn(2, 15, 8, generator=torch.Generator().manual_seed(7))
    batched = box_coder.decode(deltas, reference, (10.0, 10.0, 5.0, 5.0))
    assert batched.shape == (2, 15, 2, 4)
    for i in range(2):
        torch.testing.assert_close(batched[i], box_coder.decode(deltas[i], reference[i], (10.0, 10.0, 5.0, 5.0)))


def test_clip_to_size_uses_each_images_size():
    boxes = torch.tensor([[[-5.0, -3.0, 50.0, 40.0], [10.0, 12.0, 20.0, 22.0]]]).expand(2, 2, 4)
    sizes = torch.tensor([[30, 45], [100, 200]])  # (height, width)
    clipped = box_coder.clip_to_size(boxes, sizes)
    assert clipped[0].tolist() == [[0.0, 0.0, 45.0, 30.0], [10.0, 12.0, 20.0, 22.0]]
    assert clipped[1].tolist() == [[0.0, 0.0, 50.0, 40.0], [10.0, 12.0, 20.0, 22.0]]


def test_clip_to_size_with_class_dimension():
    boxes = torch.tensor([[-1.0, 5.0, 70.0, 90.0]]).expand(2, 3, 2, 4)
    clipped = box_coder.clip_to_size(boxes, torch.tensor([[60, 64], [80, 50]]))
    assert (clipped[0] == torch.tensor([0.0, 5.0, 64.0, 60.0])).all()
    assert (clipped[1] == torch.tensor([0.0, 5.0, 50.0, 80.0])).all()


def test_is_large_enough_needs_both_sides():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.99, 5.0], [0.0, 0.0, 5.0, 1.99], [3.0, 3.0, 3.0, 3.0]])
    assert box_coder.is_large_enough(boxes, 2.0).tolist() == [True, False, False, False]
    assert box_coder.is_large_enough(boxes, 0.0).tolist() == [True, True, True, True]
