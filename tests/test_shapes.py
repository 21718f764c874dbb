"""The synthetic shapes generator: deterministic, exact visible masks, sane COCO output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.data.shapes import (
    CLASS_NAMES,
    MAX_SIDE,
    MIN_SIDE,
    ShapesDataset,
    categories,
    generate,
    occlude,
    write_coco,
)


def test_class_names_and_categories() -> None:
    assert CLASS_NAMES == ("circle", "square", "triangle", "star")
    assert [(c["id"], c["name"]) for c in categories()] == [(1, "circle"), (2, "square"), (3, "triangle"), (4, "star")]


def test_generator_is_deterministic() -> None:
    for index in (0, 5):
        a, b = generate(11, index), generate(11, index)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    stream = ShapesDataset(3, seed=11)
    np.testing.assert_array_equal(stream.load(2).image, generate(11, 2).image)
    assert not np.array_equal(generate(11, 0).image, generate(12, 0).image)


@pytest.mark.parametrize("index", range(8))
def test_sample_geometry(index: int) -> None:
    """Sizes in range, masks binary and inside their (tight) boxes, labels valid, masks disjoint."""
    s = generate(3, index)
    assert MIN_SIDE <= s.height <= MAX_SIDE and MIN_SIDE <= s.width <= MAX_SIDE
    assert s.image.dtype == np.uint8 and s.image.shape == (s.height, s.width, 3)
    assert s.masks.shape == (len(s.labels), s.height, s.width)
    assert set(np.unique(s.masks)) <= {0, 1}
    assert set(s.labels.tolist()) <= {1, 2, 3, 4}
    for mask, (x1, y1, x2, y2) in zip(s.masks, s.boxes.astype(int), strict=True):
        assert mask.sum() > 0
        inside = np.zeros_like(mask)
        inside[y1:y2, x1:x2] = 1
        assert not (mask & (1 - inside)).any(), "mask pixel outside its box"
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2), "box is not tight"
    # Visible masks never overlap: each pixel belongs to at most one object (the topmost).
    assert s.masks.sum(axis=0).max() <= 1


def test_shape_sizes_follow_the_short_side() -> None:
    """Unoccluded extent stays within ~16-50% of the short side (box of a rotated shape <= diameter)."""
    extents = []
    for index in range(12):
        s = generate(5, index)
        short = min(s.height, s.width)
        for x1, y1, x2, y2 in s.boxes:
            extents.append(max(x2 - x1, y2 - y1) / short)
    assert max(extents) <= 0.5 + 0.01
    assert np.median(extents) > 0.12


def test_occluded_parts_are_removed_from_the_earlier_shape() -> None:
    back = np.zeros((3, 20, 20), np.uint8)
    back[0, 2:12, 2:12] = 1  # drawn first
    back[1, 8:18, 8:18] = 1  # drawn second, covers the corner of the first
    back[2, 0:4, 0:4] = 1  # drawn last, covers the corner of the first
    visible = occlude(back)
    expected0 = back[0].copy()
    expected0[8:12, 8:12] = 0
    expected0[0:4, 0:4] = 0
    np.testing.assert_array_equal(visible[0], expected0)
    np.testing.assert_array_equal(visible[1], back[1])  # nothing covers it
    np.testing.assert_array_equal(visible[2], back[2])  # topmost stays whole
    np.testing.assert_array_equal(back[0, 2:12, 2:12], 1)  # input untouched


def test_generated_images_contain_occlusions() -> None:
    """The data set really has overlapping objects (exercised by the occlusion logic), not just in theory:
    a visible mask that is not the whole shape shows up as a box containing another object's pixels."""
    overlapping = 0
    for index in range(20):
        s = generate(0, index)
        for i, (x1, y1, x2, y2) in enumerate(s.boxes.astype(int)):
            others = np.delete(s.masks, i, axis=0)[:, y1:y2, x1:x2]
            overlapping += int(others.any())
    assert overlapping > 5


def test_write_coco_round_trip(tmp_path) -> None:
    from pycocotools import mask as mask_utils

    path = write_coco(tmp_path, num=3, seed=4)
    data = json.loads(path.read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
    assert len(data["images"]) == 3 and len(list((tmp_path / "images").iterdir())) == 3
    for img in data["images"]:
        s = generate(4, img["id"] - 1)
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        assert (img["height"], img["width"]) == (s.height, s.width)
        assert [a["category_id"] for a in anns] == s.labels.tolist()
        for a, mask in zip(anns, s.masks, strict=True):
            np.testing.assert_array_equal(mask_utils.decode(a["segmentation"]), mask)
            assert a["area"] == mask.sum() and a["iscrowd"] == 0


def test_cli_writes_a_data_set(tmp_path, capsys) -> None:
    from model.data.shapes import main

    assert main(["--out", str(tmp_path / "val"), "--num", "2", "--seed", "9"]) == 0
    data = json.loads((tmp_path / "val" / "instances.json").read_text())
    assert [i["file_name"] for i in data["images"]] == ["000001.png", "000002.png"]
    assert "wrote 2 images" in capsys.readouterr().out
