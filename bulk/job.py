"""``python -m bulk SOURCE --out DIR``: the command, from its options to the summary.

SOURCE is a folder, a glob (quoted), a list file or an image, local or a pyarrow URI (sources.py). The
options a ``/segment`` request takes (score threshold, classes, max detections) mean the same here and are
checked by the same code; their defaults and the model are the server's (``MRCNN_*`` variables, see
service/core/settings.py). A rerun with the same ``--out`` does only the images not done yet (records.py);
with another model or other options it is refused rather than mixing two runs' answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from bulk.local import run_local
from bulk.records import (
    FAILURES,
    JOB,
    RESULTS,
    SUMMARY,
    Record,
    ShardWriter,
    read_records,
    write_coco,
    write_json,
)
from bulk.sources import Image, SourceError, list_images
from commandline import ArgumentParser, CommandError, UsageError, output_folder, positive_int, run_command
from service.core.errors import InvalidOption
from service.core.options import Resolved, SegmentOptions, resolve
from service.core.runtime import ModelLoadError, OnnxModel
from service.core.settings import Settings

SHARD_SIZE = 1000  # images per shard file (local) or per Ray Data block: the unit of output files
THREADS = 2  # batches in flight in the local job


def parse_args(argv: Sequence[str] | None, settings: Settings) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bulk", description="Segment every image of a folder, glob or list "
                            "file into COCO results JSON; rerun to finish an interrupted job.")
    parser.add_argument("source", help="folder, glob (quoted), list file (one path or URI a line) or image; "
                        "local or a pyarrow URI (s3://, gs://, ...)")
    parser.add_argument("--out", required=True, type=output_folder, help="folder for the shards and COCO files")
    parser.add_argument("--model", type=Path, default=settings.model_path,
                        help=f"ONNX file (default: MRCNN_MODEL_PATH or {settings.model_path})")
    parser.add_argument("--score-threshold", type=float, help=f"as /segment's (default {settings.score_threshold})")
    parser.add_argument("--classes", help="as /segment's: class names to keep, comma-separated")
    parser.add_argument("--max-detections", type=int, help="as /segment's: at most this many per image")
    parser.add_argument("--batch-size", type=positive_int, default=settings.max_batch_size,
                        help="images per ONNX Runtime call (default: the server's max batch size)")
    parser.add_argument("--threads", type=positive_int, default=THREADS, help="local job: batches in flight")
    parser.add_argument("--shard-size", type=positive_int, default=SHARD_SIZE, help="images per shard file")
    parser.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: auto, or the head's address")
    parser.add_argument("--actors", type=positive_int, help="Ray: ONNX Runtime sessions (default: the cluster's "
                        "CPUs (GPUs with --gpus-per-actor) over what each actor takes)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray: CPUs of each actor")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0,
                        help="Ray: GPUs of each actor (then CUDA first in its ONNX Runtime providers)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def resolved_options(args: argparse.Namespace, settings: Settings, model: OnnxModel) -> Resolved:
    """The command's options checked as /segment checks a request's; only the RLE masks are encoded."""
    given = {"score_threshold": args.score_threshold, "max_detections": args.max_detections,
             "classes": args.classes, "formats": ["rle"]}
    try:
        options = SegmentOptions.validated({k: v for k, v in given.items() if v is not None})
        return resolve(options, settings.score_threshold, model.metadata)
    except InvalidOption as exc:
        option, _, problem = exc.message.partition(":")
        raise UsageError(f"--{option.replace('_', '-')}:{problem}") from None


def job_identity(model: OnnxModel, options: Resolved) -> dict[str, object]:
    """What the shards' answers depend on: the model file and the options."""
    digest = hashlib.sha256(model.path.read_bytes()).hexdigest()
    labels = None if options.labels is None else sorted(options.labels.tolist())
    return {"model": {"name": model.metadata.model_name, "version": model.metadata.model_version, "sha256": digest},
            "options": {"score_threshold": options.score_threshold, "max_detections": options.max_detections,
                        "labels": labels}}


def claim(out: Path, identity: dict[str, object]) -> None:
    """Make ``out`` this job's, or refuse it if its shards were made by another model or other options."""
    job_file = out / JOB
    if job_file.is_file():
        before = json.loads(job_file.read_text())
        if before != identity:
            raise UsageError(f"--out {out}: holds the results of another job ({before}); use another folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(job_file, identity)


def run(argv: Sequence[str] | None = None) -> None:
    settings = Settings()
    args = parse_args(argv, settings)
    try:
        images = list_images(args.source)
    except SourceError as exc:
        raise UsageError(str(exc)) from None
    try:
        model = OnnxModel(args.model, settings.providers, allow_spinning=False)
    except ModelLoadError as exc:
        raise UsageError(f"--model: {exc}") from None
    options = resolved_options(args, settings, model)
    claim(args.out, job_identity(model, options))
    done = read_records(args.out)
    todo = [image for image in images if image.key not in done]
    where = f"Ray ({args.ray})" if args.ray else "this machine"
    print(f"bulk: {len(images)} images, {len(images) - len(todo)} done before, {len(todo)} to segment on {where}",
          file=sys.stderr)
    started = time.perf_counter()
    if args.ray:
        from bulk.on_ray import run_on_ray

        run_on_ray(args, model, todo, options, settings.max_image_pixels)
        say_failures(args.out, todo)  # the actors' failures, one line each, once the job is done
    else:
        segment_here(args, model, todo, options, settings.max_image_pixels)
    seconds = time.perf_counter() - started
    finish(args.out, images, todo, model, seconds)


def segment_here(args: argparse.Namespace, model: OnnxModel, todo: list[Image], options: Resolved,
                 max_pixels: int) -> None:
    """The local job, its records appended to this run's shards as batches finish, failures said one line
    each as they come."""
    writer = ShardWriter(args.out, run_id(), args.shard_size)
    with tqdm(total=len(todo), desc="bulk", unit="img", file=sys.stderr, disable=args.quiet) as bar:

        def on_records(records: list[Record]) -> None:
            writer.write(records)
            for record in records:
                if "error" in record:
                    bar.write(f"failed: {record['path']}: {record['error']}", file=sys.stderr)
            bar.update(len(records))

        try:
            run_local(model, todo, options, max_pixels, args.batch_size, args.threads, on_records)
        finally:
            writer.close()


def say_failures(out: Path, images: list[Image]) -> None:
    done = read_records(out)
    for image in images:
        record = done.get(image.key)
        if record is not None and "error" in record:
            print(f"failed: {image.key}: {record['error']}", file=sys.stderr)


def run_id() -> str:
    """A name for this run's shard files, sortable by start time, unique across machines."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def finish(out: Path, images: list[Image], todo: list[Image], model: OnnxModel, seconds: float) -> None:
    """The COCO files from all the shards, and the summary, printed and written."""
    done = read_records(out)
    missing = [image.key for image in images if image.key not in done]
    if missing:
        raise CommandError(f"{len(missing)} images have no result (first: {missing[0]}); run again to finish")
    summary = write_coco(out, images, done, model.class_names)
    rate = len(todo) / seconds if seconds > 0 else 0.0
    report = {"images": len(images), "segmented": summary.images, "failed": len(summary.failures),
              "detections": summary.detections, "this_run": {"images": len(todo), "seconds": round(seconds, 3),
                                                             "images_per_s": round(rate, 3)}}
    write_json(out / SUMMARY, report)
    print(f"bulk: {len(images)} images: {summary.images} segmented, {len(summary.failures)} failed "
          f"({out / FAILURES}), {summary.detections} detections; this run {len(todo)} images in {seconds:.1f} s, "
          f"{rate:.2f} images/s; results in {out / RESULTS}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bulk``: one ``error:`` line and exit status 2 / 1 / 130 for what goes wrong."""
    return run_command(run, argv)
