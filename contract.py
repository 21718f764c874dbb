"""The graph contract: what an exported Mask R-CNN file takes, returns and says about itself, and the
geometry every side of the project agrees on. CONTRACT.md is its prose form.

model/, export/, service/, evaluation/ and benchmarks/ import this module; it imports nothing of
the project and no PyTorch, so the torch-free server and the training code read the same facts from one
place: the graph's input/output names, its metadata keys, format version and defaults, the size
divisibility, the resize policy, batch padding and box rescaling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

import numpy as np

FORMAT_VERSION = "1"
# Inputs: a zero-padded uint8 RGB batch, each image's real (resized) size, and an optional per-image
# score threshold (the file gives it a default, so callers may omit it).
INPUT_NAMES = ("images", "image_sizes", "score_threshold")
# Fixed-size outputs, rows sorted by score and zero past num_detections (like TensorRT's EfficientNMS).
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks", "num_detections")
# Padded heights and widths are multiples of this: the stride of the coarsest FPN level the graph pools.
SIZE_DIVISIBILITY = 32

# Defaults of a model and of its file: the paper's and torchvision's.
DEFAULT_ARCH = "r50_fpn"
COCO_NUM_CLASSES = 91  # torchvision's COCO label space: 80 classes, "N/A" gaps and the background
DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333
DEFAULT_SCORE_THRESHOLD = 0.05
DEFAULT_NMS_THRESHOLD = 0.5
DEFAULT_DETECTIONS_PER_IMAGE = 100

# Metadata keys a file must carry; the others have the defaults above.
REQUIRED_METADATA = ("format_version", "class_names", "mask_size", "min_size", "max_size")


class MetadataError(ValueError):
    """Metadata that is not a graph exported by this project; the message is one readable line."""


@dataclass(frozen=True)
class GraphMetadata:
    """What a file says about itself (ONNX ``metadata_props``, all strings): written by the exporter,
    read by the service, evaluation and benchmarks."""

    model_name: str
    model_version: str
    architecture: str
    class_names: list[str]  # index = label, index 0 = "__background__"
    mask_size: int  # side m of the m x m masks output
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    size_divisibility: int = SIZE_DIVISIBILITY
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_threshold: float = DEFAULT_NMS_THRESHOLD
    detections_per_image: int = DEFAULT_DETECTIONS_PER_IMAGE
    weights: str = "float32"  # or "float16" when the file stores its weights half-size
    verification: str = "unknown"  # how the exporter verified the file (CONTRACT.md), e.g. "float32 noise x4"
    # Empty for a float graph; for an int8 one (python -m export.quantize) a JSON object: the recipe,
    # which node families are int8 and which float, the calibration method and image count.
    quantization: str = ""

    def to_props(self) -> dict[str, str]:
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "architecture": self.architecture,
            "class_names": json.dumps(self.class_names),
            "mask_size": str(self.mask_size),
            "min_size": str(self.min_size),
            "max_size": str(self.max_size),
            "size_divisibility": str(self.size_divisibility),
            "score_threshold": str(self.score_threshold),
            "nms_threshold": str(self.nms_threshold),
            "detections_per_image": str(self.detections_per_image),
            "normalization": "in_graph",
            "weights": self.weights,
            "verification": self.verification,
        } | ({"quantization": self.quantization} if self.quantization else {})

    @classmethod
    def from_props(cls, props: dict[str, str], default_name: str) -> GraphMetadata:
        """Parse and check ``props``; a missing optional key takes its default (``default_name`` for the
        model's name). Raises MetadataError naming what is wrong."""
        missing = [k for k in REQUIRED_METADATA if k not in props]
        if missing:
            raise MetadataError(f"not an exported Mask R-CNN graph (metadata lacks {', '.join(missing)})")
        if props["format_version"] != FORMAT_VERSION:
            raise MetadataError(f"format_version {props['format_version']!r}, this code reads {FORMAT_VERSION!r}")
        try:
            names = json.loads(props["class_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
                raise ValueError("class_names must be a JSON list of at least 2 strings")
            return cls(
                model_name=props.get("model_name", default_name),
                model_version=props.get("model_version", "0"),
                architecture=props.get("architecture", "unknown"),
                class_names=names,
                mask_size=int(props["mask_size"]),
                min_size=int(props["min_size"]),
                max_size=int(props["max_size"]),
                size_divisibility=int(props.get("size_divisibility", SIZE_DIVISIBILITY)),
                score_threshold=float(props.get("score_threshold", DEFAULT_SCORE_THRESHOLD)),
                nms_threshold=float(props.get("nms_threshold", DEFAULT_NMS_THRESHOLD)),
                detections_per_image=int(props.get("detections_per_image", DEFAULT_DETECTIONS_PER_IMAGE)),
                weights=props.get("weights", "float32"),
                verification=props.get("verification", "unknown"),
                quantization=props.get("quantization", ""),
            )
        except ValueError as exc:
            raise MetadataError(f"bad metadata: {exc}") from None


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The resize policy (torchvision's GeneralizedRCNNTransform): the short side to ``min_size`` unless
    the long side would pass ``max_size``; sizes are floored, at least 1."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(int(math.floor(height * scale)), 1), max(int(math.floor(width * scale)), 1)


class Integers(Protocol):
    """What ``padded_size`` computes with: Python ints, or integer arrays and tensors (the model pads a
    batch of sizes at once)."""

    def __neg__(self) -> Self: ...
    def __floordiv__(self, other: int, /) -> Self: ...
    def __mul__(self, other: int, /) -> Self: ...


SizeT = TypeVar("SizeT", bound=Integers)


def padded_size(height: SizeT, width: SizeT, divisibility: int = SIZE_DIVISIBILITY) -> tuple[SizeT, SizeT]:
    """``height`` and ``width`` rounded up to multiples of ``divisibility``."""
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility


def pad_batch(images: Sequence[np.ndarray], divisibility: int = SIZE_DIVISIBILITY) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad CHW uint8 images right/bottom into the graph's ``images`` [B, 3, H, W] (H and W multiples
    of ``divisibility``) and ``image_sizes`` int64 [B, 2] (each image's real height, width)."""
    sizes = np.array([im.shape[1:3] for im in images], dtype=np.int64).reshape(-1, 2)
    tallest, widest = (int(v) for v in sizes.max(axis=0))
    height, width = padded_size(tallest, widest, divisibility)
    batch = np.zeros((len(images), 3, height, width), dtype=np.uint8)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    return batch, sizes


def resize_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Boxes [N, 4] (x1, y1, x2, y2) of an image of ``from_size`` (height, width) in the pixels of the
    same image at ``to_size``: x scaled by the width ratio, y by the height ratio. One function for both
    directions (original -> model input for training targets, model input -> original for results)."""
    # float32 ratios, as torchvision's resize_boxes computes them, so boxes agree to the last bit.
    ratio_h, ratio_w = np.array(to_size, np.float32) / np.array(from_size, np.float32)
    return boxes.astype(np.float32, copy=False) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boxes [N, 4] clipped, in place, to an image of ``size`` (height, width)."""
    height, width = size
    return np.clip(boxes, 0, np.array([width, height, width, height], dtype=boxes.dtype), out=boxes)
