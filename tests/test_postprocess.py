"""Box-local mask post-processing against the references: torchvision paste and pycocotools encode."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from service.core.postprocess import encode_masks, paste_local, rle_counts, rle_runs, rle_strings
from tests.helpers import fill_holes, iou

torch = pytest.importorskip("torch")
roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")


def _blob_masks(rng: np.random.Generator, n: int, m: int = 28) -> np.ndarray:
    """Object-like probability maps: a soft ellipse, a hole sometimes, plus noise."""
    yy, xx = np.mgrid[0:m, 0:m] / (m - 1) - 0.5
    sy, sx = rng.uniform(0.15, 0.4, (2, n, 1, 1))
    p = np.exp(-((yy / sy) ** 2 + (xx / sx) ** 2)) + rng.normal(0, 0.08, (n, m, m))
    p[::3, m // 2 - 1 : m // 2 + 1, m // 2 - 1 : m // 2 + 1] = 0.0  # small holes
    return np.clip(p, 0, 1).astype(np.float32)


def _boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Boxes of many sizes and aspect ratios; some cross the image border (never fully outside)."""
    wh = np.exp(rng.uniform(np.log(2), np.log(0.9 * min(height, width)), (n, 2)))
    x1 = rng.uniform(-0.3 * wh[:, 0], width - 0.7 * wh[:, 0])
    y1 = rng.uniform(-0.3 * wh[:, 1], height - 0.7 * wh[:, 1])
    return np.stack([x1, y1, x1 + wh[:, 0], y1 + wh[:, 1]], axis=1).astype(np.float32)


def _torchvision_masks(masks: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    pasted = roi_heads.paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), size)
    return (pasted[:, 0].numpy() > 0.5).astype(np.uint8)


@pytest.mark.parametrize("size", [(480, 640), (333, 200), (57, 1000)])
def test_rle_matches_torchvision_paste_and_pycocotools(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    height, width = size
    masks, boxes = _blob_masks(rng, 40), _boxes(rng, 40, height, width)
    boxes[0] = [0, 0, width, height]  # full image: runs touch across columns
    masks[0] = 1.0
    enc = encode_masks(masks, boxes, size)
    ref = _torchvision_masks(masks, boxes, size)
    ref_rles = mask_utils.encode(np.asfortranarray(ref.transpose(1, 2, 0)))
    identical = 0
    for i, rle in enumerate(enc.rles):
        decoded = mask_utils.decode(rle)
        assert decoded.shape == size
        assert iou(decoded, ref[i]) >= 0.95
        assert enc.areas[i] == decoded.sum() == int(mask_utils.area(rle))
        identical += rle["counts"] == ref_rles[i]["counts"].decode()
    # Same maths as torchvision: beyond IoU, nearly every string is byte-identical to pycocotools'.
    assert identical >= 0.8 * len(enc.rles)


def test_encoder_is_pycocotools_on_arbitrary_masks() -> None:
    """The string compressor and run finder alone, on masks with every kind of run pattern."""
    rng = np.random.default_rng(1)
    height, width = 37, 23
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        full = (rng.random((5, height, width)) < density).astype(np.uint8)
        # Full-image boxes give full-image blocks; overwrite them with the exact test masks.
        whole = np.tile(np.array([[0, 0, width, height]], np.float32), (5, 1))
        local = paste_local(np.zeros((5, 4, 4), np.float32), whole, (height, width))
        for i in range(5):
            local.mask(i)[...] = full[i]
        det, start, end = rle_runs(local)
        strings = rle_strings(*rle_counts(det, start, end, 5, height * width))
        ref = mask_utils.encode(np.asfortranarray(full.transpose(1, 2, 0)))
        assert strings == [r["counts"].decode() for r in ref]


def test_empty_outside_and_tiny_detections() -> None:
    size = (100, 120)
    boxes = np.array([[200, 10, 260, 40], [50, 50, 50.5, 50.4], [10, 10, 60, 60]], np.float32)
    masks = np.zeros((3, 28, 28), np.float32)
    masks[1:] = 0.9
    enc = encode_masks(masks, boxes, size)
    assert enc.areas[0] == 0 and mask_utils.decode(enc.rles[0]).sum() == 0
    assert enc.polygons[0] == []
    assert enc.areas[1] >= 1
    for rle, area in zip(enc.rles, enc.areas, strict=True):
        assert mask_utils.decode(rle).sum() == area
    none = encode_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), size)
    assert none.rles == [] and none.polygons == [] and none.areas.shape == (0,)


def test_polygons_cover_rle_mask() -> None:
    rng = np.random.default_rng(7)
    size = (300, 400)
    masks, boxes = _blob_masks(rng, 30), _boxes(rng, 30, *size)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 24)  # polygons need a few pixels
    enc = encode_masks(masks, boxes, size)
    for rle, polys in zip(enc.rles, enc.polygons, strict=True):
        decoded = mask_utils.decode(rle)
        raster = np.zeros(size, np.uint8)
        for poly in polys:
            pts = np.floor(np.asarray(poly).reshape(-1, 2)).astype(np.int32)  # undo the +0.5
            cv2.fillPoly(raster, [pts], 1)
        assert iou(raster, decoded) >= 0.9
        if decoded.sum() >= 2000:  # COCO's rasterizer reads them too (it shaves edges of small ones)
            coco = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, *size)))
            assert iou(coco, decoded) >= 0.9


def test_polygons_trace_every_part_exactly() -> None:
    """Outlines of every connected part, specks and 1-pixel lines included: filled, they give the
    mask with its holes filled, pixel for pixel; each is a valid COCO polygon list (>= 3 points)."""
    rng = np.random.default_rng(11)
    size = (120, 160)
    masks = rng.uniform(0.3, 0.7, (20, 28, 28)).astype(np.float32)  # fragmented, like random weights
    boxes = _boxes(rng, 20, *size)
    enc = encode_masks(masks, boxes, size)
    for rle, polys in zip(enc.rles, enc.polygons, strict=True):
        decoded = mask_utils.decode(rle)
        raster = np.zeros(size, np.uint8)
        for poly in polys:
            assert len(poly) >= 6 and len(poly) % 2 == 0
            cv2.fillPoly(raster, [np.floor(np.asarray(poly).reshape(-1, 2)).astype(np.int32)], 1)
        assert np.array_equal(raster, fill_holes(decoded))


def test_work_stays_box_local() -> None:
    """The buffer holds box pixels only, never N full images."""
    size = (800, 1333)
    boxes = np.tile(np.array([[100, 100, 140, 150]], np.float32), (100, 1))
    local = paste_local(np.ones((100, 28, 28), np.float32), boxes, size)
    assert local.buffer.size < 100 * 60 * 60
