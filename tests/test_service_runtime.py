"""Runtime wrapper pieces that need no model file: the resize policy and the metadata checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.runtime import ModelInfo, ModelLoadError, resized_size

torch = pytest.importorskip("torch")
transform = pytest.importorskip("torchvision.models.detection.transform")


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (800, 1333), (333, 2000), (1000, 1000), (50, 71), (7, 3000)])
def test_resize_policy_is_torchvisions(size: tuple[int, int]) -> None:
    h, w = size
    image = torch.zeros(3, h, w)
    resized, _ = transform._resize_image_and_masks(image, 800.0, 1333.0, None)
    assert resized_size(h, w, 800, 1333) == tuple(resized.shape[-2:])


def _meta(**over: str) -> dict[str, str]:
    base = {"format_version": "1", "model_name": "m", "model_version": "3", "architecture": "r18_fpn",
            "class_names": json.dumps(["__background__", "a", "b"]), "mask_size": "28", "min_size": "800",
            "max_size": "1333", "size_divisibility": "32", "detections_per_image": "100"}
    return {**base, **over}


def test_metadata_is_read() -> None:
    info = ModelInfo.from_metadata(_meta(), Path("m.onnx"))
    assert info.class_names == ["__background__", "a", "b"] and info.mask_size == 28
    assert (info.min_size, info.max_size, info.detections_per_image) == (800, 1333, 100)


@pytest.mark.parametrize(
    ("meta", "fragment"),
    [
        ({"format_version": "2"}, "format_version"),
        ({"class_names": "not json"}, "bad metadata"),
        ({"class_names": json.dumps(["only-background"])}, "bad metadata"),
        ({"mask_size": "x"}, "bad metadata"),
    ],
)
def test_metadata_problems_are_one_clear_error(meta: dict[str, str], fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        ModelInfo.from_metadata(_meta(**meta), Path("m.onnx"))
    missing = _meta()
    del missing["min_size"]
    with pytest.raises(ModelLoadError, match="min_size"):
        ModelInfo.from_metadata(missing, Path("m.onnx"))
