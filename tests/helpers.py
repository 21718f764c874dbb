"""Helpers shared by the test files: the synthetic test scene, mask IoU and hole filling, a free port, the
test server (uvicorn in a thread; tests/conftest.py's ``server`` runs one with the settings below), metric
readings, and the pixel checks of an overlay.

Importable without torch (the service tests run torch-free); the torch helpers import it themselves. The
random-weight helpers (random_images, calibrate_batch_norms) serve benchmarks/export_speed.py too.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import cv2
import numpy as np
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from contract import pad_batch

if TYPE_CHECKING:
    import torch

CIRCLE, RECTANGLE = 1, 2


class Scene(NamedTuple):
    image: np.ndarray  # [H, W, 3] uint8 RGB
    masks: np.ndarray  # [N, H, W] uint8: the pixels of each shape that later shapes leave visible
    labels: np.ndarray  # [N] int64: CIRCLE or RECTANGLE


def scene(seed: int, size: tuple[int, int] = (120, 160)) -> Scene:
    """A distinct synthetic RGB image: coloured background and four filled circles or rectangles, with the
    masks and labels of the shapes that stay visible."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    owner = np.full((h, w), -1)
    labels = []
    for i in range(4):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(8, max(h, w) // 3))
        shape = np.zeros((h, w), np.uint8)
        if rng.random() < 0.5:
            cv2.circle(shape, (x, y), r, 1, -1)
            labels.append(CIRCLE)
        else:
            cv2.rectangle(shape, (x - r, y - r // 2), (x + r, y + r // 2), 1, -1)
            labels.append(RECTANGLE)
        img[shape == 1] = colour
        owner[shape == 1] = i
    masks = (owner[None] == np.arange(4)[:, None, None]).astype(np.uint8)
    visible = masks.any(axis=(1, 2))
    return Scene(img, masks[visible], np.array(labels, np.int64)[visible])


def training_batch(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Scenes as the model's training inputs: the padded uint8 batch, real sizes, and per-image targets."""
    import torch

    images, sizes = model_inputs([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    return images, sizes, [_targets(s) for s in scenes]


def _targets(s: Scene) -> dict[str, torch.Tensor]:
    """A scene's ground truth as training targets: boxes (x1, y1, x2, y2) around the masks, labels, masks."""
    import torch

    from model.data.sample import boxes_from_masks

    return {
        "boxes": torch.from_numpy(boxes_from_masks(s.masks)),
        "labels": torch.from_numpy(s.labels),
        "masks": torch.from_numpy(s.masks),
    }


def model_inputs(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, h, w] -> the model's zero-padded batch and real sizes [B, 2] (the contract's padding)."""
    import torch

    batch, sizes = pad_batch([image.numpy() for image in images])
    return torch.from_numpy(batch), torch.from_numpy(sizes)


def random_images(size: int, seed: int = 99) -> torch.Tensor:
    """Two random ``size`` x ``size`` RGB images, normalized about as ImageNet's statistics would: [2, 3, H, W]."""
    import torch

    return (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) - 0.45) / 0.225


def calibrate_batch_norms(module: torch.nn.Module, images: torch.Tensor) -> None:
    """Give a randomly initialized network's batch norms the statistics of ``images`` (normalized
    [N, 3, H, W]), as a trained network has, for tests and benchmarks with random weights. ``module`` runs
    on them as it is: a ResNet body, or a torchvision backbone with its FPN (whose v2 has batch norms too).

    With torchvision's default running statistics (mean 0, variance 1) activations grow by orders of
    magnitude through the 16 blocks of a ResNet-50; objectness and class scores then saturate into exact
    ties whose order float rounding decides, which measures nothing. Calibrated, activations stay O(10).
    """
    import torch

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of this one batch
            m.reset_running_stats()
    module.train()
    with torch.no_grad():
        module(images)
    module.eval()


# v2's box head normalizes its features, so with random weights every class scores about 1/91 (all
# scores within 0.019-0.022, ties everywhere): its classifier's weights are scaled up so that the best
# scores spread to ~0.08 and tens of detections pass a 0.06 threshold.
CLASSIFIER_GAIN = {"r50_fpn": 1.0, "r50_fpn_v2": 3.0}


def torchvision_model(arch: str, seed: int = 0, calibration: torch.Tensor | None = None, **kwargs) -> torch.nn.Module:
    """torchvision's Mask R-CNN for ``arch`` (``r50_fpn`` or ``r50_fpn_v2``) in eval mode, with random weights
    (``seed``) and batch norms calibrated on ``calibration`` (normalized images; default: two random 320 x 320
    ones); ``kwargs`` go to torchvision's builder."""
    import torch
    from torchvision.models import get_model

    from model.architectures import architecture

    torch.manual_seed(seed)
    builder = architecture(arch).torchvision_builder
    tv = get_model(builder, weights=None, weights_backbone=None, **kwargs).eval()
    calibrate_batch_norms(tv.backbone, random_images(320) if calibration is None else calibration)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(CLASSIFIER_GAIN[arch])
    return tv


def torchvision_detections(tv: torch.nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """torchvision's detections of one uint8 image [3, H, W] as our graph's outputs for a batch of one: rows
    zero-padded to torchvision's detections per image, masks m x m (before torchvision pastes them).

    One departure from torchvision's forward: its backbone reads the image without the padding its
    transform adds. torchvision's forward is not padding-invariant (near a padded edge its convolutions read
    the padding's batch-norm shifts); ours is by design. Its RPN gets the padded batch, so the anchors are
    exactly those torchvision derives for it. For an image that needs no padding nothing departs."""
    import torch

    with torch.no_grad():
        images, _ = tv.transform([image.float() / 255])
        assert images.image_sizes == [tuple(image.shape[1:])]  # at the policy's size already: not resized
        h, w = images.image_sizes[0]
        features = tv.backbone(images.tensors[:, :, :h, :w])
        proposals, _ = tv.rpn(images, features)
        (found,), _ = tv.roi_heads(features, proposals, images.image_sizes)
    d, n = tv.roi_heads.detections_per_img, len(found["boxes"])
    out = {
        "boxes": np.zeros((1, d, 4), np.float32),
        "scores": np.zeros((1, d), np.float32),
        "labels": np.zeros((1, d), np.int64),
        "masks": np.zeros((1, d, *found["masks"].shape[-2:]), np.float32),
        "num_detections": np.array([n]),
    }
    for key in ("boxes", "scores", "labels"):
        out[key][0, :n] = found[key].numpy()
    out["masks"][0, :n] = found["masks"][:, 0].numpy()
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks; two empty masks count as identical."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background pixel that the image border cannot reach (flood fill)."""
    reach = np.ascontiguousarray(np.pad(mask.astype(np.uint8), 1))  # pycocotools decodes in Fortran order
    cv2.floodFill(reach, np.zeros((reach.shape[0] + 2, reach.shape[1] + 2), np.uint8), (0, 0), 2)
    return (reach != 2)[1:-1, 1:-1].astype(np.uint8)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The shared test server's settings (tests/conftest.py's ``server``).
THRESHOLD = 0.05  # random weights give scores of ~0.2-0.3: this keeps all 100 detections
TIMEOUT = 600  # CPU inference of the tiny model takes seconds on a busy 2-core machine
MAX_UPLOAD = 2_000_000
MAX_PIXELS = 4_000_000


def encode(img: np.ndarray, fmt: str = "PNG", **kw: Any) -> bytes:
    """An image file of ``img`` in Pillow's format ``fmt``."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and label set."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(values: dict, name: str, **labels: str) -> float:
    """One sample of ``metric_values``'s result, by its exact label set (0 when absent)."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


class ServerThread:
    """uvicorn running the app in a background thread, on a free loopback port; ``config`` goes to
    uvicorn.Config (``ssl_certfile`` and ``ssl_keyfile`` make it HTTPS)."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.app = app
        self.port = port = free_port()
        scheme = "https" if config.get("ssl_certfile") else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def drawing_zones(boxes: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """bool [H, W]: where an overlay (service/overlay.py's layout) may draw boxes and labels, with a
    margin: a band around each box's edges, and at its top-left corner room for any ``name score`` label
    above or inside the box."""
    from service.overlay import line_and_font_px, pixel_box

    line, font = line_and_font_px(width, height)
    margin = 2 * line + 1
    zones = np.zeros((height, width), bool)
    for box in boxes:
        x0, y0, x1, y1 = pixel_box(box, width, height)
        ring = np.zeros_like(zones)
        ring[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = True
        ring[y0 + margin : max(y0 + margin, y1 - margin), x0 + margin : max(x0 + margin, x1 - margin)] = False
        zones |= ring
        zones[max(0, y0 - 2 * font) : y0 + 2 * font, max(0, x0 - margin) : x0 + 12 * font] = True
    return zones


def assert_overlay(
    pixels: np.ndarray, image: np.ndarray, masks: np.ndarray, colours: Sequence[Sequence[int]],
    alphas: Sequence[int], exclude: np.ndarray | None = None,
) -> None:
    """Check an overlay pixel by pixel (RGB uint8 [H, W, 3] both) outside ``exclude``: a pixel inside
    exactly one of ``masks`` [N, H, W] is service/overlay.py's blend ``(p * (256 - a) + c * a + 128) >> 8``
    of the image's pixel p and the mask's colour c at its alpha a, and most of them visibly changed; a
    pixel in no mask is the image's own. Overlaps are left to the caller."""
    keep = np.ones(image.shape[:2], bool) if exclude is None else ~exclude
    count = masks.sum(axis=0)
    for mask, colour, alpha in zip(masks.astype(bool), colours, alphas, strict=True):
        only = mask & (count == 1) & keep
        assert only.sum() >= min(100, mask.sum()), "too little of a mask is left to check"
        original = image[only].astype(np.int32)
        expected = (original * (256 - alpha) + np.asarray(colour, np.int32) * alpha + 128) >> 8
        assert np.array_equal(pixels[only], expected), "a mask pixel is not the documented blend"
        assert (pixels[only] != image[only]).any(axis=1).mean() >= 0.9, "a mask is not visibly tinted"
    outside = (count == 0) & keep
    assert outside.sum() >= 0.2 * outside.size, "too little of the image is left to check"
    assert np.array_equal(pixels[outside], image[outside]), "a pixel away from every mask was changed"


def assert_found(known_masks: np.ndarray, known_labels: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 min_iou: float = 0.7) -> None:
    """Every known object has a detection of its class whose mask overlaps it by ``min_iou``."""
    for mask, label in zip(known_masks, known_labels, strict=True):
        best = max((iou(mask, m) for m, c in zip(masks, labels, strict=True) if c == label), default=0.0)
        assert best >= min_iou, f"object of class {label} not found (best mask IoU {best:.2f})"


def segment_json(client: Any, png: bytes, **options: str) -> dict:
    """/segment's answer for a PNG, through an HTTP client of the server (the protocols' reference)."""
    r = client.post("/segment", params=options, files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def assert_outputs_are_segment(outputs: dict[str, np.ndarray], body: dict, score_tol: float) -> None:
    """Protocol outputs by name hold exactly /segment's detections: labels and class names, scores within
    ``score_tol``, boxes (rounded to 2 decimals by /segment), the very RLEs and polygons."""
    dets = body["detections"]
    assert len(outputs["scores"]) == len(dets)
    np.testing.assert_allclose(outputs["boxes"], [d["box"] for d in dets], atol=0.006)
    assert outputs["scores"].tolist() == pytest.approx([d["score"] for d in dets], abs=score_tol)
    if "labels" in outputs:
        assert outputs["labels"].tolist() == [d["class_id"] for d in dets]
    if "class_names" in outputs:
        assert outputs["class_names"].tolist() == [d["label"] for d in dets]
    if "masks" in outputs:
        assert [json.loads(v) for v in outputs["masks"]] == [d["mask"] for d in dets]
    if "polygons" in outputs:
        assert [json.loads(v) for v in outputs["polygons"]] == [d["polygons"] for d in dets]
