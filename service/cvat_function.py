"""CVAT auto-annotation with the served model: a detection function for ``cvat_sdk.auto_annotation``.

    cvat-cli --server-host CVAT --auth USER task auto-annotate TASK_ID \\
        --function-module service.cvat_function -p url=str:http://127.0.0.1:8000

``cvat-cli`` (or ``cvat_sdk.auto_annotation.annotate_task``, or a CVAT agent: ``cvat-cli function
run-agent``) calls ``create(**params)`` and then, for each image of the task, ``detect``. Each image goes to the
server's POST /segment over HTTP (service/client.py), so CVAT gets the same detections as every other client of
the one served model. The labels are the model's classes (GET /v1/model), of type ``mask``; CVAT matches them to
the task's labels by name (``--allow-unmatched-labels`` drops the classes the task lacks). Each detection comes
back as a mask shape (``cvat_sdk.masks.encode_mask``), or as its outlines (one polygon each) when CVAT asks for
polygons (``--conv-mask-to-poly``); CVAT's confidence threshold is the request's score threshold. A server with
API keys takes the key from ``-p api_key=str:KEY`` or, kept off the command line, the ``MRCNN_API_KEY`` variable
of the process that runs the function; it is sent as ``Authorization: Bearer``.

Needs the ``annotation`` extra (cvat-sdk); no PyTorch.
"""

from __future__ import annotations

import io

import cvat_sdk.auto_annotation as cvataa
import cvat_sdk.models as models
import PIL.Image
from cvat_sdk.masks import encode_mask

from service.client import DEFAULT_URL, Detection, SegmentClient

MIN_POLYGON_NUMBERS = 6  # CVAT's polygon: at least three points


class SegmentFunction:
    """A detection function over the server at ``url``; its spec is the served model's classes."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.client = SegmentClient(url, timeout, api_key)  # api_key None: MRCNN_API_KEY, if set
        classes: list[str] = self.client.model()["classes"]
        # Our class ids (1..K, 0 being the background) are the spec's label ids.
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(name, class_id, type="mask") for class_id, name in enumerate(classes, 1)]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        """The image's detections at CVAT's threshold (the server's default when it has none), as masks or,
        when CVAT asks for polygons, as polygons. The image travels as PNG: lossless, so the server sees CVAT's
        pixels."""
        png = io.BytesIO()
        image.convert("RGB").save(png, "PNG")
        polygons = context.conv_mask_to_poly
        detections = self.client.segment(png.getvalue(), score_threshold=context.conf_threshold,
                                         formats=["polygons" if polygons else "rle"])
        return [shape for detection in detections for shape in shapes_of(detection, polygons)]


def shapes_of(detection: Detection, polygons: bool) -> list[models.LabeledShapeRequest]:
    """One detection as CVAT shapes: its mask, or one polygon per outline."""
    if polygons:
        return [cvataa.polygon(detection.class_id, outline) for outline in detection.polygons or []
                if len(outline) >= MIN_POLYGON_NUMBERS]
    if detection.mask is None or not detection.mask.any():
        return []
    return [cvataa.mask(detection.class_id, encode_mask(detection.mask))]


create = SegmentFunction  # what cvat-cli calls with the -p parameters
