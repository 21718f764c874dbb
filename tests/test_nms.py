"""model/nms.py: the multiclass_nms custom op against torchvision's batched_nms, keep_mask and nms_top_k."""

import pytest
import torch
from torchvision.ops import batched_nms

from model.nms import keep_mask, multiclass_nms, nms_top_k


def _inputs(b: int, c: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes crowded into a 60 px square, so that many overlap, and distinct random scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(b, n, 2, generator=g) * 20], -1)
    return boxes, torch.rand(b, c, n, generator=g)


def _reference(boxes, scores, max_output: int, iou_threshold: float, score_threshold: float) -> torch.Tensor:
    """Per image: torchvision's batched_nms with the class as group, then the best ``max_output`` per class."""
    rows = []
    for b in range(scores.shape[0]):
        c, n = (scores[b] > score_threshold).nonzero(as_tuple=True)
        keep = batched_nms(boxes[b, n], scores[b, c, n], c, iou_threshold)
        for cls in range(scores.shape[1]):
            rows += [[b, cls, int(n[k])] for k in keep[c[keep] == cls][:max_output]]
    return torch.tensor(rows, dtype=torch.int64).view(-1, 3)


@pytest.mark.parametrize("b,c,n", [(1, 1, 60), (2, 3, 40), (4, 1, 25), (1, 5, 30), (3, 2, 1)])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.7])
def test_matches_torchvision_batched_nms(b, c, n, iou_threshold):
    boxes, scores = _inputs(b, c, n, seed=b * 100 + c * 10 + n)
    selected = multiclass_nms(boxes, scores, 1000, iou_threshold, 0.0)
    assert torch.equal(selected, _reference(boxes, scores, 1000, iou_threshold, 0.0))


def test_output_is_ordered_by_batch_class_then_decreasing_score():
    boxes, scores = _inputs(3, 4, 50, seed=1)
    selected = multiclass_nms(boxes, scores, 1000, 0.5, 0.1)
    group = selected[:, 0] * 4 + selected[:, 1]
    assert (group[1:] >= group[:-1]).all()
    kept_scores = scores[selected[:, 0], selected[:, 1], selected[:, 2]]
    same_group = group[1:] == group[:-1]
    assert (kept_scores[1:][same_group] < kept_scores[:-1][same_group]).all()


def test_score_threshold_is_exclusive():
    boxes, scores = _inputs(2, 3, 40, seed=2)
    scores[0, 1, 7] = 0.5
    selected = multiclass_nms(boxes, scores, 1000, 0.5, 0.5)
    assert (scores[selected[:, 0], selected[:, 1], selected[:, 2]] > 0.5).all()
    assert torch.equal(selected, _reference(boxes, scores, 1000, 0.5, 0.5))


def test_iou_threshold_is_exclusive():
    """[0, 0, 10, 10] and [0, 0, 10, 5] overlap with IoU 50 / 100 = 0.5 exactly: kept at 0.5, dropped below."""
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]]])
    scores = torch.tensor([[[0.9, 0.8]]])
    assert multiclass_nms(boxes, scores, 10, 0.5, 0.0)[:, 2].tolist() == [0, 1]
    assert multiclass_nms(boxes, scores, 10, 0.49, 0.0)[:, 2].tolist() == [0]


def test_max_output_per_class_keeps_the_best():
    boxes, scores = _inputs(2, 3, 40, seed=3)
    selected = multiclass_nms(boxes, scores, 4, 0.9, 0.0)
    assert torch.equal(selected, _reference(boxes, scores, 4, 0.9, 0.0))
    counts = torch.bincount(selected[:, 0] * 3 + selected[:, 1], minlength=6)
    assert counts.tolist() == [4] * 6


def test_nothing_above_threshold():
    boxes, scores = _inputs(2, 3, 10, seed=4)
    assert multiclass_nms(boxes, scores, 10, 0.5, 1.0).shape == (0, 3)


def test_keep_mask_scatters_the_triples():
    selected = torch.tensor([[0, 0, 3], [0, 2, 1], [1, 1, 0], [1, 1, 4]])
    mask = keep_mask(selected, (2, 3, 5))
    expected = torch.zeros(2, 3, 5, dtype=torch.bool)
    expected[0, 0, 3] = expected[0, 2, 1] = expected[1, 1, 0] = expected[1, 1, 4] = True
    assert torch.equal(mask, expected)


def test_op_registration_is_consistent():
    """Fake kernel (data-dependent output size), schema and autograd registration agree."""
    boxes, scores = _inputs(2, 3, 20, seed=5)
    torch.library.opcheck(multiclass_nms, (boxes, scores, 5, 0.5, 0.2))


def test_nms_top_k_is_nms_then_the_best_survivors_per_image():
    """Two images of two entries (e.g. classes) each: the k best survivors of NMS per image, invalid
    candidates neither kept nor suppressing, rows past the survivors not real."""
    boxes, scores = _inputs(4, 1, 30, seed=5)
    valid = torch.rand(4, 1, 30, generator=torch.Generator().manual_seed(6)) > 0.3
    top, index, real = nms_top_k(boxes, scores, valid, 0.5, max_per_group=30, k=50, images=2)
    assert top.shape == index.shape == real.shape == (2, 50)
    for image in range(2):
        candidates = []
        for entry in (2 * image, 2 * image + 1):
            n = valid[entry, 0].nonzero().squeeze(1)
            keep = batched_nms(boxes[entry, n], scores[entry, 0, n], torch.zeros_like(n), 0.5)
            candidates += [(float(scores[entry, 0, n[k]]), (entry - 2 * image) * 30 + int(n[k])) for k in keep]
        candidates.sort(reverse=True)
        count = int(real[image].sum())
        assert count == len(candidates) and not real[image, count:].any()
        assert index[image, :count].tolist() == [i for _, i in candidates]
        torch.testing.assert_close(top[image, :count], torch.tensor([s for s, _ in candidates]))
