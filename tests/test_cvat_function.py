"""The CVAT auto-annotation function (service/cvat_function.py) driven as cvat-sdk's driver drives it
(``cvat_sdk.auto_annotation.annotate_task``, without a CVAT server): ``create`` with cvat-cli's parameters, its
spec checked by the SDK, ``detect`` on each image with the driver's own context, and its output validated and
mapped to a task's labels by the SDK's own mapper. The shapes, decoded back, are /segment's detections."""

from __future__ import annotations

import logging

import cvat_sdk.models as models
import numpy as np
import PIL.Image
import pytest
from cvat_sdk.auto_annotation import DetectionFunctionSpec
from cvat_sdk.auto_annotation.driver import _AnnotationMapper, _DetectionFunctionContextImpl
from cvat_sdk.masks import decode_mask

from service.client import SegmentClient, SegmentError
from service.cvat_function import create
from tests.conftest import DEMO_MAX_UPLOAD, KnownImage
from tests.helpers import ServerThread, iou

FRAME = 3  # the image's frame in the task: the driver puts it on every shape
# A task's labels, with their own ids: all the model's classes but "star", and one the model does not know.
TASK_LABELS = {"circle": 11, "square": 12, "triangle": 13, "cat": 14}
API_KEY = "cvat-key-3nR8tQ1wVb6yLp0sXe5kZ2mJ9hD4gF7c"


def annotate(function: object, image: PIL.Image.Image, conf_threshold: float | None = None,
             conv_mask_to_poly: bool = False) -> list[models.LabeledShapeRequest]:
    """What annotate_task does for one frame: detect with its context, then validate and remap with its mapper."""
    task_labels = [models.Label(id=i, name=name, type="any", attributes=[], sublabels=[])  # as CVAT serves them
                   for name, i in TASK_LABELS.items()]
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, task_labels,  # type: ignore[attr-defined]
                               allow_unmatched_labels=True, conv_mask_to_poly=conv_mask_to_poly)
    context = _DetectionFunctionContextImpl(frame_name="shapes.png", conf_threshold=conf_threshold,
                                            conv_mask_to_poly=conv_mask_to_poly)
    tags, shapes = mapper.validate_and_remap(function.detect(context, image), FRAME)  # type: ignore[attr-defined]
    assert tags == []
    assert all(shape.frame == FRAME and shape.source == "auto" for shape in shapes)
    return list(shapes)


@pytest.fixture(scope="module")
def function(demo_server):  # -> SegmentFunction
    """The function as cvat-cli makes it from ``-p url=str:...``."""
    return create(url=demo_server.url, timeout=600.0)


def test_the_spec_is_the_served_models_classes(function, demo_server) -> None:
    assert isinstance(function.spec, DetectionFunctionSpec)  # its constructor checked the labels
    classes = SegmentClient(demo_server.url).model()["classes"]
    assert [(label.name, label.id, label.type) for label in function.spec.labels] == [
        (name, i, "mask") for i, name in enumerate(classes, 1)]


def test_masks_are_the_segment_masks_on_the_tasks_labels(function, demo_server, shapes_image: KnownImage) -> None:
    image = PIL.Image.open(shapes_image.path)
    shapes = annotate(function, image)
    expected = [d for d in SegmentClient(demo_server.url, timeout=600).segment(shapes_image.path)
                if d.label in TASK_LABELS]  # the task has no "star": its detections are dropped
    assert len(expected) >= 3
    assert [(s.type.value, s.label_id) for s in shapes] == [("mask", TASK_LABELS[d.label]) for d in expected]
    for shape, detection in zip(shapes, expected, strict=True):
        mask = decode_mask(shape.points, image_width=image.width, image_height=image.height)
        assert iou(mask, detection.mask) >= 0.98


def test_polygons_when_cvat_asks_for_them(function, demo_server, shapes_image: KnownImage) -> None:
    shapes = annotate(function, PIL.Image.open(shapes_image.path), conv_mask_to_poly=True)
    expected = SegmentClient(demo_server.url, timeout=600).segment(shapes_image.path, formats=["polygons"])
    outlines = [(d, p) for d in expected if d.label in TASK_LABELS for p in d.polygons or []]
    assert [(s.type.value, s.label_id) for s in shapes] == [("polygon", TASK_LABELS[d.label]) for d, _ in outlines]
    for shape, (_, polygon) in zip(shapes, outlines, strict=True):
        np.testing.assert_allclose(shape.points, polygon)


def test_cvats_threshold_is_the_requests(function, demo_server, shapes_image: KnownImage) -> None:
    """At 0.99 fewer shapes than at 0.5, as many as /segment keeps at 0.99."""
    image = PIL.Image.open(shapes_image.path)
    strict = annotate(function, image, conf_threshold=0.99)
    kept = [d for d in SegmentClient(demo_server.url, timeout=600).segment(shapes_image.path, score_threshold=0.99)
            if d.label in TASK_LABELS]
    assert len(strict) == len(kept) < len(annotate(function, image, conf_threshold=0.5))


# -- a server behind API keys ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server():  # -> ServerThread
    """The demo model behind one API key."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600,
                        api_keys=API_KEY)
    with ServerThread(create_app(settings)) as server:
        yield server


def test_against_a_keyed_server_with_the_key(keyed_server, shapes_image: KnownImage, monkeypatch) -> None:
    """``-p api_key=str:KEY`` (or MRCNN_API_KEY in the function's environment): the key goes as a bearer token,
    and the function gives what it gives against an open server."""
    monkeypatch.delenv("MRCNN_API_KEY", raising=False)
    function = create(url=keyed_server.url, timeout=600.0, api_key=API_KEY)
    image = PIL.Image.open(shapes_image.path)
    shapes = annotate(function, image)
    expected = [d for d in SegmentClient(keyed_server.url, timeout=600, api_key=API_KEY).segment(shapes_image.path)
                if d.label in TASK_LABELS]
    assert len(expected) >= 3
    assert [(s.type.value, s.label_id) for s in shapes] == [("mask", TASK_LABELS[d.label]) for d in expected]
    for shape, detection in zip(shapes, expected, strict=True):
        mask = decode_mask(shape.points, image_width=image.width, image_height=image.height)
        assert iou(mask, detection.mask) >= 0.98
    monkeypatch.setenv("MRCNN_API_KEY", API_KEY)  # kept off the command line
    assert len(annotate(create(url=keyed_server.url, timeout=600.0), image)) == len(shapes)


@pytest.mark.parametrize("api_key", [None, "", "not-the-key"])
def test_against_a_keyed_server_without_the_key_create_says_so(keyed_server, monkeypatch, api_key) -> None:
    monkeypatch.delenv("MRCNN_API_KEY", raising=False)
    with pytest.raises(SegmentError) as refused:
        create(url=keyed_server.url, api_key=api_key)
    assert refused.value.status == 401
    assert refused.value.code == ("invalid_api_key" if api_key else "missing_api_key")
    assert "not-the-key" not in repr(SegmentClient(keyed_server.url, api_key="not-the-key"))
