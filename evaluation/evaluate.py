"""COCO box and mask AP of a model on a COCO-format data set, with pycocotools' COCOeval.

The numbers users compare against papers and other tools come from COCOeval, so this module does not
compute AP itself: it turns model outputs into COCO results (xywh boxes, RLE masks at the original image
size) and hands them to COCOeval. An exported ONNX file and a training checkpoint (PyTorch) go through
the same path, since both take and return the tensors of the graph contract: each image is resized by
the service's own resize, batched by the contract's padding, and its masks are pasted and encoded by
the service's post-processing, so the figures are those of what is served. That is why this package
sits above both model/ and service/.

CLI: ``python -m evaluation --checkpoint model.onnx|ckpt.pt --data DIR [--out results.json] [--limit N]``.
AP is COCOeval's fraction (0-1) in the table, the JSON and the returned report alike. Ctrl-C during the
predictions still evaluates the images done and writes them, marked ``"partial": true``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from bulk.records import detection_records
from commandline import (
    ArgumentParser,
    CommandError,
    Interrupted,
    UsageError,
    existing_file,
    existing_folder,
    output_file,
    positive_int,
    run_command,
)
from contract import DEFAULT_SCORE_THRESHOLD, pad_batch
from model.checkpoint import CheckpointError
from model.data.checks import load_annotation_json
from model.data.coco import CocoDataset, find_annotation_file
from model.files import atomic_path
from service.core.postprocess import encode_masks
from service.core.runtime import ModelLoadError, OnnxModel, Prediction, Resized, resize_by_policy, split_outputs

if TYPE_CHECKING:  # torch only for checkpoints (TorchPredictor); ONNX files need none
    import torch

METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
# COCO evaluation keeps low-scoring detections (AP rewards recall): the graph's own default threshold.
EVAL_SCORE_THRESHOLD = DEFAULT_SCORE_THRESHOLD

def _results_coco(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """A COCO object of results for one IoU type.

    As Detectron2 does, box evaluation drops the masks and mask evaluation drops the boxes: otherwise
    loadRes replaces predicted boxes with the masks' boxes, and mask areas with box areas. An empty
    result list (which loadRes rejects) gives an empty COCO, so "no detections" scores 0, not an error.
    """
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    results = [{k: v for k, v in r.items() if k != drop} for r in results]
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": copy.deepcopy(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def evaluate_predictions(
    coco_gt: COCO, results: list[dict], iou_types: Iterable[str] = IOU_TYPES
) -> dict[str, dict[str, float]]:
    """COCOeval AP / AP50 / AP75 / APs / APm / APl per IoU type ("bbox", "segm").

    `results` is the COCO results format: image_id, category_id, score, bbox [x, y, w, h], and for masks
    `segmentation` as RLE. A metric COCOeval cannot define (e.g. no small objects) is NaN.
    """
    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        coco_dt = _results_coco(coco_gt, results, iou_type)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics[iou_type] = {
            name: float(v) if v >= 0 else math.nan
            for name, v in zip(METRICS, evaluator.stats[: len(METRICS)], strict=True)
        }
    return metrics


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table, one row per IoU type, AP as COCOeval's fraction (0-1, as in the JSON):
    the corner cell says so, since papers print the same figures in percent."""
    lines = [f"{'(0-1)':6}" + "".join(f"{m:>8}" for m in METRICS)]
    for iou_type, row in metrics.items():
        lines.append(f"{iou_type:6}" + "".join(f"{row[m]:8.4f}" for m in METRICS))
    return "\n".join(lines)


def label_to_category(model_names: list[str], coco_gt: COCO) -> dict[int, int]:
    """Map model labels to the data set's category ids.

    By name when one name set contains the other: a model trained on these data, or a model with more
    classes such as torchvision's 91-entry COCO list with its "N/A" gaps (labels whose name the data
    lack are dropped). Otherwise by position (label i -> i-th category id in sorted order), which needs
    as many classes as categories.
    """
    by_name = {c["name"]: c["id"] for c in coco_gt.dataset.get("categories", [])}
    names = model_names[1:]
    if names and (set(names) <= set(by_name) or set(by_name) <= set(names)):
        return {i + 1: by_name[n] for i, n in enumerate(names) if n in by_name}
    cat_ids = sorted(coco_gt.getCatIds())
    if len(cat_ids) != len(names):
        raise ValueError(
            f"model classes {names} match neither the names nor the number of the data's categories {sorted(by_name)}"
        )
    return {i + 1: c for i, c in enumerate(cat_ids)}


def to_coco_results(pred: Prediction, image_id: int, cat_of_label: dict[int, int]) -> list[dict]:
    """COCO results of one image's detections (boxes already in original pixels), masks pasted and
    RLE-encoded at the original size by the service's own post-processing, so AP measures what is served."""
    rles = encode_masks(pred.masks, pred.boxes, pred.image_size, rle=True, polygons=False).rles or []
    return [{"image_id": int(image_id), **det, "category_id": cat_of_label[det["category_id"]]}
            for det in detection_records(pred, rles) if det["category_id"] in cat_of_label]


class OnnxPredictor:
    """An exported graph run through the service's ONNX Runtime wrapper (same session checks, metadata
    and inputs as serving); class names and the size policy come from the file's metadata."""

    def __init__(self, path: str | os.PathLike, score_threshold: float | None = EVAL_SCORE_THRESHOLD) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.model = OnnxModel(path, providers=providers)
        self.class_names: list[str] = list(self.model.class_names)
        self.min_size, self.max_size = self.model.metadata.min_size, self.model.metadata.max_size
        self.score_threshold = score_threshold

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.run(images, image_sizes, self.score_threshold)


class TorchPredictor:
    """A PyTorch model in eval mode with its class names and size policy: loaded from a checkpoint (a
    model.train checkpoint, or torchvision's state dict) by model.checkpoint as the exporter loads it, or a
    model in training (model.train's periodic evaluation)."""

    def __init__(
        self,
        model,  # model.mask_rcnn.MaskRCNN, in eval mode
        class_names: list[str],
        min_size: int,
        max_size: int,
        device: str | torch.device = "cpu",
        score_threshold: float | None = EVAL_SCORE_THRESHOLD,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.class_names: list[str] = list(class_names)
        self.min_size, self.max_size = min_size, max_size
        self.score_threshold = score_threshold

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str = "cpu", score_threshold: float | None = EVAL_SCORE_THRESHOLD
    ) -> TorchPredictor:
        from model.checkpoint import load_model

        loaded = load_model(Path(path))
        return cls(loaded.model, loaded.class_names, loaded.min_size, loaded.max_size, device, score_threshold)

    def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        thr = None
        if self.score_threshold is not None:
            thr = torch.full((len(images),), self.score_threshold, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            out = self.model(
                torch.from_numpy(images).to(self.device),
                torch.from_numpy(image_sizes).to(self.device),
                score_threshold=thr,
            )
        return {k: v.cpu().numpy() for k, v in out.items()}


def load_predictor(
    checkpoint: str | os.PathLike, device: str = "cpu", score_threshold: float | None = EVAL_SCORE_THRESHOLD
) -> OnnxPredictor | TorchPredictor:
    """ONNX Runtime for .onnx files, PyTorch for anything else (a model.train checkpoint)."""
    if str(checkpoint).endswith(".onnx"):
        return OnnxPredictor(checkpoint, score_threshold)
    return TorchPredictor.from_checkpoint(checkpoint, device, score_threshold)


@dataclass
class Predicted:
    """The images predicted so far and their COCO results: what Ctrl-C leaves to evaluate."""

    image_ids: list[int] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)


class PartialEvaluation(KeyboardInterrupt):
    """Ctrl-C while predicting: ``report`` scores the images done (``"partial": true``), ``planned`` is how
    many were asked for. A KeyboardInterrupt still, for callers that do not look at it."""

    def __init__(self, report: dict, planned: int) -> None:
        super().__init__(f"interrupted after {report['num_images']} of {planned} images")
        self.report, self.planned = report, planned


def read_image(dataset: CocoDataset, image_id: int) -> np.ndarray:
    """The image, or CommandError naming its file: a data set that breaks mid-run fails the run (exit 1)."""
    try:
        return dataset.read_image(image_id)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None


def predict_dataset(
    predictor: OnnxPredictor | TorchPredictor,
    dataset: CocoDataset,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
    into: Predicted | None = None,
) -> list[dict]:
    """Run the predictor over a CocoDataset as the service would (its resize, the contract's padding, boxes
    mapped back to original pixels); COCO results for all images. ``progress`` shows a bar in images
    (rate, ETA) on stderr; ``into`` collects image ids and results batch by batch, so that an interrupted
    run keeps what it did."""
    cat_of_label = label_to_category(predictor.class_names, dataset.coco)
    ids = dataset.image_ids[:limit]
    into = into if into is not None else Predicted()
    with tqdm(total=len(ids), desc="evaluate", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start : start + batch_size]
            items: list[Resized] = [
                resize_by_policy(read_image(dataset, i), predictor.min_size, predictor.max_size) for i in batch_ids
            ]
            images, sizes = pad_batch([r.chw for r in items])
            for image_id, pred in zip(batch_ids, split_outputs(predictor(images, sizes), items), strict=True):
                into.results += to_coco_results(pred, image_id, cat_of_label)
            into.image_ids += batch_ids
            bar.update(len(batch_ids))
    return into.results


def evaluate_predictor(
    predictor: OnnxPredictor | TorchPredictor,
    dataset: CocoDataset,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """COCO AP of a predictor on the first ``limit`` images of a data set (all by default). Ctrl-C while
    predicting raises PartialEvaluation with the report of the images done."""
    predicted = Predicted()
    try:
        predict_dataset(predictor, dataset, batch_size, limit, progress, into=predicted)
    except KeyboardInterrupt:
        if not predicted.image_ids:
            raise
        planned = len(dataset.image_ids[:limit])
        raise PartialEvaluation(score(predictor, dataset, predicted, partial=True), planned) from None
    return score(predictor, dataset, predicted, partial=False)


def score(predictor: OnnxPredictor | TorchPredictor, dataset: CocoDataset, predicted: Predicted, partial: bool) -> dict:
    """The JSON-ready report of ``predicted``, scored against the ground truth of its images only."""
    coco_gt = dataset.coco
    if len(predicted.image_ids) < len(dataset.image_ids):  # --limit, or interrupted
        coco_gt = subset_coco(coco_gt, predicted.image_ids)
    return {
        "num_images": len(coco_gt.getImgIds()),
        "num_detections": len(predicted.results),
        "partial": partial,
        "min_size": predictor.min_size,
        "max_size": predictor.max_size,
        "score_threshold": predictor.score_threshold,
        "metrics": evaluate_predictions(coco_gt, predicted.results),
    }


def open_dataset(data: str | os.PathLike) -> CocoDataset:
    """The COCO folder ``data``, or UsageError saying why it is not one (model.data's messages: what was
    expected, which file)."""
    root = Path(data)
    try:
        ann_file = find_annotation_file(root)
        return CocoDataset(root, ann_file, data=load_annotation_json(ann_file))
    except (OSError, ValueError) as exc:  # DataError is a ValueError
        raise UsageError(f"--data: {exc}") from None


def open_predictor(
    checkpoint: str | os.PathLike, device: str, score_threshold: float | None, dataset: CocoDataset
) -> OnnxPredictor | TorchPredictor:
    """The model of ``checkpoint``, or UsageError saying why it cannot be evaluated on ``dataset``: refused
    before the first image rather than after."""
    try:
        predictor = load_predictor(checkpoint, device, score_threshold)
    except (CheckpointError, ModelLoadError) as exc:
        raise UsageError(f"--checkpoint: {exc}") from None
    try:
        label_to_category(predictor.class_names, dataset.coco)
    except ValueError as exc:
        raise UsageError(f"--checkpoint {checkpoint}: {exc}") from None
    return predictor


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    batch_size: int = 1,
    device: str = "cpu",
    limit: int | None = None,
    score_threshold: float | None = EVAL_SCORE_THRESHOLD,
    progress: bool = True,
) -> dict:
    """Evaluate an ONNX file or training checkpoint on a COCO folder; returns a JSON-ready report.
    UsageError when either cannot be used; PartialEvaluation on Ctrl-C while predicting."""
    dataset = open_dataset(data)
    predictor = open_predictor(checkpoint, device, score_threshold, dataset)
    origin = {"checkpoint": str(checkpoint), "data": str(data)}
    try:
        return origin | evaluate_predictor(predictor, dataset, batch_size, limit, progress)
    except PartialEvaluation as exc:
        exc.report = origin | exc.report
        raise


def subset_coco(coco_gt: COCO, image_ids: list[int]) -> COCO:
    """A ground-truth COCO restricted to some images (for --limit, or an interrupted run)."""
    keep = set(image_ids)
    sub = COCO()
    sub.dataset = {
        **coco_gt.dataset,
        "images": [i for i in coco_gt.dataset["images"] if i["id"] in keep],
        "annotations": [a for a in coco_gt.dataset["annotations"] if a["image_id"] in keep],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


def _json_safe(obj):
    """NaN is not JSON: write null for metrics COCOeval could not define."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m evaluation", description="COCO box and mask AP (0-1) of an ONNX file "
                            "or a checkpoint; Ctrl-C evaluates and writes the images done, marked partial.")
    parser.add_argument("--checkpoint", required=True, type=existing_file,
                        help="model .onnx file or model.train checkpoint")
    parser.add_argument("--data", required=True, type=existing_folder,
                        help="COCO folder: an images folder plus an instances JSON")
    parser.add_argument("--out", type=output_file, help="write the report as JSON here")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--device", default="cpu", help="for PyTorch checkpoints: cpu or cuda")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate only the first N images (by image id): a quick look before a full run")
    parser.add_argument("--score-threshold", type=float, default=EVAL_SCORE_THRESHOLD)
    return parser.parse_args(argv)


def show(report: dict, out: Path | None, planned: int | None = None) -> None:
    """Print the report's table, and write it as JSON to ``out``; a partial one says so first."""
    images, partial = f"{report['num_images']} images", ""
    if report["partial"]:
        images, partial = f"{report['num_images']} of {planned} images", "PARTIAL (interrupted): "
    print(f"{partial}COCO AP of {report['checkpoint']} on {images}, {report['num_detections']} detections")
    print(format_table(report["metrics"]))
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(_json_safe(report), indent=2))


def run(argv: Sequence[str] | None = None) -> None:
    """Evaluate as the command line asks; Ctrl-C shows and writes the images done, then exits 130."""
    args = parse_args(argv)
    try:
        report = evaluate_checkpoint(
            args.checkpoint, args.data, args.batch_size, args.device, args.limit, args.score_threshold
        )
    except PartialEvaluation as exc:
        show(exc.report, args.out, exc.planned)
        kept = f"; partial results in {args.out}" if args.out else ""
        raise Interrupted(f"{exc}{kept}") from None
    show(report, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation``: one ``error:`` line and exit status 2 / 1 / 130 for what goes wrong."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
