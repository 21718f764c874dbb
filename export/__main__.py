"""``python -m export --checkpoint PATH --out model.onnx``: one verified, self-describing ONNX graph."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from export.exporter import DEFAULT_OPSET, ExportConfig, ExportError, export_model
from model.backbone import RESNET_DEPTHS
from model.checkpoint import CheckpointError, load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="torchvision state dict or model.train checkpoint")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--arch", choices=sorted(RESNET_DEPTHS), default=None, help="default: the checkpoint's, or r50_fpn")
    p.add_argument("--num-classes", type=int, default=None, help="background included (default: the checkpoint's)")
    p.add_argument("--class-names", type=Path, default=None, help="file with one name a line, background first")
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--nms-threshold", type=float, default=0.5)
    p.add_argument("--detections-per-image", type=int, default=100)
    p.add_argument("--min-size", type=int, default=None, help="default: the checkpoint's, or 800")
    p.add_argument("--max-size", type=int, default=None, help="default: the checkpoint's, or 1333")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--model-name", default=None)
    p.add_argument("--model-version", default="1")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as float16 (compute stays float32)")
    return p.parse_args(argv)


def resolve_class_names(args: argparse.Namespace, ckpt_names: list[str] | None, num_classes: int) -> list[str]:
    if args.class_names is not None:
        names = [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
    elif ckpt_names:
        names = list(ckpt_names)
    elif num_classes == 91:
        names = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    else:
        names = ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    if len(names) != num_classes:
        raise ExportError(f"{len(names)} class names for a model with {num_classes} classes (background included)")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        print(f"load: {args.checkpoint}")
        model, ckpt = load_model(
            args.checkpoint,
            args.arch,
            args.num_classes,
            score_thresh=args.score_threshold,
            nms_thresh=args.nms_threshold,
            detections_per_img=args.detections_per_image,
        )
        arch = args.arch or ckpt.config.get("arch", "r50_fpn")
        num_classes = model.roi_heads.box_predictor.cls_score.out_features
        print(f"  {ckpt.source} checkpoint, {arch}, {num_classes} classes")
        config = ExportConfig(
            arch=arch,
            class_names=resolve_class_names(args, ckpt.class_names, num_classes),
            min_size=args.min_size or int(ckpt.config.get("min_size", 800)),
            max_size=args.max_size or int(ckpt.config.get("max_size", 1333)),
            score_threshold=args.score_threshold,
            nms_threshold=args.nms_threshold,
            detections_per_image=args.detections_per_image,
            opset=args.opset,
            model_name=args.model_name or args.out.stem,
            model_version=args.model_version,
            fp16_weights=args.fp16_weights,
        )
        results = export_model(model, args.out, config)
    except (CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size_mb = args.out.stat().st_size / 2**20
    print(
        f"done: {args.out} ({size_mb:.1f} MiB) in {time.perf_counter() - started:.0f} s; "
        f"inputs images uint8 [B,3,H,W], image_sizes int64 [B,2], score_threshold float32 [B] (optional); "
        f"outputs boxes, scores, labels, masks [B,{config.detections_per_image},28,28], num_detections; "
        f"verified on {len(results)} samples"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
