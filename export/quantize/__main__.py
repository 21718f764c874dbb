"""An exported graph -> a verified int8 one, from the command line.

``python -m export.quantize --model IN.onnx --calibration DIR --out OUT.onnx [--num-images N]``; a bad option
is one ``error:`` line and exit status 2, a failed quantization exit status 1 (commandline.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import onnxruntime as ort

from commandline import (
    ArgumentParser,
    CommandError,
    existing_file,
    existing_folder,
    output_file,
    positive_int,
    run_command,
)
from export.quantize.calibration import DEFAULT_CALIBRATION_IMAGES, DEFAULT_VERIFICATION_IMAGES
from export.quantize.checking import MIN_MASK_IOU, MIN_MATCHED, VERIFY_SCORE_THRESHOLD, VerificationBar
from export.quantize.quantizer import quantize_model
from export.quantize.recipes import DEFAULT_RECIPE, RECIPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m export.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=existing_file, help="a float graph exported by python -m export")
    p.add_argument("--calibration", required=True, type=existing_folder,
                   help="folder of JPEG/PNG images (searched recursively)")
    p.add_argument("--out", required=True, type=output_file)
    p.add_argument("--num-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES, help="calibration images")
    p.add_argument("--num-verify", type=positive_int, default=DEFAULT_VERIFICATION_IMAGES,
                   help="held-out images (the ones after the calibration images) to verify on")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    p.add_argument("--min-matched", type=float, default=MIN_MATCHED,
                   help="share of confident float32 detections the int8 graph must match")
    p.add_argument("--min-mask-iou", type=float, default=MIN_MASK_IOU, help="mean mask IoU of the matched ones")
    p.add_argument("--verify-threshold", type=float, default=VERIFY_SCORE_THRESHOLD,
                   help="float32 detections scoring at least this are compared")
    return p.parse_args(argv)


def quantize(argv: Sequence[str] | None = None) -> int:
    args = parse_args(None if argv is None else list(argv))
    # The quantizer logs advice on every run (pre-processing, which this graph does not need) and its
    # calibration sessions warn that the optional input has a default; keep the CLI's output to its own lines.
    logging.getLogger().setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    started = time.perf_counter()
    bar = VerificationBar(args.min_matched, args.min_mask_iou, args.verify_threshold)
    try:
        agreement = quantize_model(
            args.model, args.calibration, args.out, RECIPES[args.recipe], args.num_images, args.num_verify, bar
        )
    except OSError as exc:
        raise CommandError(str(exc)) from None
    size_mb = args.out.stat().st_size / 2**20
    print(f"done: {args.out} ({size_mb:.1f} MiB, from {args.model.stat().st_size / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - started:.0f} s; {100 * agreement.matched_fraction:.1f}% matched, "
          f"mask IoU {agreement.mask_iou:.4f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command, its errors as one ``error:`` line and an exit status."""
    return run_command(quantize, argv)


if __name__ == "__main__":
    sys.exit(main())
