"""The COCO-format loader: polygon and RLE masks, crowd handling, labels, resize/flip and batching."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.data.coco import CocoDataset, DetectionDataset, collate, hflip, prepare, resized_size
from model.data.shapes import ShapesDataset, write_coco


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    """Two images, sparse category ids (3 = cat, 7 = dog): a polygon square, an RLE blob, an uncompressed
    RLE, a crowd region, and an image with no annotations at all."""
    (tmp_path / "images").mkdir()
    h, w = 40, 60
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    cv2.imwrite(str(tmp_path / "images" / "a.png"), image[..., ::-1])
    cv2.imwrite(str(tmp_path / "images" / "b.png"), np.zeros((30, 20, 3), np.uint8))
    blob = np.zeros((h, w), np.uint8)
    blob[5:15, 30:50] = 1
    blob[15:20, 30:35] = 1
    stripe = np.zeros((h, w), np.uint8)
    stripe[30:38, 2:58] = 1
    uncompressed = mask_utils.frPyObjects({"size": [h, w], "counts": _uncompressed_counts(stripe)}, h, w)
    assert mask_utils.decode(uncompressed).sum() == stripe.sum()
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:4, 0:4] = 1
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 0,
            "bbox": [10, 20, 10, 10],
            "area": 100,
            "segmentation": [[10, 20, 20, 20, 20, 30, 10, 30]],
        },  # polygon square
        {
            "id": 2,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [30, 5, 20, 15],
            "area": 225,
            "segmentation": _rle(blob),
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [2, 30, 56, 8],
            "area": 448,
            "segmentation": {"size": [h, w], "counts": _uncompressed_counts(stripe)},
        },
        {
            "id": 4,
            "image_id": 1,
            "category_id": 7,
            "iscrowd": 1,
            "bbox": [0, 0, 4, 4],
            "area": 16,
            "segmentation": _rle(crowd),
        },
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": h, "width": w},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
        ],
        "annotations": anns,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return counts


def test_reads_polygon_and_rle(handmade: Path) -> None:
    ds = CocoDataset(handmade)
    assert ds.class_names == ["__background__", "cat", "dog"]  # sorted by category id: 3, 7
    assert len(ds) == 2
    s = ds.load(0)
    assert s.image.shape == (40, 60, 3) and s.image[0, 0].tolist() == [200, 0, 0]  # RGB order
    assert s.labels.tolist() == [2, 1, 1]  # dog, cat, cat; the crowd region is dropped
    np.testing.assert_allclose(s.boxes, [[10, 20, 20, 30], [30, 5, 50, 20], [2, 30, 58, 38]])
    masks = s.masks.full()
    square = masks[0]
    assert square[22:28, 12:18].all() and square.sum() == pytest.approx(100, abs=25)
    ys, xs = np.nonzero(square)
    assert xs.min() >= 10 and xs.max() <= 20 and ys.min() >= 20 and ys.max() <= 30
    assert masks[1].sum() == 225 and masks[1][5:15, 30:50].all()
    assert masks[2].sum() == 448 and masks[2][30:38, 2:58].all()


def test_image_without_annotations_is_kept(handmade: Path) -> None:
    s = CocoDataset(handmade).load(1)
    assert s.image.shape == (30, 20, 3)
    assert s.boxes.shape == (0, 4) and s.labels.shape == (0,) and s.masks.full().shape == (0, 30, 20)
    item = prepare(s, min_size=60, max_size=100)
    assert item.target["boxes"].shape == (0, 4) and item.target["masks"].shape == (0, 90, 60)


def test_resize_policy() -> None:
    assert resized_size(480, 640, 800, 1333) == (800, 1066)
    assert resized_size(300, 1000, 800, 1333) == (399, 1333)  # long side capped
    assert resized_size(256, 256, 512, 853) == (512, 512)


def test_flip_mirrors_boxes_and_masks() -> None:
    s = ShapesDataset(1, seed=2).load(0)
    f = hflip(s)
    np.testing.assert_array_equal(f.image, s.image[:, ::-1])
    np.testing.assert_array_equal(f.masks, s.masks[:, :, ::-1])
    for mask, (x1, y1, x2, y2) in zip(f.masks, f.boxes.astype(int), strict=True):
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)


def test_prepare_scales_boxes_with_masks() -> None:
    s = ShapesDataset(2, seed=8).load(1)
    item = prepare(s, min_size=200, max_size=333)
    nh, nw = resized_size(s.height, s.width, 200, 333)
    assert item.image.shape == (3, nh, nw) and item.image.dtype == torch.uint8
    masks, boxes = item.target["masks"], item.target["boxes"]
    assert masks.shape == (len(s.labels), nh, nw) and masks.dtype == torch.uint8
    for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist(), strict=True):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
        assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5


def test_collate_pads_to_multiples_of_32(tmp_path: Path) -> None:
    write_coco(tmp_path, num=3, seed=1)
    ds = DetectionDataset(CocoDataset(tmp_path), min_size=(96, 128), max_size=200, train=True, seed=0)
    batch = collate([ds[i] for i in range(3)])
    b, c, h, w = batch.images.shape
    assert (b, c) == (3, 3) and h % 32 == 0 and w % 32 == 0 and batch.images.dtype == torch.uint8
    assert batch.image_sizes.dtype == torch.int64 and batch.image_sizes.shape == (3, 2)
    for i, (ih, iw) in enumerate(batch.image_sizes.tolist()):
        oh, ow = batch.orig_sizes[i]
        assert (ih, iw) in {resized_size(oh, ow, 96, 200), resized_size(oh, ow, 128, 200)}
        assert batch.images[i, :, ih:, :].sum() == 0 and batch.images[i, :, :, iw:].sum() == 0
        t = batch.targets[i]
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["masks"].shape[1:] == (ih, iw)
        assert (t["boxes"][:, 2] <= iw + 1e-3).all() and (t["boxes"][:, 3] <= ih + 1e-3).all()
    # Same index, same augmentation: what makes resumed training see the same data.
    np.testing.assert_array_equal(ds[1].image.numpy(), ds[1].image.numpy())
