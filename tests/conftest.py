"""Shared fixtures: tiny models with random weights (fixed seeds), exported once per test session (once for all
xdist workers: the first makes it, the others wait and read it), and one real server on loopback serving the
exported one (tests/test_service.py, test_v2_protocol.py, test_fuzz.py); the bundled demo model served on
loopback, and a shapes image with known objects for it to find."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.helpers import MAX_PIXELS, MAX_UPLOAD, THRESHOLD, TIMEOUT, ServerThread, free_port

# The gRPC door's default port is fixed (8001): test servers, in this process and in the subprocesses it starts,
# serve no gRPC unless a test gives them a free port (tests/test_grpc.py), so that parallel runs never collide.
os.environ.setdefault("MRCNN_GRPC_PORT", "0")

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


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The file ``name``, made by ``make(path)`` once per test run: under pytest-xdist every worker has its
    own session, so the first to get here makes it in the run's shared temporary folder (written to a
    temporary name, then renamed) while the others wait on the lock and reuse it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: the run's, above the worker's
    path = shared / name
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            partial = path.with_name(f"partial.{name}")
            make(partial)
            partial.rename(path)
    return path


def _save_tiny_checkpoint(path: Path) -> None:
    import torch

    from model import build_model

    torch.manual_seed(0)
    model = build_model("r18_fpn", len(SHAPE_CLASSES), **TINY_MODEL)
    config = {
        "arch": "r18_fpn",
        "num_classes": len(SHAPE_CLASSES),
        "min_size": 320,
        "max_size": 512,
        "model": TINY_MODEL,
    }
    torch.save({"model": model.state_dict(), "config": config, "class_names": SHAPE_CLASSES}, path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A model.train-style checkpoint of a slim R-18-FPN with random weights (seed 0) and the 4 shape classes."""
    return made_once(tmp_path_factory, "tiny.pt", _save_tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx_model(tiny_checkpoint, tmp_path_factory) -> Path:
    """``tiny_checkpoint`` exported with the project's exporter (and so verified against PyTorch)."""
    from export.__main__ import main

    def export(out: Path) -> None:
        assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--model-name", "tiny"]) == 0

    return made_once(tmp_path_factory, "tiny.onnx", export)


@pytest.fixture(scope="session")
def model(tiny_onnx_model: Path):  # -> service.runtime.OnnxModel
    """The tiny exported model in a session of its own: what each image gives alone."""
    from service.core.runtime import OnnxModel

    return OnnxModel(tiny_onnx_model, intra_op_threads=1)


@pytest.fixture(scope="session")
def server(tiny_onnx_model: Path) -> Iterator[ServerThread]:
    """The service (service.app.create_app) serving the tiny exported model, on a loopback port, and its gRPC
    door at ``server.grpc_target``; its pipeline is ``server.pipeline``. Batches of up to 8 wait up to 150 ms
    for company."""
    from service.app import create_app
    from service.core.settings import Settings

    settings = Settings(
        model_path=tiny_onnx_model, max_batch_size=8, max_batch_wait_ms=150, queue_capacity=16,
        max_upload_bytes=MAX_UPLOAD, max_image_pixels=MAX_PIXELS, score_threshold=THRESHOLD,
        worker_threads=2, request_timeout_s=TIMEOUT, grpc_port=free_port(),
    )
    app = create_app(settings)
    with ServerThread(app) as srv:
        srv.pipeline = app.state.pipeline
        srv.grpc_target = f"127.0.0.1:{settings.grpc_port}"
        yield srv


@pytest.fixture(scope="session")
def name(model) -> str:
    """The tiny model's name, as the protocols' routes and calls take it."""
    return model.metadata.model_name


@pytest.fixture
def client(server: ServerThread):  # -> httpx.Client
    """An HTTP client of ``server``."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=TIMEOUT, trust_env=False) as c:
        yield c


DEMO_MAX_UPLOAD = 3_000_000  # bytes: room for the shapes PNGs, small enough for a cheap 413
# model/data/shapes.py generate(7, 2): 363 x 364, five objects of all four classes, every one found by the
# demo model (mask IoU >= 0.77) with a score above 0.97, and seven more detections scoring below 0.2.
SHAPES_SEED, SHAPES_INDEX = 7, 2


class KnownImage(NamedTuple):
    path: Path  # the PNG
    image: np.ndarray  # [H, W, 3] uint8 RGB
    masks: np.ndarray  # [N, H, W] uint8 visible pixels of each object
    labels: np.ndarray  # [N] class ids 1..4


@pytest.fixture(scope="session")
def demo_server() -> Iterator:
    """The bundled demo model (models/demo/model.onnx) served by the real app on a loopback port."""
    from service.app import create_app
    from service.core.settings import DEFAULT_MODEL_PATH, Settings

    settings = Settings(model_path=DEFAULT_MODEL_PATH, max_upload_bytes=DEMO_MAX_UPLOAD, request_timeout_s=600)
    with ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="session")
def shapes_image(tmp_path_factory) -> KnownImage:
    """A synthetic shapes image whose objects the demo model finds, written as PNG."""
    from PIL import Image

    from model.data.shapes import generate

    sample = generate(SHAPES_SEED, SHAPES_INDEX)
    path = tmp_path_factory.mktemp("shapes") / "shapes.png"
    Image.fromarray(sample.image).save(path)
    return KnownImage(path, sample.image, sample.masks, sample.labels)
