"""From one image's Prediction to the /segment response, in three steps: filter (the request's classes
and count), encode (box-local masks to RLE and polygons) and serialize (JSON, timed inside total_ms)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np

from contract import GraphMetadata
from service.options import Resolved
from service.postprocess import EncodedMasks, encode_masks
from service.runtime import Prediction


def filter_detections(pred: Prediction, options: Resolved) -> Prediction:
    """The detections the request asked for: of its classes, at most its count, best first."""
    keep = np.arange(len(pred.scores))
    if options.labels is not None:
        keep = keep[np.isin(pred.labels, options.labels)]
    if options.max_detections is not None:
        keep = keep[: options.max_detections]
    return replace(pred, boxes=pred.boxes[keep], scores=pred.scores[keep], labels=pred.labels[keep],
                   masks=pred.masks[keep])


def encode_detections(pred: Prediction, options: Resolved) -> EncodedMasks:
    """Masks pasted box-locally into the original image and encoded as the request asked."""
    return encode_masks(pred.masks, pred.boxes, pred.image_size, rle=options.rle, polygons=options.polygons)


def detection_dicts(pred: Prediction, encoded: EncodedMasks, class_names: list[str]) -> list[dict]:
    """One JSON-ready dict per detection (schemas.Detection); absent formats are left out."""
    boxes = np.round(pred.boxes.astype(np.float64), 2).tolist()
    rows = zip(pred.labels.tolist(), pred.scores.tolist(), boxes, encoded.areas.tolist(), strict=True)
    dets = []
    for i, (label, score, box, area) in enumerate(rows):
        det = {"label": class_names[label], "class_id": label, "score": score, "box": box, "area": area}
        if encoded.rles is not None:
            det["mask"] = encoded.rles[i]
        if encoded.polygons is not None:
            det["polygons"] = encoded.polygons[i]
        dets.append(det)
    return dets


def serialize(
    pred: Prediction, encoded: EncodedMasks, info: GraphMetadata, batch_size: int, timings: dict[str, float],
    started: float,
) -> bytes:
    """The response body (schemas.SegmentResponse). The detections, by far the largest part, are encoded
    first, so that ``total_ms`` (from ``started``, a perf_counter reading) includes their JSON time."""
    height, width = pred.image_size
    body = json.dumps(
        {
            "image": {"width": width, "height": height},
            "model": {"name": info.model_name, "version": info.model_version},
            "batch_size": batch_size,
            "detections": detection_dicts(pred, encoded, info.class_names),
        },
        separators=(",", ":"),
    )
    timings = {**timings, "total_ms": (time.perf_counter() - started) * 1e3}
    rounded = json.dumps({k: round(v, 3) for k, v in timings.items()}, separators=(",", ":"))
    # The timings are the last member: the body is one JSON object, so they go before its closing brace.
    return f'{body[:-1]},"timings":{rounded}}}'.encode()
