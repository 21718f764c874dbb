"""COCO-format data for training and evaluation: loading, resize/flip, and batching.

Any data set in the layout users already have (an images folder plus an ``instances`` JSON with polygon
or RLE segmentations) trains the model. Decoding is left to pycocotools and OpenCV; this module only
turns annotations into the tensors CONTRACT.md specifies:

- images: uint8 [B, 3, H, W] zero-padded right/bottom, H and W multiples of 32;
- image_sizes: int64 [B, 2] each image's resized (h, w);
- targets: per image `boxes` float32 [N, 4] xyxy in resized pixels, `labels` int64 [N] in 1..K,
  `masks` uint8 [N, h, w] at the image's resized size.

Images are read with Pillow and resized with ``F.interpolate`` (bilinear, no antialiasing), as
torchvision's loader and GeneralizedRCNNTransform do; the policy and the padding are the contract's.
Crowd regions are dropped from training targets, as torchvision's and Detectron2's COCO loaders do
(COCOeval still treats them as ignore regions at evaluation time).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from contract import pad_batch, resize_boxes, resized_size
from model.data.checks import DataError, DataReport, check_dataset, load_annotation_json, to_rle
from model.data.sample import BoxMasks, Sample


class Source(Protocol):
    """What the training/eval dataset needs from a data source (COCO folder or generated shapes)."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...

    def image_size(self, index: int) -> tuple[int, int]: ...


def find_annotation_file(root: Path) -> Path:
    """instances.json, or the only instances*.json / *.json in root or root/annotations."""
    for folder in (root, root / "annotations"):
        if (folder / "instances.json").is_file():
            return folder / "instances.json"
    candidates = sorted(root.glob("instances*.json")) + sorted((root / "annotations").glob("instances*.json"))
    if not candidates:
        candidates = sorted(root.glob("*.json"))
    if len(candidates) != 1:
        found = f"found {len(candidates)}: {', '.join(c.name for c in candidates)}" if candidates else "found none"
        raise FileNotFoundError(
            f"{root}: expected a COCO folder, an images/ folder and one instances JSON (instances.json, or a single "
            f"instances*.json in the folder or its annotations/); {found}"
        )
    return candidates[0]


def images_folder(root: Path) -> Path:
    """root/images when it exists, else root itself."""
    return root / "images" if (root / "images").is_dir() else root


class CocoDataset:
    """A COCO-format data set: images folder + instances JSON, loaded one Sample at a time.

    Category ids (any, possibly sparse, like COCO's 1..90) map to contiguous labels 1..K in sorted id
    order; `class_names[label]` names them, index 0 is "__background__". ``data`` is the instances dict
    when the caller has it already (checked by model.data.checks), ``image_ids`` the images to use
    (default: all, images without annotations included: they count for evaluation).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ann_file: str | os.PathLike | None = None,
        images_dir: str | os.PathLike | None = None,
        data: dict | None = None,
        image_ids: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file) if ann_file else find_annotation_file(self.root)
        self.images_dir = Path(images_dir) if images_dir else images_folder(self.root)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO(None if data is not None else str(self.ann_file))
            if data is not None:
                self.coco.dataset = data
                self.coco.createIndex()
        self.image_ids: list[int] = sorted(self.coco.imgs) if image_ids is None else list(image_ids)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.label_of_cat: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = ["__background__", *(self.coco.cats[c]["name"] for c in self.cat_ids)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image `index` from the JSON, without reading the file."""
        info = self.coco.imgs[self.image_ids[index]]
        return int(info["height"]), int(info["width"])

    def read_image(self, image_id: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB, EXIF orientation applied (model.data.checks' policy, the server's too);
        checks the result against the JSON size, since masks are decoded at the JSON size and a mismatch
        would silently misalign them."""
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                rgb = np.array((ImageOps.exif_transpose(im) or im).convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{path} (image {image_id}): cannot read it ({exc})") from None
        if rgb.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path} (image {image_id}): size {rgb.shape[1]}x{rgb.shape[0]} differs from the JSON's "
                f"{info['width']}x{info['height']}"
            )
        return np.ascontiguousarray(rgb)

    def load(self, index: int) -> Sample:
        """Image `index` (in image-id order) with its non-crowd, non-degenerate instances, masks decoded
        within their boxes."""
        image_id = self.image_ids[index]
        image = self.read_image(image_id)
        h, w = image.shape[:2]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep, strict=True) if k]
        decoded = [decode_in_box(a["segmentation"], h, w) for a in anns]
        origins = np.array([o for _, o in decoded], dtype=np.int64).reshape(-1, 2)
        masks = BoxMasks([c for c, _ in decoded], origins, (h, w))
        labels = np.array([self.label_of_cat[a["category_id"]] for a in anns], dtype=np.int64)
        return Sample(image=image, boxes=boxes[keep], labels=labels, masks=masks, image_id=image_id)


def decode_in_box(segm: list | dict, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A COCO segmentation decoded within its extent: (uint8 crop, its (x0, y0) in the image).

    Polygons are rasterized on the crop alone, shifted by whole pixels: the same mask as the full-size
    decode but where pycocotools' fixed-point rounding (1/5 pixel) of a vertex falls the other way, a
    pixel or two on a boundary. An RLE can only be decoded at the image's size: one at a time, cropped at
    once, so at most one full-size mask is held.
    """
    if isinstance(segm, list):
        xs = np.concatenate([np.asarray(p[0::2], np.float64) for p in segm])
        ys = np.concatenate([np.asarray(p[1::2], np.float64) for p in segm])
        x0, y0 = (int(np.clip(np.floor(v.min()), 0, n)) for v, n in ((xs, width), (ys, height)))
        x1, y1 = (int(np.clip(np.ceil(v.max()) + 1, 0, n)) for v, n in ((xs, width), (ys, height)))
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0), np.uint8), (x0, y0)
        shifted = [[v - (x0 if k % 2 == 0 else y0) for k, v in enumerate(p)] for p in segm]
        crop = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)))
        return crop, (x0, y0)
    full = mask_utils.decode(to_rle(segm, height, width))
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    if not rows.size:
        return np.zeros((0, 0), np.uint8), (0, 0)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return np.ascontiguousarray(full[y0:y1, x0:x1]), (int(x0), int(y0))


def open_training_data(
    root: str | os.PathLike, errors: str = "stop", empty_images: str = "keep"
) -> tuple[CocoDataset, DataReport]:
    """A COCO folder checked (model.data.checks) and reduced to what trains: DataError if it cannot."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected an images/ folder and an instances JSON)")
    ann_file = find_annotation_file(root)
    images_dir = images_folder(root)
    report = check_dataset(load_annotation_json(ann_file), images_dir, errors, empty_images)
    if not report.image_ids:
        raise DataError(f"{ann_file}: no image left to train on ({report.summary()})")
    return CocoDataset(root, ann_file, images_dir, data=report.clean, image_ids=report.image_ids), report


def hflip(sample: Sample) -> Sample:
    """Mirror image, masks and boxes left-right."""
    w = sample.width
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    masks = sample.masks
    return Sample(
        image=np.ascontiguousarray(sample.image[:, ::-1]),
        boxes=boxes,
        labels=sample.labels,
        masks=masks.hflip() if isinstance(masks, BoxMasks) else np.ascontiguousarray(masks[:, :, ::-1]),
        image_id=sample.image_id,
    )


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 CHW tensor of ``size`` (h, w): bilinear, half-pixel centres, no
    antialiasing, rounded (torchvision's transform, and what the service's OpenCV resize computes)."""
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if tuple(chw.shape[1:]) == tuple(size):
        return chw.contiguous()
    out = F.interpolate(chw[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_masks(masks: BoxMasks, size: tuple[int, int]) -> torch.Tensor:
    """Binary masks as uint8 [N, h, w] at ``size``: bilinear then >= 0.5, so thin parts survive downscaling
    more faithfully than nearest-neighbour picking. Each crop is resized on its own, to the output pixels
    it reaches, with the weights ``F.interpolate`` (half-pixel centres, edges clamped) gives the whole
    image: the same result at the cost of the boxes."""
    out = torch.zeros((len(masks), *size), dtype=torch.uint8)
    (height, width), (nh, nw) = masks.image_size, size
    for i, (crop, (x0, y0)) in enumerate(zip(masks.crops, masks.origins.tolist(), strict=True)):
        if crop.size == 0:
            continue
        top, rows = _linear_weights(height, nh, y0, crop.shape[0])
        left, cols = _linear_weights(width, nw, x0, crop.shape[1])
        block = rows @ torch.from_numpy(crop).float() @ cols.T
        out[i, top : top + block.shape[0], left : left + block.shape[1]] = block >= 0.5
    return out


def _linear_weights(length: int, size: int, start: int, extent: int) -> tuple[int, torch.Tensor]:
    """Resizing ``length`` pixels to ``size`` bilinearly (half-pixel centres, edge-clamped, as
    F.interpolate with align_corners=False): the first output pixel that reads any of the source pixels
    [start, start + extent), and the weights [rows, extent] of those output pixels on them."""
    scale = length / size
    first = max(0, math.floor((start + 0.5) / scale - 0.5) - 1)
    last = min(size, math.ceil((start + extent + 0.5) / scale - 0.5) + 1)
    out = torch.arange(first, last, dtype=torch.float64)
    src = ((out + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long()
    i1 = (i0 + 1).clamp_(max=length - 1)
    lam = (src - i0).float()
    weights = torch.zeros((len(out), extent))
    rows = torch.arange(len(out))
    for index, w in ((i0, 1 - lam), (i1, lam)):
        inside = (index >= start) & (index < start + extent)
        weights.index_put_((rows[inside], index[inside] - start), w[inside], accumulate=True)
    return first, weights


class Item(NamedTuple):
    """One prepared image: CHW uint8 tensor at the resized size, its target, and where it came from."""

    image: torch.Tensor
    target: dict[str, torch.Tensor]
    image_id: int
    orig_size: tuple[int, int]


def as_box_masks(masks: np.ndarray | BoxMasks) -> BoxMasks:
    """Generated data keeps full-size masks (its images are small); COCO data comes as BoxMasks."""
    return masks if isinstance(masks, BoxMasks) else BoxMasks.from_full(masks.astype(np.uint8))


def prepare(sample: Sample, min_size: int, max_size: int, flip: bool = False) -> Item:
    """Flip (optionally) and resize one sample to model input tensors."""
    if flip:
        sample = hflip(sample)
    h, w = sample.height, sample.width
    nh, nw = resized_size(h, w, min_size, max_size)
    image = resize_image(sample.image, (nh, nw))
    boxes = resize_boxes(sample.boxes.reshape(-1, 4), (h, w), (nh, nw))
    target = {
        "boxes": torch.from_numpy(boxes),
        "labels": torch.from_numpy(sample.labels.astype(np.int64)),
        "masks": resize_masks(as_box_masks(sample.masks), (nh, nw)),
    }
    return Item(image=image, target=target, image_id=sample.image_id, orig_size=(h, w))


class DetectionDataset(torch.utils.data.Dataset):
    """Prepared items from a source, with random short-side sizes and flips for training.

    Indices past len(source) wrap around, and the augmentation of index i depends on (seed, i) only:
    a run resumed at step s sees exactly the items it would have seen without stopping.
    `min_size` may be a sequence (multi-scale training: one picked per image).
    """

    def __init__(
        self,
        source: Source,
        min_size: int | Sequence[int],
        max_size: int,
        train: bool = True,
        flip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.min_sizes = [int(min_size)] if isinstance(min_size, int) else [int(s) for s in min_size]
        self.max_size = int(max_size)
        self.train = train
        self.flip_prob = flip_prob if train else 0.0
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Item:
        rng = np.random.default_rng([self.seed, int(index)])
        # Eval uses the last size, as torchvision does with a min_size tuple.
        pick = int(rng.integers(len(self.min_sizes))) if self.train else -1
        min_size = self.min_sizes[pick]
        flip = bool(rng.random() < self.flip_prob)
        return prepare(self.source.load(int(index) % len(self.source)), min_size, self.max_size, flip)


class Batch(NamedTuple):
    """Model inputs of one batch plus the bookkeeping evaluation needs to map results back."""

    images: torch.Tensor
    image_sizes: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    image_ids: list[int]
    orig_sizes: list[tuple[int, int]]


def collate(items: Sequence[Item]) -> Batch:
    """Batch items of different sizes as CONTRACT.md specifies."""
    images, sizes = pad_batch([it.image.numpy() for it in items])
    return Batch(
        images=torch.from_numpy(images),
        image_sizes=torch.from_numpy(sizes),
        targets=[it.target for it in items],
        image_ids=[it.image_id for it in items],
        orig_sizes=[it.orig_size for it in items],
    )
