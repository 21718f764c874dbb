"""Check a COCO-format data set before training starts, not hours into a run.

One pass over the annotation file, reading no more of each image than its header: every problem becomes one
line that names the image file, the image id and the annotation id, so a team can fix its export instead
of reading a DataLoader worker's traceback. pycocotools' index silently keeps the last of duplicate ids
and turns a 4-number polygon into a box, so the checks read the JSON's own lists.

Orientation policy (the same in training, evaluation and serving): EXIF orientation is applied, as the
server does, as phones, browsers and annotation tools show a photo. The JSON's width and height must be
those of the image as shown; a photo whose JSON size matches only its stored, unrotated pixels is reported.

With ``errors="skip"`` the bad annotations and images are left out and counted per kind. Images whose
annotations are all crowd regions are dropped (they would train as pure background), as torchvision's
and Detectron2's loaders do; images without any annotation are kept as negatives unless asked otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

ERROR_POLICIES = ("stop", "skip")
EMPTY_IMAGE_POLICIES = ("keep", "drop")
BOX_TOLERANCE = 1.0  # pixels a box may pass the image's border by (rounding in annotation tools)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class DataError(ValueError):
    """The data set cannot be trained on as it is; the message says how many problems and what to do,
    ``problems`` lists them."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class Problem:
    """One problem in the data set, located by image file, image id and annotation id."""

    kind: str
    detail: str
    file_name: str | None = None
    image_id: int | None = None
    annotation_id: int | None = None

    def line(self) -> str:
        where = [f"image {self.image_id}" if self.image_id is not None else None]
        where.append(f"annotation {self.annotation_id}" if self.annotation_id is not None else None)
        place = ", ".join(w for w in where if w)
        return f"{self.file_name or '-'} ({place or 'data set'}): {self.kind}: {self.detail}"


@dataclass
class DataReport:
    """What the check found, and the data set without what it found wrong (``clean``)."""

    problems: list[Problem]
    clean: dict
    crowd_only_images: int = 0
    empty_images: int = 0
    dropped_empty_images: int = 0
    image_ids: list[int] = field(default_factory=list)  # the images to train on, sorted

    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        """One line: images used, problems per kind, images dropped by rule."""
        parts = [f"{len(self.image_ids)} images used"]
        parts += [f"{n} {kind}" for kind, n in sorted(self.counts().items())]
        if self.crowd_only_images:
            parts.append(f"{self.crowd_only_images} crowd-only images dropped")
        if self.dropped_empty_images:
            parts.append(f"{self.dropped_empty_images} images without annotations dropped")
        elif self.empty_images:
            parts.append(f"{self.empty_images} images without annotations kept as negatives")
        return "data check: " + ", ".join(parts)


def load_annotation_json(path: Path) -> dict:
    """The annotation file as a dict with images/annotations/categories lists, or DataError in one line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if not isinstance(data, dict) or missing:
        raise DataError(f"{path}: not a COCO instances file (no list {', '.join(missing) or 'at the top'})")
    return data


def shown_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as shown, EXIF orientation applied, from its header alone."""
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
            return height, width
        return width, height


def check_dataset(data: dict, images_dir: Path, errors: str = "stop", empty_images: str = "keep") -> DataReport:
    """Check ``data`` (a COCO instances dict) against the images in ``images_dir``.

    ``errors="stop"`` raises DataError after listing every problem; ``"skip"`` returns a report whose
    ``clean`` data set lacks the bad annotations and images. Either way crowd-only images are dropped, and
    images without annotations are kept or dropped by ``empty_images``.
    """
    if errors not in ERROR_POLICIES or empty_images not in EMPTY_IMAGE_POLICIES:
        raise ValueError(f"errors must be one of {ERROR_POLICIES}, empty_images one of {EMPTY_IMAGE_POLICIES}")
    problems: list[Problem] = []
    categories = _unique(data["categories"], "category", problems, lambda c: None)
    images = _unique(data["images"], "image", problems, lambda i: i.get("file_name"))
    bad_images = {i for i, info in images.items() if _image_problems(info, images_dir, problems)}
    annotations = []
    seen: set[int] = set()
    for ann in data["annotations"]:
        info = images.get(ann.get("image_id"))
        found = list(_annotation_problems(ann, info, categories, seen))
        problems += found
        seen.add(ann.get("id"))
        if not found and ann.get("image_id") not in bad_images:
            annotations.append(ann)
    report = DataReport(problems, clean={**data, "categories": list(categories.values())})
    if problems and errors == "stop":
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts().items()))
        message = f"{len(problems)} problems in the data ({counts}): fix them, or set data_errors: skip"
        raise DataError(message, problems)
    kept_images = [info for i, info in images.items() if i not in bad_images]
    report.clean.update(images=kept_images, annotations=annotations)
    _select_images(report, empty_images)
    return report


def _unique(items: list, what: str, problems: list[Problem], file_of) -> dict:
    """Items by id; a second item with an id already seen is a problem and left out."""
    by_id: dict = {}
    for item in items:
        key = item.get("id") if isinstance(item, dict) else None
        if key is None or key in by_id:
            kind = f"duplicate {what} id" if key is not None else f"{what} without id"
            problems.append(Problem(kind, f"{what} id {key} appears more than once" if key is not None else
                                    f"{what} entry has no id", file_of(item) if isinstance(item, dict) else None,
                                    key if what == "image" else None))
            continue
        by_id[key] = item
    return by_id


def _image_problems(info: dict, images_dir: Path, problems: list[Problem]) -> bool:
    """Record what is wrong with one image entry (missing file, unreadable header, size); True if anything."""
    name, image_id = info.get("file_name"), info.get("id")

    def report(kind: str, detail: str) -> bool:
        problems.append(Problem(kind, detail, name, image_id))
        return True

    if not name or not isinstance(info.get("width"), int) or not isinstance(info.get("height"), int):
        return report("bad image entry", "needs file_name, and width and height as integers")
    path = images_dir / name
    if not path.is_file():
        return report("missing image", f"no file {path}")
    try:
        width, height = shown_size(path)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return report("unreadable image", f"{path}: {exc}")
    if (width, height) != (info["width"], info["height"]):
        unrotated = (height, width) == (info["width"], info["height"])
        stored = "; the JSON has its stored, unrotated size" if unrotated else ""
        return report(
            "image size mismatch",
            f"the image is {width}x{height} (EXIF orientation applied), the JSON says {info['width']}x{info['height']}"
            f"{stored}",
        )
    return False


def _annotation_problems(ann: dict, info: dict | None, categories: dict, seen: set) -> Iterator[Problem]:
    """The problems of one annotation; geometry is checked only on a known image."""
    ann_id = ann.get("id")

    def problem(kind: str, detail: str) -> Problem:
        name = info.get("file_name") if info else None
        return Problem(kind, detail, name, ann.get("image_id"), ann_id)

    if ann_id is None:
        yield problem("annotation without id", "every annotation needs an id")
    elif ann_id in seen:
        yield problem("duplicate annotation id", f"annotation id {ann_id} appears more than once")
    if ann.get("category_id") not in categories:
        yield problem("unknown category", f"category_id {ann.get('category_id')} is not in categories")
    if info is None:
        yield problem("unknown image", f"image_id {ann.get('image_id')} is not in images")
        return
    if ann.get("iscrowd", 0):
        return  # crowd regions are not trained on (COCOeval ignores them), whatever their geometry
    yield from _box_problems(ann.get("bbox"), info, problem)
    yield from _segmentation_problems(ann.get("segmentation"), info, problem)


def _box_problems(bbox, info: dict, problem) -> Iterator[Problem]:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        yield problem("bad box", f"bbox must be [x, y, width, height], got {bbox!r}")
        return
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        yield problem("bad box", f"bbox {bbox} has no area")
    elif x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > info["width"] + BOX_TOLERANCE or (
        y + h > info["height"] + BOX_TOLERANCE
    ):
        yield problem("box outside image", f"bbox {bbox} leaves the {info['width']}x{info['height']} image")


def _segmentation_problems(segm, info: dict, problem) -> Iterator[Problem]:
    h, w = info["height"], info["width"]
    if segm is None:
        yield problem("missing segmentation", "no segmentation (polygons or RLE) for a non-crowd annotation")
        return
    if isinstance(segm, list):
        if not segm or all(isinstance(p, list) and not p for p in segm):
            yield problem("empty segmentation", f"segmentation is {segm!r}")
            return
        bad = [p for p in segm if not _is_polygon(p)]
        if bad:
            count = len(bad[0]) if isinstance(bad[0], list) else bad[0]
            yield problem("degenerate polygon", f"a polygon needs 3 or more (x, y) points, got {count} numbers")
            return
    elif not (isinstance(segm, dict) and "counts" in segm and "size" in segm):
        yield problem("bad segmentation", "neither a list of polygons nor an RLE dict with size and counts")
        return
    elif list(segm["size"]) != [h, w]:
        yield problem("segmentation size mismatch", f"RLE size {segm['size']}, image {h}x{w}")
        return
    try:
        area = mask_utils.area(to_rle(segm, h, w))
    except (TypeError, ValueError) as exc:
        yield problem("bad segmentation", f"not decodable ({exc})")
        return
    if area == 0:
        yield problem("zero-area mask", "the segmentation covers no pixel")


def to_rle(segm: list | dict, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _is_polygon(points) -> bool:
    """A flat list of 3 or more (x, y) pairs: 4 numbers would be read as a box by pycocotools."""
    return (
        isinstance(points, list)
        and len(points) >= 6
        and len(points) % 2 == 0
        and all(isinstance(v, int | float) for v in points)
    )


def _select_images(report: DataReport, empty_images: str) -> None:
    """The training images: crowd-only images out, images without annotations kept or dropped."""
    annotated: dict[int, list[bool]] = {}
    for ann in report.clean["annotations"]:
        annotated.setdefault(ann["image_id"], []).append(bool(ann.get("iscrowd", 0)))
    ids = []
    for info in report.clean["images"]:
        crowd = annotated.get(info["id"])
        if crowd is None:
            report.empty_images += 1
            if empty_images == "drop":
                report.dropped_empty_images += 1
                continue
        elif all(crowd):
            report.crowd_only_images += 1
            continue
        ids.append(info["id"])
    report.image_ids = sorted(ids)
