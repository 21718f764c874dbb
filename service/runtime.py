"""ONNX Runtime wrapper for the exported Mask R-CNN graph (CONTRACT.md). Torch-free.

``OnnxModel(path).predict([rgb_uint8_hwc, ...])`` gives one :class:`Prediction` per image with boxes in
the original image's pixels. The steps are also exposed one by one (``resize`` per image, ``collate``
into a padded batch, ``run`` once, ``split`` per image) so the server can resize in its worker threads
while the inference thread only pads and runs, and so evaluation code measures exactly what is served.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

FORMAT_VERSION = "1"
INPUTS = ("images", "image_sizes")
OUTPUTS = ("boxes", "scores", "labels", "masks", "num_detections")
REQUIRED_METADATA = ("format_version", "class_names", "mask_size", "min_size", "max_size")


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, or not a graph exported by this project."""


@dataclass(frozen=True)
class ModelInfo:
    """What the file says about itself (ONNX ``metadata_props``)."""

    name: str
    version: str
    architecture: str
    class_names: list[str]
    mask_size: int
    min_size: int
    max_size: int
    size_divisibility: int
    detections_per_image: int
    score_threshold: float
    nms_threshold: float
    raw: dict[str, str] = field(repr=False)

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> ModelInfo:
        """Parse and check the metadata; any problem is a ModelLoadError naming the file."""
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            lacks = ", ".join(missing)
            raise ModelLoadError(f"{path}: not an exported Mask R-CNN graph (metadata lacks {lacks})")
        if meta["format_version"] != FORMAT_VERSION:
            raise ModelLoadError(
                f"{path}: format_version {meta['format_version']!r}, this server reads {FORMAT_VERSION!r}"
            )
        try:
            names = json.loads(meta["class_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
                raise ValueError("class_names must be a JSON list of at least 2 strings")
            return cls(
                name=meta.get("model_name", path.stem),
                version=meta.get("model_version", "0"),
                architecture=meta.get("architecture", "unknown"),
                class_names=names,
                mask_size=int(meta["mask_size"]),
                min_size=int(meta["min_size"]),
                max_size=int(meta["max_size"]),
                size_divisibility=int(meta.get("size_divisibility", "32")),
                detections_per_image=int(meta.get("detections_per_image", "100")),
                score_threshold=float(meta.get("score_threshold", "0.05")),
                nms_threshold=float(meta.get("nms_threshold", "0.5")),
                raw=dict(meta),
            )
        except ValueError as exc:
            raise ModelLoadError(f"{path}: bad metadata: {exc}") from None


@dataclass(frozen=True)
class Prediction:
    """Detections of one image, rows sorted by score; boxes in the original image's pixels."""

    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int64 [N], index into class_names
    masks: np.ndarray  # float32 [N, M, M] probabilities of each detection's own class
    image_size: tuple[int, int]  # original (height, width)


@dataclass(frozen=True)
class Resized:
    """One image resized by the model's policy, CHW uint8, with the sizes needed to map back."""

    chw: np.ndarray
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.chw.shape[1]), int(self.chw.shape[2])


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """CONTRACT.md resize policy (torchvision's GeneralizedRCNNTransform, floor of the scaled size)."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(int(math.floor(height * scale)), 1), max(int(math.floor(width * scale)), 1)


def _session_options(intra_op_threads: int, inter_op_threads: int, allow_spinning: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if not allow_spinning:  # a server has other threads to run between calls; spinning would starve them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if inter_op_threads:
        opts.inter_op_num_threads = inter_op_threads
    opts.log_severity_level = 3  # ORT warnings about unused initializers etc. are noise for users
    return opts


class OnnxModel:
    """An exported graph in an ONNX Runtime session, checked to be ours at load time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        allow_spinning: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: model file not found")
        wanted = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise ModelLoadError(f"providers {unknown} not available here (available: {available})")
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                _session_options(intra_op_threads, inter_op_threads, allow_spinning),
                providers=wanted,
            )
        except Exception as exc:  # ORT raises several types for unreadable / invalid files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{self.path}: not a loadable ONNX model ({first})") from None
        self._check_signature()
        self.metadata = ModelInfo.from_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.providers = self.session.get_providers()

    def _check_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if not set(INPUTS) <= inputs or not set(OUTPUTS) <= outputs:
            raise ModelLoadError(
                f"{self.path}: not an exported Mask R-CNN graph "
                f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})"
            )
        # An input with a default value is listed by ONNX Runtime as an overridable initializer.
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.has_score_input = "score_threshold" in inputs | overridable

    @property
    def class_names(self) -> list[str]:
        return self.metadata.class_names

    def resize(self, image: np.ndarray) -> Resized:
        """Resize an RGB uint8 [H, W, 3] image by the model's policy (bilinear) to CHW."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        nh, nw = resized_size(h, w, self.metadata.min_size, self.metadata.max_size)
        out = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        return Resized(np.ascontiguousarray(out.transpose(2, 0, 1)), (h, w))

    def collate(self, items: Sequence[Resized]) -> tuple[np.ndarray, np.ndarray]:
        """Zero-pad right/bottom into one [B, 3, H, W] batch, H and W multiples of size_divisibility."""
        div = self.metadata.size_divisibility
        sizes = np.array([r.size for r in items], dtype=np.int64).reshape(-1, 2)
        hmax, wmax = (-(-sizes.max(axis=0) // div) * div).tolist()
        batch = np.zeros((len(items), 3, hmax, wmax), dtype=np.uint8)
        for i, r in enumerate(items):
            batch[i, :, : r.size[0], : r.size[1]] = r.chw
        return batch, sizes

    def run(
        self, images: np.ndarray, image_sizes: np.ndarray, score_thresholds: np.ndarray | float | None = None
    ) -> dict[str, np.ndarray]:
        """One ORT call for the whole batch; per-image score thresholds when the graph takes them."""
        feeds: dict[str, np.ndarray] = {"images": images, "image_sizes": image_sizes.astype(np.int64)}
        if self.has_score_input and score_thresholds is not None:
            thr = np.broadcast_to(np.asarray(score_thresholds, dtype=np.float32), (len(images),))
            feeds["score_threshold"] = np.ascontiguousarray(thr)
        values = self.session.run(list(OUTPUTS), feeds)
        return dict(zip(OUTPUTS, values, strict=True))

    def split(
        self,
        outputs: dict[str, np.ndarray],
        items: Sequence[Resized],
        score_thresholds: np.ndarray | float | None = None,
    ) -> list[Prediction]:
        """Per-image results, boxes mapped back to original pixels (x / (new_w / w), y / (new_h / h)).

        The threshold is re-applied here so that graphs without a ``score_threshold`` input (or with a
        looser default) still honour the request's value.
        """
        given = -np.inf if score_thresholds is None else score_thresholds
        thr = np.broadcast_to(np.asarray(given, dtype=np.float32), (len(items),))
        preds = []
        for i, r in enumerate(items):
            n = int(outputs["num_detections"][i])
            (h, w), (nh, nw) = r.original_size, r.size
            scores = outputs["scores"][i, :n]
            keep = scores > thr[i]
            ratio = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
            boxes = outputs["boxes"][i, :n][keep] / ratio
            np.clip(boxes, 0, np.array([w, h, w, h], dtype=np.float32), out=boxes)
            preds.append(
                Prediction(
                    boxes=boxes.astype(np.float32, copy=False),
                    scores=scores[keep],
                    labels=outputs["labels"][i, :n][keep].astype(np.int64, copy=False),
                    masks=outputs["masks"][i, :n][keep],
                    image_size=(h, w),
                )
            )
        return preds

    def predict(self, images: Sequence[np.ndarray], score_threshold: float | None = None) -> list[Prediction]:
        """Detections for a list of RGB uint8 [H, W, 3] images in one ORT call.

        ``score_threshold`` None uses the graph's own default; detections at or below it are dropped.
        """
        if not images:
            return []
        items = [self.resize(im) for im in images]
        batch, sizes = self.collate(items)
        outputs = self.run(batch, sizes, score_threshold)
        return self.split(outputs, items, score_threshold)
