"""A bulk job's files: one JSON line per image in the shards while it runs, COCO files at the end.

``OUT/shards/**/*.jsonl``: one record per image done, ``{"path", "file_name", "width", "height",
"detections": [{"category_id", "score", "bbox", "segmentation"}]}`` or ``{"path", "file_name", "error"}``.
A line is written whole once its image is done; the local job appends to its own shard files, Ray Data
writes one file per block. A rerun reads every complete line (a line cut by a kill is ignored) and does
only the images no line names: that is the resume rule of both backends. An image in two lines (a Ray
task retried after its node died) is kept once.

At the end, from the records of the source's images: ``results.json`` (COCO results: ``image_id``,
``category_id``, ``bbox`` xywh, ``score``, ``segmentation`` RLE), ``images.json`` (COCO ``images`` and
``categories``, so that pycocotools' ``COCO(images.json).loadRes(results.json)`` and COCOeval take them),
``failures.json`` and ``summary.json``. ``job.json`` pins the model and options the shards were made
with, so that a rerun cannot mix two models' answers.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bulk.sources import Image
from service.core.runtime import Prediction
from service.core.segmentation import Segmentation

SHARDS = "shards"
JOB, RESULTS, IMAGES, FAILURES, SUMMARY = "job.json", "results.json", "images.json", "failures.json", "summary.json"

Record = dict[str, Any]


def detection_records(prediction: Prediction, rles: list[dict[str, object]]) -> list[Record]:
    """COCO results of one image's detections, without the image id (given at the end): the model's class id
    as ``category_id`` (images.json's categories name them), the box as x, y, width, height."""
    rows = zip(prediction.labels.tolist(), prediction.scores.tolist(), prediction.boxes.tolist(), rles, strict=True)
    return [{"category_id": label, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle}
            for label, score, (x0, y0, x1, y1), rle in rows]


def record_of(image: Image, answer: Segmentation | Exception) -> Record:
    """The shard line of one image: its detections, or the reason it failed."""
    if isinstance(answer, Exception):
        return {"path": image.key, "file_name": image.file_name, "error": reason(answer)}
    height, width = answer.prediction.image_size
    rles = answer.masks.rles if answer.masks is not None and answer.masks.rles is not None else []
    return {"path": image.key, "file_name": image.file_name, "width": width, "height": height,
            "detections": detection_records(answer.prediction, rles)}


def reason(exc: Exception) -> str:
    """One line saying why an image failed."""
    return " ".join(str(exc).split()) or type(exc).__name__


def dumps(record: Record) -> str:
    return json.dumps(record, separators=(",", ":"))


def read_records(out: Path) -> dict[str, Record]:
    """Every image done so far, by key: the complete lines of all shards (the first of an image's lines)."""
    done: dict[str, Record] = {}
    for shard in sorted((out / SHARDS).rglob("*.jsonl")):
        for record in _complete_lines(shard):
            done.setdefault(record["path"], record)
    return done


def _complete_lines(shard: Path) -> Iterator[Record]:
    """The records of a shard; a last line cut short by a kill is not one."""
    with open(shard, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "path" in record:
                yield record


class ShardWriter:
    """The local job's shard files under ``OUT/shards``: a new file per run and every ``shard_size`` images,
    each line flushed to the OS as soon as its image is done (a SIGKILL loses no finished image)."""

    def __init__(self, out: Path, run_id: str, shard_size: int) -> None:
        self.folder = out / SHARDS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.run_id, self.shard_size = run_id, shard_size
        self.shard, self.lines = 0, 0
        self.file: IO[str] | None = None

    def write(self, records: Iterable[Record]) -> None:
        for record in records:
            if self.file is None or self.lines == self.shard_size:
                self.close()
                name = f"local-{self.run_id}-{self.shard:05d}.jsonl"
                self.file = open(self.folder / name, "w", encoding="utf-8")  # noqa: SIM115 (kept open across writes)
                self.shard, self.lines = self.shard + 1, 0
            self.file.write(dumps(record) + "\n")
            self.lines += 1
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass(frozen=True)
class Summary:
    images: int
    detections: int
    failures: list[Record]  # {"path", "error"}


def write_coco(out: Path, images: list[Image], done: dict[str, Record], class_names: list[str]) -> Summary:
    """results.json, images.json and failures.json from the records of ``images`` (all done). Image ids are
    the images' positions in the sorted source (1-based), so they do not depend on which run did what."""
    coco_images, results, failures = [], [], []
    for image_id, image in enumerate(images, start=1):
        record = done[image.key]
        if "error" in record:
            failures.append({"path": image.key, "error": record["error"]})
            continue
        coco_images.append({"id": image_id, "file_name": image.file_name, "width": record["width"],
                            "height": record["height"], "path": image.key})
        results += [{"image_id": image_id, **det} for det in record["detections"]]
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names) if label > 0]
    write_json(out / RESULTS, results)
    write_json(out / IMAGES, {"images": coco_images, "categories": categories, "annotations": []})
    write_json(out / FAILURES, failures)
    return Summary(len(coco_images), len(results), failures)


def write_json(path: Path, value: object) -> None:
    """``path`` replaced by ``value`` at once: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
