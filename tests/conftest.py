"""Shared fixtures: tiny models with random weights (fixed seeds), exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHAPE_CLASSES = ["__background__", "circle", "square", "triangle", "star"]
# The slim R-18-FPN of the bundled model, with fewer proposals: cheap enough for every test to run it.
TINY_MODEL = {
    "width": 32,
    "fpn_channels": 128,
    "representation_size": 256,
    "mask_channels": 128,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 150,
}
# The paper's other architectures, slim (a stem of 16 channels instead of 64, narrow heads) and with few
# proposals: their layouts (ResNeXt's 33 grouped bottlenecks, C4's res5 per RoI) at a cost tests can pay.
SLIM_MODELS = {
    "r50_c4": {"width": 16, "mask_channels": 32, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100},
    "x101_fpn": {
        "width": 16,
        "fpn_channels": 64,
        "representation_size": 64,
        "mask_channels": 32,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
    },
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A model.train-style checkpoint of a slim R-18-FPN with random weights (seed 0) and the 4 shape classes."""
    import torch

    from model import build_model

    torch.manual_seed(0)
    model = build_model("r18_fpn", len(SHAPE_CLASSES), **TINY_MODEL)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    config = {
        "arch": "r18_fpn",
        "num_classes": len(SHAPE_CLASSES),
        "min_size": 320,
        "max_size": 512,
        "model": TINY_MODEL,
    }
    torch.save({"model": model.state_dict(), "config": config, "class_names": SHAPE_CLASSES}, path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx_model(tiny_checkpoint, tmp_path_factory) -> Path:
    """``tiny_checkpoint`` exported with the project's exporter (and so verified against PyTorch)."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("tiny_onnx") / "tiny.onnx"
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--model-name", "tiny"]) == 0
    return out
