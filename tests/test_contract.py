"""The graph contract (contract.py): resize policy, padding and box rescaling against torchvision, and
the metadata a file must carry, written and read back."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.detection import transform

from contract import GraphMetadata, MetadataError, pad_batch, padded_size, resize_boxes, resized_size

SERVICE_CORE = ("service.core.runtime", "service.core.batcher", "service.core.pipeline", "service.core.postprocess",
                "service.core.images", "service.core.options", "service.core.errors", "service.core.metrics",
                "service.core.settings", "service.core.segmentation", "service.core.tiling", "service.core.stitching",
                "service.core.api_keys", "service.core.tracing")
WEB_FRAMEWORKS = ("fastapi", "starlette")


@pytest.mark.parametrize(
    ("modules", "absent"),
    [
        (("contract",), ("torch", "onnxruntime", "cv2")),
        (("model.data.coco",), ("onnxruntime", "cv2", "service")),
        (SERVICE_CORE, ("torch", *WEB_FRAMEWORKS)),
        (("service.grpc.server",), ("torch", *WEB_FRAMEWORKS)),  # the gRPC door shares oip's model, not its routes
        (("service.app", "service.client", "service.__main__"), ("torch",)),
        # The annotation tools' glue, with the SDKs it loads (label-studio-sdk's parser and converter, cvat-sdk).
        (("service.cvat_function", "service.label_studio.config", "service.label_studio.regions",
          "label_studio_sdk.label_interface", "label_studio_sdk.converter.brush"), ("torch",)),
    ],
)
def test_the_import_graph_keeps_its_layers(modules: tuple[str, ...], absent: tuple[str, ...]) -> None:
    """The contract sits at the bottom (torch-free); the training data loader pulls in neither the service
    nor its runtime; the service's inference core knows no web framework, and nothing in the service loads
    torch. Checked in a fresh interpreter, where nothing else has imported them yet."""
    code = f"import sys, {', '.join(modules)}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_every_service_module_is_in_a_layer_test() -> None:
    """A new module of the core is checked by the test above (SERVICE_CORE lists them all)."""
    core = Path(__file__).resolve().parent.parent / "service" / "core"
    assert {f"service.core.{p.stem}" for p in core.glob("*.py") if p.stem != "__init__"} == set(SERVICE_CORE)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (800, 1333), (333, 2000), (1000, 1000), (50, 71), (7, 3000)])
def test_resize_policy_is_torchvisions(size: tuple[int, int]) -> None:
    h, w = size
    resized, _ = transform._resize_image_and_masks(torch.zeros(3, h, w), 800.0, 1333.0, None)
    assert resized_size(h, w, 800, 1333) == tuple(resized.shape[-2:])


def test_boxes_rescale_as_torchvision_both_ways() -> None:
    boxes = np.random.default_rng(0).uniform(0, 400, (20, 4)).astype(np.float32)
    original, resized = (375, 500), (800, 1066)
    for src, dst in ((original, resized), (resized, original)):
        ours = resize_boxes(boxes, src, dst)
        ref = transform.resize_boxes(torch.from_numpy(boxes), list(src), list(dst)).numpy()
        assert np.array_equal(ours, ref)


def test_batch_padding() -> None:
    images = [np.full((3, 50, 70), 7, np.uint8), np.full((3, 64, 33), 9, np.uint8)]
    batch, sizes = pad_batch(images)
    assert batch.shape == (2, 3, 64, 96) and padded_size(50, 70) == (64, 96)
    assert sizes.tolist() == [[50, 70], [64, 33]] and sizes.dtype == np.int64
    assert (batch[0, :, :50, :70] == 7).all() and batch[0, :, 50:].sum() == 0 and batch[0, :, :, 70:].sum() == 0
    assert (batch[1, :, :, :33] == 9).all() and batch[1, :, :, 33:].sum() == 0


def _metadata() -> GraphMetadata:
    return GraphMetadata(
        "m", "3", "r18_fpn", ["__background__", "a", "b"], mask_size=28, detections_per_image=50,
        verification="float32 noise x4",
    )


def test_metadata_round_trip() -> None:
    props = _metadata().to_props()
    assert all(isinstance(v, str) for v in props.values()) and props["format_version"] == "1"
    assert GraphMetadata.from_props(props, "file-stem") == _metadata()


def test_quantization_entry_only_in_quantized_files() -> None:
    """A float file has no ``quantization`` key (files exported before it existed read the same); an int8
    one carries it and reads it back."""
    assert "quantization" not in _metadata().to_props()
    int8 = dataclasses.replace(_metadata(), quantization='{"recipe": "r"}')
    assert GraphMetadata.from_props(int8.to_props(), "m") == int8


def test_missing_optional_metadata_takes_the_defaults() -> None:
    props = {k: v for k, v in _metadata().to_props().items() if k in ("format_version", "class_names", "mask_size",
                                                                       "min_size", "max_size")}
    meta = GraphMetadata.from_props(props, "file-stem")
    assert (meta.model_name, meta.model_version, meta.detections_per_image, meta.score_threshold) == (
        "file-stem", "0", 100, 0.05)
    assert meta.verification == "unknown"  # a file from before the exporter recorded it


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"format_version": "2"}, "format_version"),
        ({"class_names": "not json"}, "bad metadata"),
        ({"class_names": '["only-background"]'}, "bad metadata"),
        ({"mask_size": "x"}, "bad metadata"),
        ({"min_size": None}, "lacks min_size"),
    ],
)
def test_metadata_problems_are_one_clear_error(change: dict, fragment: str) -> None:
    props = {**_metadata().to_props(), **change}
    props = {k: v for k, v in props.items() if v is not None}
    with pytest.raises(MetadataError, match=fragment):
        GraphMetadata.from_props(props, "m")
