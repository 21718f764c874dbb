"""/segment's response body: one image's selected detections and their encoded masks as JSON, the JSON
encoding timed inside ``total_ms``."""

from __future__ import annotations

import json
import time

import numpy as np

from contract import GraphMetadata
from service.core.postprocess import EncodedMasks
from service.core.runtime import Prediction


def detection_dicts(pred: Prediction, encoded: EncodedMasks, class_names: list[str]) -> list[dict[str, object]]:
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


def response_body(
    pred: Prediction, encoded: EncodedMasks, info: GraphMetadata, batch_size: int, timings: dict[str, float],
    started: float, tiles: int = 1,
) -> bytes:
    """The response body (schemas.SegmentResponse). The detections, by far the largest part, are encoded
    first, so that ``total_ms`` (from ``started``, a perf_counter reading) includes their JSON time. ``tiles``
    is written only for a tiled request (more than one image sent to the model)."""
    height, width = pred.image_size
    head: dict[str, object] = {
        "image": {"width": width, "height": height},
        "model": {"name": info.model_name, "version": info.model_version},
        "batch_size": batch_size,
    }
    if tiles > 1:
        head["tiles"] = tiles
    body = json.dumps({**head, "detections": detection_dicts(pred, encoded, info.class_names)},
                      separators=(",", ":"))
    timings = {**timings, "total_ms": (time.perf_counter() - started) * 1e3}
    rounded = json.dumps({k: round(v, 3) for k, v in timings.items()}, separators=(",", ":"))
    # The timings are the last member: the body is one JSON object, so they go before its closing brace.
    return f'{body[:-1]},"timings":{rounded}}}'.encode()
