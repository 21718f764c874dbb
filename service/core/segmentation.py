"""The path from an image file to its encoded masks, step by step, shared by the server and the bulk job.

decode -> resize (``prepare``), pad and run one ONNX Runtime call for a batch (``run_batch``), keep the
detections asked for and paste and encode their masks (``finish``). The server calls the steps where its
batching puts them (decoding in worker threads, the batch in the inference thread); ``segment_batch``
calls them in a row for a list of files, which is all the bulk job needs. Either way an image's answer is
made by the same code, so the bulk job's results equal ``/segment``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.core.errors import ServiceError
from service.core.images import check_size, decode_image
from service.core.options import Resolved
from service.core.postprocess import EncodedMasks, encode_detections, select_detections
from service.core.runtime import OnnxModel, Prediction, Resized, split_outputs

log = logging.getLogger("service")


@dataclass(frozen=True)
class Segmentation:
    """One image's answer: the detections its options keep, and their masks in the formats they ask for."""

    prediction: Prediction
    masks: EncodedMasks | None  # None when the options ask for no mask encoding


def decode(image: bytes | npt.NDArray[np.uint8], max_pixels: int) -> npt.NDArray[np.uint8]:
    """An encoded file or RGB uint8 pixels [H, W, 3], checked against the pixel limit (before decoding) and
    decoded; a ServiceError saying what is wrong with it otherwise."""
    if isinstance(image, np.ndarray):
        check_size(image.shape[1], image.shape[0], max_pixels)
        return image
    return decode_image(image, max_pixels)


def prepare(model: OnnxModel, image: bytes | npt.NDArray[np.uint8], max_pixels: int) -> Resized:
    """``decode``, then resized by the model's policy (tiling resizes each of its windows instead)."""
    return model.resize(decode(image, max_pixels))


def run_batch(model: OnnxModel, images: Sequence[Resized], thresholds: Sequence[float]) -> list[Prediction | Exception]:
    """One ORT call for the batch, split per image. If the batch fails, each image is run alone, so that
    one bad image gets its own error and its neighbours their results."""
    try:
        batch, sizes = model.collate(images)
        return list(split_outputs(model.run(batch, sizes, np.asarray(thresholds, dtype=np.float32)), images))
    except Exception as exc:
        if len(images) == 1:
            log.exception("inference failed")
            return [exc]
        return [run_batch(model, [image], [threshold])[0] for image, threshold in zip(images, thresholds, strict=True)]


def finish(prediction: Prediction, options: Resolved) -> Segmentation:
    """The detections ``options`` keep, with only the mask formats they ask for encoded."""
    kept = select_detections(prediction, options)
    masks = encode_detections(kept, options) if options.rle or options.polygons else None
    return Segmentation(kept, masks)


def segment_batch(
    model: OnnxModel, images: Sequence[bytes], options: Resolved, max_pixels: int
) -> list[Segmentation | Exception]:
    """Each encoded image's answer under ``options``, in one ORT call for those that decode: an image that
    does not decode gets its ServiceError, one whose inference fails its exception, in its place."""
    prepared: dict[int, Resized] = {}
    answers: dict[int, Segmentation | Exception] = {}
    for i, data in enumerate(images):
        try:
            prepared[i] = prepare(model, data, max_pixels)
        except ServiceError as exc:
            answers[i] = exc
    if prepared:
        thresholds = [options.score_threshold] * len(prepared)
        for i, predicted in zip(prepared, run_batch(model, list(prepared.values()), thresholds), strict=True):
            answers[i] = predicted if isinstance(predicted, Exception) else finish(predicted, options)
    return [answers[i] for i in range(len(images))]
