"""One task's detections as a Label Studio prediction: a list of result regions on the config's ``Target``.

Label Studio places regions in percent of the image's size (``original_width`` / ``original_height`` say which
size). Brush masks are Label Studio's own RLE (an RGBA bitmap whose alpha is the mask), encoded by
label-studio-sdk's converter from the full-image mask, which pycocotools decodes from our COCO RLE. Polygons are
our COCO polygons (one region per outline, holes dropped as in /segment), boxes our boxes.
"""

from __future__ import annotations

import uuid

import numpy as np
from pycocotools import mask as coco_mask

from service.core.postprocess import EncodedMasks
from service.core.runtime import Prediction
from service.label_studio.config import Target

Region = dict[str, object]


def task_prediction(
    pred: Prediction, masks: EncodedMasks | None, class_names: list[str], target: Target, model_version: str
) -> dict[str, object]:
    """The prediction Label Studio stores for one task: its regions, their mean score (Label Studio samples
    tasks by it) and the model's version. ``pred`` holds only detections of classes ``target`` maps."""
    regions = regions_of(pred, masks, class_names, target)
    scores = pred.scores.astype(np.float64)
    return {"result": regions, "score": float(scores.mean()) if len(scores) else 0.0, "model_version": model_version}


def regions_of(pred: Prediction, masks: EncodedMasks | None, class_names: list[str], target: Target) -> list[Region]:
    """Worker thread: every detection as one region (a polygon detection: one per outline)."""
    height, width = pred.image_size
    regions: list[Region] = []
    for i, (label, score) in enumerate(zip(pred.labels.tolist(), pred.scores.tolist(), strict=True)):
        common = {"from_name": target.from_name, "to_name": target.to_name, "type": target.result_type,
                  "original_width": width, "original_height": height, "image_rotation": 0,
                  "score": float(score), "readonly": False}
        names = {target.result_type: [target.labels[class_names[label]]]}
        for value in shapes(pred, masks, i, target):
            regions.append({"id": uuid.uuid4().hex[:10], **common, "value": {**value, **names}})
    return regions


def shapes(pred: Prediction, masks: EncodedMasks | None, i: int, target: Target) -> list[dict[str, object]]:
    """Detection ``i``'s geometry in the value of a ``target.kind`` region (several for a split polygon)."""
    height, width = pred.image_size
    if target.kind == "rectangle":
        x1, y1, x2, y2 = pred.boxes[i].astype(np.float64).tolist()
        return [{"x": 100 * x1 / width, "y": 100 * y1 / height, "width": 100 * (x2 - x1) / width,
                 "height": 100 * (y2 - y1) / height, "rotation": 0}]
    assert masks is not None, "brush and polygon targets ask the pipeline for masks"
    if target.kind == "polygon":
        assert masks.polygons is not None
        return [{"points": percent_points(polygon, width, height), "closed": True} for polygon in masks.polygons[i]]
    assert masks.rles is not None
    return [{"format": "rle", "rle": brush_rle(masks.rles[i])}]


def percent_points(polygon: list[float], width: int, height: int) -> list[list[float]]:
    """A COCO polygon [x1, y1, x2, y2, ...] in pixels as Label Studio's points [[x%, y%], ...]."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * (100.0 / width, 100.0 / height)
    return xy.tolist()  # type: ignore[no-any-return]  # numpy types tolist() as Any


def brush_rle(rle: dict[str, object]) -> list[int]:
    """A COCO RLE mask as Label Studio's brush RLE, through label-studio-sdk's converter (alpha 255 on the mask)."""
    from label_studio_sdk.converter.brush import mask2rle  # the annotation extra; imported on first use

    mask = coco_mask.decode({"size": rle["size"], "counts": str(rle["counts"]).encode()})
    alpha = np.ascontiguousarray(mask, dtype=np.uint8) * np.uint8(255)
    return list(mask2rle(alpha))  # type: ignore[no-untyped-call]  # the SDK declares no types
