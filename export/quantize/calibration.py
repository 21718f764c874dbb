"""Calibration input: the images of a folder, split into the ones that calibrate the activation ranges and
the ones held out to verify, fed to ONNX Runtime's calibrator as the graph takes them in service."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

from contract import INPUT_NAMES, GraphMetadata, pad_batch
from export.quantize import QuantizeError
from service.core.runtime import resize_by_policy

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_CALIBRATION_IMAGES = 32
DEFAULT_VERIFICATION_IMAGES = 32


def image_files(folder: Path) -> list[Path]:
    """The JPEG and PNG files under ``folder`` (recursively), in sorted order."""
    if not folder.is_dir():
        raise QuantizeError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise QuantizeError(f"{path}: not a readable image ({exc})") from None


class ImageFeeds(CalibrationDataReader):
    """Calibration inputs, the graph's own: one image per run, resized by the model's own policy and padded
    as the graph takes it (contract.pad_batch), with the file's default score threshold, so every
    activation of the graph, the mask head's included, sees the values it sees in service."""

    def __init__(self, files: Sequence[Path], metadata: GraphMetadata) -> None:
        self.files = iter(files)
        self.metadata = metadata

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self.files, None)
        if path is None:
            return None
        images, sizes = graph_inputs(read_rgb(path), self.metadata)
        threshold = np.array([self.metadata.score_threshold], dtype=np.float32)
        return dict(zip(INPUT_NAMES, (images, sizes, threshold), strict=True))


def graph_inputs(image: np.ndarray, metadata: GraphMetadata) -> tuple[np.ndarray, np.ndarray]:
    resized = resize_by_policy(image, metadata.min_size, metadata.max_size)
    return pad_batch([resized.chw], metadata.size_divisibility)


def split_images(folder: Path, num_calibration: int, num_verification: int) -> tuple[list[Path], list[Path]]:
    """The first ``num_calibration`` images of ``folder`` calibrate; the next ``num_verification`` verify."""
    files = image_files(folder)
    if num_calibration < 1 or num_verification < 1:
        raise QuantizeError("need at least 1 calibration and 1 verification image")
    if len(files) < num_calibration + num_verification:
        raise QuantizeError(
            f"{folder}: {len(files)} JPEG/PNG images, need {num_calibration} for calibration and "
            f"{num_verification} more, held out, for verification"
        )
    return files[:num_calibration], files[num_calibration : num_calibration + num_verification]
