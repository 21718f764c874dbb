"""``python -m export --checkpoint PATH --out model.onnx`` or ``python -m export --weights NAME --out model.onnx``
(torchvision's weights, e.g. MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1): one verified, self-describing ONNX graph."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from commandline import (
    ArgumentParser,
    CommandError,
    UsageError,
    existing_file,
    output_file,
    positive_int,
    run_command,
)
from contract import DEFAULT_DETECTIONS_PER_IMAGE, DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD, GraphMetadata
from export.exporter import DEFAULT_OPSET, ExportConfig, ExportError, export_model
from export.verification import DEFAULT_FACTOR
from model.architectures import ARCHITECTURES
from model.checkpoint import CheckpointError, LoadedModel, load_model, load_torchvision_weights, torchvision_weights


def weights_name(text: str) -> str:
    """argparse type: a weights name torchvision knows, refused before anything is loaded."""
    try:
        torchvision_weights(text)
    except CheckpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m export", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing_file, help="torchvision state dict or model.train checkpoint")
    source.add_argument(
        "--weights",
        type=weights_name,
        help="torchvision weights name, e.g. MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 (fetched through "
        "torchvision's weights API into TORCH_HOME, hash-checked; architecture and class names from the weights)",
    )
    p.add_argument("--out", required=True, type=output_file)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None, help="default: the checkpoint's, or r50_fpn")
    p.add_argument("--num-classes", type=int, default=None, help="background included (default: the checkpoint's)")
    p.add_argument("--class-names", type=existing_file, help="file with one name a line, background first")
    p.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    p.add_argument("--nms-threshold", type=float, default=DEFAULT_NMS_THRESHOLD)
    p.add_argument("--detections-per-image", type=positive_int, default=DEFAULT_DETECTIONS_PER_IMAGE)
    p.add_argument("--min-size", type=positive_int, default=None, help="default: the checkpoint's, or 800")
    p.add_argument("--max-size", type=positive_int, default=None, help="default: the checkpoint's, or 1333")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--model-name", default=None, help="default: the output file's stem")
    p.add_argument("--model-version", default="1")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as float16 (compute stays float32)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="FACTOR",
        help=f"let ONNX Runtime be FACTOR x float32's measured noise away from PyTorch (default {DEFAULT_FACTOR:g}); "
        "a warning, recorded in the file's metadata",
    )
    p.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not compare the graph with PyTorch; a warning, recorded in the file's metadata",
    )
    args = p.parse_args(argv)
    if args.tolerance is not None and not args.tolerance > 0:
        p.error("--tolerance must be positive")
    return args


def class_names(args: argparse.Namespace, loaded: LoadedModel) -> list[str]:
    """The checkpoint's class names, or those of ``--class-names`` (which must be as many)."""
    if args.class_names is None:
        return loaded.class_names
    names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
    if len(names) != loaded.num_classes:
        raise UsageError(f"--class-names {args.class_names}: {len(names)} names for a model of {loaded.num_classes} "
                         "classes (background included, first)")
    return names


def graph_metadata(args: argparse.Namespace, loaded: LoadedModel) -> GraphMetadata:
    return GraphMetadata(
        model_name=args.model_name or args.out.stem,
        model_version=args.model_version,
        architecture=loaded.arch,
        class_names=class_names(args, loaded),
        mask_size=loaded.model.roi_heads.mask_size,
        min_size=args.min_size or loaded.min_size,
        max_size=args.max_size or loaded.max_size,
        score_threshold=args.score_threshold,
        nms_threshold=args.nms_threshold,
        detections_per_image=args.detections_per_image,
        weights="float16" if args.fp16_weights else "float32",
    )


def load(args: argparse.Namespace) -> LoadedModel:
    """The model to export. A CheckpointError is the user's for ``--checkpoint`` (not a checkpoint, or not
    the ``--arch`` / ``--num-classes`` asked for: exit 2); for ``--weights``, whose name argparse checked,
    it is mostly the download failing (exit 1)."""
    print(f"load: {args.checkpoint or args.weights}")
    loader = load_model if args.checkpoint else load_torchvision_weights
    try:
        loaded = loader(
            args.checkpoint or args.weights,
            args.arch,
            args.num_classes,
            score_thresh=args.score_threshold,
            nms_thresh=args.nms_threshold,
            detections_per_img=args.detections_per_image,
        )
    except CheckpointError as exc:
        if args.checkpoint:
            raise UsageError(f"--checkpoint: {exc}") from None
        raise CommandError(str(exc)) from None
    print(f"  {loaded.source} checkpoint, {loaded.arch}, {loaded.num_classes} classes")
    return loaded


def run(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    loaded = load(args)
    meta = graph_metadata(args, loaded)
    config = ExportConfig(meta, args.opset, tolerance=args.tolerance, skip_verify=args.skip_verify)
    try:
        export_model(loaded.model, args.out, config)
    except (ExportError, OSError) as exc:
        raise CommandError(str(exc)) from None
    size_mb = args.out.stat().st_size / 2**20
    print(
        f"done: {args.out} ({size_mb:.1f} MiB) in {time.perf_counter() - started:.0f} s; "
        f"inputs images uint8 [B,3,H,W], image_sizes int64 [B,2], score_threshold float32 [B] (optional); "
        f"outputs boxes, scores, labels, masks [B,{meta.detections_per_image},{meta.mask_size},{meta.mask_size}], "
        f"num_detections; verification: {config.verification}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m export``: one ``error:`` line and exit status 2 / 1 for what goes wrong."""
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
