"""model/matcher.py: IoU, the Faster R-CNN matching rule, the balanced sampler and target padding."""

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from model.matcher import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    match,
    pad_targets,
    pairwise_iou,
    sample_balanced,
)


def _boxes(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g) * 100
    return torch.cat([xy, xy + 1 + torch.rand(*shape, 2, generator=g) * 60], -1)


def test_pairwise_iou_matches_torchvision():
    boxes, gt = _boxes(2, 30, seed=0), _boxes(2, 5, seed=1)
    iou = pairwise_iou(boxes, gt)
    assert iou.shape == (2, 30, 5)
    for i in range(2):
        torch.testing.assert_close(iou[i], torchvision.ops.box_iou(boxes[i], gt[i]))


def test_pairwise_iou_shares_2d_boxes_across_images():
    anchors, gt = _boxes(30, seed=2), _boxes(3, 4, seed=3)
    iou = pairwise_iou(anchors, gt)
    for i in range(3):
        torch.testing.assert_close(iou[i], torchvision.ops.box_iou(anchors, gt[i]))


# Rows are proposals, columns ground truth; column 2 is padding (invalid) and holds the largest values.
IOU = torch.tensor(
    [
        [0.90, 0.10, 0.95],  # above high (0.7) -> gt 0
        [0.50, 0.20, 0.99],  # between low (0.3) and high
        [0.10, 0.20, 0.80],  # below low: the padding's 0.8 does not count
        [0.00, 0.25, 0.00],  # below low, but gt 1's best overlap (a tie with the next row)
        [0.10, 0.25, 0.00],  # likewise
        [0.65, 0.10, 0.00],  # between; gt 0's best is row 0, so no low-quality match here
    ]
)[None]
GT_VALID = torch.tensor([[True, True, False]])


def test_match_thresholds_and_padding():
    result = match(IOU, GT_VALID, high=0.7, low=0.3, allow_low_quality_matches=False)
    b, n = BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD
    assert result.tolist() == [[0, b, n, n, n, b]]


def test_low_quality_matches_keep_every_tied_best_row():
    result = match(IOU, GT_VALID, high=0.7, low=0.3, allow_low_quality_matches=True)
    assert result.tolist() == [[0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, 1, 1, BETWEEN_THRESHOLDS]]


def test_low_quality_row_takes_its_own_best_ground_truth():
    """As in torchvision: the row a ground truth overlaps best is matched to that row's best ground truth."""
    iou = torch.tensor([[[0.28, 0.25], [0.10, 0.20]]])
    result = match(iou, torch.tensor([[True, True]]), high=0.7, low=0.3, allow_low_quality_matches=True)
    assert result.tolist() == [[0, BELOW_LOW_THRESHOLD]]


def test_ground_truth_overlapping_nothing_claims_no_row():
    iou = torch.tensor([[[0.0, 0.2], [0.0, 0.9]]])
    result = match(iou, torch.tensor([[True, True]]), high=0.7, low=0.3, allow_low_quality_matches=True)
    assert result.tolist() == [[BELOW_LOW_THRESHOLD, 1]]


def test_image_without_ground_truth_is_all_background():
    iou = torch.rand(1, 4, 1)
    result = match(iou, torch.tensor([[False]]), high=0.7, low=0.3, allow_low_quality_matches=True)
    assert result.tolist() == [[BELOW_LOW_THRESHOLD] * 4]


@pytest.mark.parametrize("allow_low_quality", [False, True])
@pytest.mark.parametrize("high,low", [(0.7, 0.3), (0.5, 0.5)])
def test_match_equals_torchvision_matcher(allow_low_quality, high, low):
    g = torch.Generator().manual_seed(0)
    # 20 levels in (0, 1], (0, 0.6], (0, 0.4]: ties are common, and so are ground truths matched only
    # by the low-quality rule.
    iou = torch.randint(1, 21, (3, 40, 6), generator=g).float() * torch.tensor([0.05, 0.03, 0.02]).view(3, 1, 1)
    valid = torch.ones(3, 6, dtype=torch.bool)
    ours = match(iou, valid, high, low, allow_low_quality)
    reference = Matcher(high, low, allow_low_quality)
    for i in range(3):
        assert torch.equal(ours[i], reference(iou[i].T.contiguous()))


def _labels(*counts: tuple[int, int, int]) -> torch.Tensor:
    """One row per image: ``positives`` labels of 1-3, ``negatives`` zeros, ``ignored`` -1, shuffled."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for positives, negatives, ignored in counts:
        row = torch.cat([torch.randint(1, 4, (positives,), generator=g), torch.zeros(negatives), -torch.ones(ignored)])
        rows.append(row[torch.randperm(len(row), generator=g)].long())
    return torch.stack(rows)


@pytest.mark.parametrize(
    "counts,expected",
    [
        ((300, 1500, 200), (128, 384)),  # enough of both: exactly 1:3
        ((20, 1500, 480), (20, 492)),  # few positives: negatives fill the batch
        ((1000, 40, 960), (128, 40)),  # few negatives: positives stay capped
        ((10, 30, 1960), (10, 30)),  # few of both: everything is taken
    ],
)
def test_sampler_counts_for_mask_rcnn_rois(counts, expected):
    labels = _labels(counts)
    torch.manual_seed(0)
    positive, negative = sample_balanced(labels, 512, 0.25)
    assert (positive.sum().item(), negative.sum().item()) == expected
    assert (labels[positive] > 0).all() and (labels[negative] == 0).all()


def test_sampler_counts_per_image_and_never_ignored():
    labels = _labels((200, 300, 10), (5, 500, 5), (0, 0, 510))
    torch.manual_seed(0)
    positive, negative = sample_balanced(labels, 256, 0.5)
    assert positive.sum(1).tolist() == [128, 5, 0]
    assert negative.sum(1).tolist() == [128, 251, 0]
    assert not ((positive | negative) & (labels < 0)).any()
    assert not (positive & negative).any()


def test_sampler_is_reproducible_and_random():
    labels = _labels((300, 1500, 200))
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(torch.cat(sample_balanced(labels, 512, 0.25)))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_pad_targets_shapes_and_validity():
    targets = [
        {"boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float64), "labels": torch.tensor([3, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[9.0, 9, 19, 19]]), "labels": torch.tensor([2])},
    ]
    boxes, labels, valid = pad_targets(targets, torch.device("cpu"))
    assert boxes.shape == (3, 2, 4) and boxes.dtype == torch.float32
    assert labels.tolist() == [[3, 1], [0, 0], [2, 0]]
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert boxes[0].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and (boxes[1] == 0).all()


def test_pad_targets_without_any_ground_truth_keeps_one_column():
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    boxes, labels, valid = pad_targets([empty, empty], torch.device("cpu"))
    assert boxes.shape == (2, 1, 4) and labels.shape == (2, 1) and not valid.any()
