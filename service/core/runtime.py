"""ONNX Runtime wrapper for the exported Mask R-CNN graph (CONTRACT.md). Torch-free.

``OnnxModel(path).predict([rgb_uint8_hwc, ...])`` gives one :class:`Prediction` per image with boxes in
the original image's pixels. The steps are also exposed one by one (``resize`` per image, ``collate``
into a padded batch, ``run`` once, ``split_outputs`` per image) so the server can resize in its worker threads
while the inference thread only pads and runs, and so evaluation code measures exactly what is served.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from contract import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    GraphMetadata,
    MetadataError,
    clip_boxes,
    pad_batch,
    resize_boxes,
    resized_size,
)


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, or not a graph exported by this project."""


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


def resize_by_policy(image: np.ndarray, min_size: int, max_size: int) -> Resized:
    """An RGB uint8 [H, W, 3] image resized by the contract's policy (bilinear, OpenCV) to CHW."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    nh, nw = resized_size(h, w, min_size, max_size)
    out = image if (nh, nw) == (h, w) else cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return Resized(np.ascontiguousarray(out.transpose(2, 0, 1)), (h, w))


def split_outputs(outputs: dict[str, np.ndarray], items: Sequence[Resized]) -> list[Prediction]:
    """The graph's batch outputs as one Prediction per image, boxes mapped back to original pixels."""
    preds = []
    for i, r in enumerate(items):
        n = int(outputs["num_detections"][i])
        boxes = clip_boxes(resize_boxes(outputs["boxes"][i, :n], r.size, r.original_size), r.original_size)
        preds.append(
            Prediction(
                boxes=boxes,
                scores=outputs["scores"][i, :n],
                labels=outputs["labels"][i, :n].astype(np.int64, copy=False),
                masks=outputs["masks"][i, :n],
                image_size=r.original_size,
            )
        )
    return preds


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
        props = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = GraphMetadata.from_props(props, self.path.stem)
        except MetadataError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from None
        self.providers = self.session.get_providers()

    def _check_signature(self) -> None:
        # An input with a default value is listed by ONNX Runtime as an overridable initializer.
        inputs = {i.name for i in self.session.get_inputs()}
        inputs |= {i.name for i in self.session.get_overridable_initializers()}
        outputs = {o.name for o in self.session.get_outputs()}
        if not set(INPUT_NAMES) <= inputs or not set(OUTPUT_NAMES) <= outputs:
            raise ModelLoadError(
                f"{self.path}: not an exported Mask R-CNN graph "
                f"(inputs {sorted(inputs)}, outputs {sorted(outputs)})"
            )

    @property
    def class_names(self) -> list[str]:
        return self.metadata.class_names

    def resize(self, image: np.ndarray) -> Resized:
        """Resize an RGB uint8 [H, W, 3] image by the model's policy (bilinear) to CHW."""
        return resize_by_policy(image, self.metadata.min_size, self.metadata.max_size)

    def collate(self, items: Sequence[Resized]) -> tuple[np.ndarray, np.ndarray]:
        """The graph's ``images`` and ``image_sizes`` for resized images (the contract's padding)."""
        return pad_batch([r.chw for r in items], self.metadata.size_divisibility)

    def run(
        self, images: np.ndarray, image_sizes: np.ndarray, score_thresholds: np.ndarray | float | None = None
    ) -> dict[str, np.ndarray]:
        """One ORT call for the whole batch; ``score_thresholds`` (one, or one per image) or the file's
        default. Detections at or below the threshold are not output."""
        feeds: dict[str, np.ndarray] = {"images": images, "image_sizes": image_sizes.astype(np.int64)}
        if score_thresholds is not None:
            thr = np.broadcast_to(np.asarray(score_thresholds, dtype=np.float32), (len(images),))
            feeds["score_threshold"] = np.ascontiguousarray(thr)
        values = self.session.run(list(OUTPUT_NAMES), feeds)
        return dict(zip(OUTPUT_NAMES, values, strict=True))

    def predict(self, images: Sequence[np.ndarray], score_threshold: float | None = None) -> list[Prediction]:
        """Detections for a list of RGB uint8 [H, W, 3] images in one ORT call.

        ``score_threshold`` None uses the graph's own default; detections at or below it are dropped.
        """
        if not images:
            return []
        items = [self.resize(im) for im in images]
        batch, sizes = self.collate(items)
        return split_outputs(self.run(batch, sizes, score_threshold), items)
