"""The bulk job on a Ray cluster: Ray Data over the list of images still to do, ``map_batches`` with an actor
pool (one ONNX Runtime session per actor, CPU or GPU), the records written through Ray Data into this run's
folder of shards, one JSON Lines file per block: the same records, read back by the same resume rule, as
the local job's.

The model travels in Ray's object store (the workers need not see the driver's disk); the images are read
by the actors, so their paths must be reachable from every node (shared storage or a pyarrow URI). The
workers import this project, which their image or ``runtime_env`` must provide (docs/bulk.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink

from bulk.local import segment_images
from bulk.records import SHARDS, dumps
from bulk.sources import Image
from commandline import UsageError
from service.core.options import Resolved
from service.core.runtime import OnnxModel

if TYPE_CHECKING:
    from ray import ObjectRef

RECORD = "record"  # the one column of the actors' output: each image's shard line


class Segmenter:
    """A Ray Data actor: one ONNX Runtime session, fed batches of image keys, answering their shard lines."""

    def __init__(self, model: list[ObjectRef[bytes]], options: Resolved, max_pixels: int, threads: int,
                 gpu: bool) -> None:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory(prefix="bulk-model-") as folder:  # ORT holds the graph once loaded
            path = Path(folder) / "model.onnx"
            path.write_bytes(ray.get(model[0]))
            self.model = OnnxModel(path, providers, intra_op_threads=threads, allow_spinning=False)
        self.options, self.max_pixels = options, max_pixels

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        images = [Image(str(key), str(name)) for key, name in zip(batch["key"], batch["file_name"], strict=True)]
        records = segment_images(self.model, images, self.options, self.max_pixels)
        return {RECORD: [dumps(record) for record in records]}


class JsonLinesDatasink(BlockBasedFileDatasink):
    """Each block's records as one JSON Lines file, as the local job writes them."""

    def __init__(self, path: str) -> None:
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block: BlockAccessor, file: pa.NativeFile) -> None:
        lines = block.to_arrow().column(RECORD).to_pylist()
        file.write("".join(f"{line}\n" for line in lines).encode())


def actor_count(args: argparse.Namespace) -> int:
    """``--actors``, or as many as the cluster's CPUs (GPUs) hold."""
    if args.actors:
        return int(args.actors)
    resources = ray.cluster_resources()
    if args.gpus_per_actor > 0:
        return max(1, math.floor(resources.get("GPU", 0) / args.gpus_per_actor))
    return max(1, math.floor(resources.get("CPU", 1) / args.cpus_per_actor))


def run_on_ray(args: argparse.Namespace, model: OnnxModel, todo: list[Image], options: Resolved,
               max_pixels: int) -> None:
    """Segment ``todo`` on the cluster at ``args.ray``; the records land in ``OUT/shards/ray-<run>/``."""
    from bulk.job import run_id

    try:
        ray.init(address=args.ray, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise UsageError(f"--ray {args.ray}: {exc}") from None
    try:
        if not todo:
            return
        ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
        model_ref = ray.put(model.path.read_bytes())
        blocks = math.ceil(len(todo) / args.shard_size)
        items = [{"key": image.key, "file_name": image.file_name} for image in todo]
        listed = ray.data.from_items(items, override_num_blocks=blocks)
        segmented = listed.map_batches(
            Segmenter,
            fn_constructor_kwargs={"model": [model_ref], "options": options, "max_pixels": max_pixels,
                                   "threads": max(1, math.floor(args.cpus_per_actor)), "gpu": args.gpus_per_actor > 0},
            batch_size=args.batch_size,
            compute=ActorPoolStrategy(size=actor_count(args)),
            num_cpus=args.cpus_per_actor,
            num_gpus=args.gpus_per_actor,
        )
        segmented.write_datasink(JsonLinesDatasink(os.path.join(str(args.out.absolute()), SHARDS, f"ray-{run_id()}")))
    finally:
        ray.shutdown()
