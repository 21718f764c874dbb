"""``python -m export --checkpoint PATH --out model.onnx``: one verified, self-describing ONNX graph."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from contract import DEFAULT_DETECTIONS_PER_IMAGE, DEFAULT_NMS_THRESHOLD, DEFAULT_SCORE_THRESHOLD, GraphMetadata
from export.exporter import DEFAULT_OPSET, ExportConfig, ExportError, export_model
from model.architectures import ARCHITECTURES
from model.checkpoint import CheckpointError, LoadedModel, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="torchvision state dict or model.train checkpoint")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None, help="default: the checkpoint's, or r50_fpn")
    p.add_argument("--num-classes", type=int, default=None, help="background included (default: the checkpoint's)")
    p.add_argument("--class-names", type=Path, default=None, help="file with one name a line, background first")
    p.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    p.add_argument("--nms-threshold", type=float, default=DEFAULT_NMS_THRESHOLD)
    p.add_argument("--detections-per-image", type=int, default=DEFAULT_DETECTIONS_PER_IMAGE)
    p.add_argument("--min-size", type=int, default=None, help="default: the checkpoint's, or 800")
    p.add_argument("--max-size", type=int, default=None, help="default: the checkpoint's, or 1333")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--model-name", default=None, help="default: the output file's stem")
    p.add_argument("--model-version", default="1")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as float16 (compute stays float32)")
    return p.parse_args(argv)


def class_names(args: argparse.Namespace, loaded: LoadedModel) -> list[str]:
    """The checkpoint's class names, or those of ``--class-names`` (which must be as many)."""
    if args.class_names is None:
        return loaded.class_names
    names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
    if len(names) != loaded.num_classes:
        raise ExportError(f"{len(names)} class names for a model of {loaded.num_classes} classes (background included)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        print(f"load: {args.checkpoint}")
        loaded = load_model(
            args.checkpoint,
            args.arch,
            args.num_classes,
            score_thresh=args.score_threshold,
            nms_thresh=args.nms_threshold,
            detections_per_img=args.detections_per_image,
        )
        print(f"  {loaded.source} checkpoint, {loaded.arch}, {loaded.num_classes} classes")
        meta = graph_metadata(args, loaded)
        results = export_model(loaded.model, args.out, ExportConfig(meta, args.opset))
    except (CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_mb = args.out.stat().st_size / 2**20
    print(
        f"done: {args.out} ({size_mb:.1f} MiB) in {time.perf_counter() - started:.0f} s; "
        f"inputs images uint8 [B,3,H,W], image_sizes int64 [B,2], score_threshold float32 [B] (optional); "
        f"outputs boxes, scores, labels, masks [B,{meta.detections_per_image},{meta.mask_size},{meta.mask_size}], "
        f"num_detections; verified on {len(results)} samples"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
