"""export/verification.py: detections paired as sets, the cuts where one side may lack a detection, and the
rule built on float32's measured noise. Hand-made outputs, so each case is exactly the one named."""

import numpy as np
import pytest

from export.verification import FLOOR, Figures, Rule, box_error, compare, pair_detections

D = 5  # detections per image
NMS = 0.5


def _outputs(detections: list[tuple[list[float], int, float]], d: int = D) -> dict[str, np.ndarray]:
    """One image's graph outputs from (box, label, score) rows, sorted by score, zero-padded to ``d``."""
    rows = sorted(detections, key=lambda r: -r[2])
    out = {
        "boxes": np.zeros((1, d, 4), np.float32),
        "scores": np.zeros((1, d), np.float32),
        "labels": np.zeros((1, d), np.int64),
        "masks": np.zeros((1, d, 4, 4), np.float32),
        "num_detections": np.array([len(rows)]),
    }
    for i, (box, label, score) in enumerate(rows):
        out["boxes"][0, i], out["labels"][0, i], out["scores"][0, i] = box, label, score
        out["masks"][0, i] = score  # a mask that moves with its detection
    return out


BOXES = [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [40, 40, 90, 90], [50, 0, 60, 8]]


def _reference(scores=(0.9, 0.8, 0.7, 0.3, 0.06)) -> list:
    return [(box, 1 + i % 2, s) for i, (box, s) in enumerate(zip(BOXES, scores, strict=True))]


def test_identical_outputs_pair_completely():
    ref = _outputs(_reference())
    result = compare(ref, ref, NMS)
    assert result.paired == 5 and not result.unpaired and result.figures == Figures()
    assert result.mask_iou == 1.0


def test_near_ties_may_swap_order():
    """Two detections 1e-6 apart come in the other order: paired as sets, the order does not matter."""
    ref = _reference((0.9, 0.8, 0.7000010, 0.7000005, 0.06))
    cand = _reference((0.9, 0.8, 0.7000005, 0.7000010, 0.06))
    out_ref, out_cand = _outputs(ref), _outputs(cand)
    assert out_ref["labels"][0, 2] != out_cand["labels"][0, 2]  # row by row they differ
    result = compare(out_ref, out_cand, NMS)
    assert result.paired == 5 and not result.unpaired
    assert result.figures.score == pytest.approx(5e-7, abs=1e-7)


def test_pairing_needs_the_same_class_and_a_close_box():
    ref = _outputs(_reference())
    moved = _reference()
    moved[0] = ([3, 0, 13, 10], 1, 0.9)  # IoU 0.54 with the reference box: another detection
    moved[1] = (BOXES[1], 1, 0.8)  # same box, other class
    pairs = pair_detections(ref, _outputs(moved), 0, NMS)
    assert sorted(pairs[:, 0].tolist()) == [2, 3, 4]


def test_a_detection_dropped_at_the_score_threshold_is_allowed():
    """Scored 0.0500004 on one side and at or below the 0.05 threshold on the other: within the tolerance."""
    ref = _outputs(_reference((0.9, 0.8, 0.7, 0.3, 0.0500004)))
    cand = _outputs(_reference()[:4])
    result = compare(ref, cand, NMS)
    assert len(result.unpaired) == 1 and result.unpaired[0].side == "reference"
    assert result.unexplained(score_tolerance=1e-6, score_threshold=0.05) == []
    assert len(result.unexplained(score_tolerance=1e-7, score_threshold=0.05)) == 1


def test_a_detection_dropped_at_the_top_d_cut_is_allowed():
    """Both sides full at D = 5; their fifth detections differ and score within the tolerance of each other."""
    ref = _reference((0.9, 0.8, 0.7, 0.3, 0.2000003))
    cand = _reference((0.9, 0.8, 0.7, 0.3, 0.2))[:4] + [([70, 0, 80, 10], 2, 0.2000001)]
    result = compare(_outputs(ref), _outputs(cand), NMS)
    assert sorted(u.side for u in result.unpaired) == ["candidate", "reference"]
    assert result.unexplained(score_tolerance=1e-6, score_threshold=0.05) == []
    assert len(result.unexplained(score_tolerance=1e-8, score_threshold=0.05)) == 1  # the higher one


def test_a_missing_detection_away_from_the_cuts_is_refused():
    """A 0.7 detection on one side only is no rounding noise, whatever the tolerance's size short of 0.6."""
    ref = _outputs(_reference())
    cand = _outputs([r for i, r in enumerate(_reference()) if i != 2])
    result = compare(ref, cand, NMS)
    (missing,) = result.unexplained(score_tolerance=1e-2, score_threshold=0.05)
    assert missing.score == pytest.approx(0.7) and missing.side == "reference" and not missing.other_full


def test_figures_are_the_worst_paired_errors():
    ref = _outputs(_reference())
    cand = _outputs(_reference((0.9, 0.8002, 0.7, 0.3, 0.06)))
    cand["boxes"][0, 3] += np.array([0, 0, 0.05, 0], np.float32)  # 0.1% of the 50 px box
    result = compare(ref, cand, NMS)
    assert result.figures.score == pytest.approx(2e-4, rel=1e-3)
    assert result.figures.box == pytest.approx(1e-3, rel=1e-3)
    assert result.figures.mask == pytest.approx(2e-4, rel=1e-3)


def test_box_error_is_relative_to_the_box_beyond_one_pixel():
    ref = np.array([[0, 0, 0.5, 0.5], [0, 0, 200, 100]], np.float32)
    assert box_error(ref, ref + np.array([1e-3, 0, 0, 0], np.float32)) == pytest.approx(1e-3, rel=1e-3)
    assert box_error(ref, ref + np.array([[0, 0, 0, 0], [0, 0, 0.2, 0]], np.float32)) == pytest.approx(1e-3, rel=1e-3)


def test_rule_scales_float32_noise_and_refuses_beyond_it():
    ref = _outputs(_reference())
    float32 = compare(ref, _outputs(_reference((0.9, 0.800001, 0.7, 0.3, 0.06))), NMS)
    onnx_close = compare(ref, _outputs(_reference((0.9, 0.800003, 0.7, 0.3, 0.06))), NMS)
    onnx_far = compare(ref, _outputs(_reference((0.9, 0.80002, 0.7, 0.3, 0.06))), NMS)
    rule = Rule(score_threshold=0.05, nms_threshold=NMS, factor=4)
    close = rule.judge(float32, onnx_close)
    assert close.tolerance.score == pytest.approx(4 * float32.figures.score + FLOOR.score)
    assert close.ok()
    far = rule.judge(float32, onnx_far)
    assert not far.ok() and "score error" in far.problem()
    assert "FAILS" in str(far)


def test_rule_refuses_an_unpaired_detection_even_within_the_figures():
    ref = _outputs(_reference())
    float32 = compare(ref, ref, NMS)
    onnx = compare(ref, _outputs(_reference()[1:]), NMS)  # the 0.9 detection is gone
    verdict = Rule(score_threshold=0.05, nms_threshold=NMS).judge(float32, onnx)
    assert onnx.figures.within(verdict.tolerance) and not verdict.ok()
    assert "score 0.9000 only in the reference" in verdict.problem()
