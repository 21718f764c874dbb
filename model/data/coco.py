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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO

from contract import pad_batch, resize_boxes, resized_size
from model.data.sample import Sample


class Source(Protocol):
    """What the training/eval dataset needs from a data source (COCO folder or generated shapes)."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> Sample: ...


def find_annotation_file(root: Path) -> Path:
    """instances.json, or the only instances*.json / *.json in root or root/annotations."""
    for folder in (root, root / "annotations"):
        if (folder / "instances.json").is_file():
            return folder / "instances.json"
    candidates = sorted(root.glob("instances*.json")) + sorted((root / "annotations").glob("instances*.json"))
    if not candidates:
        candidates = sorted(root.glob("*.json"))
    if len(candidates) != 1:
        raise FileNotFoundError(f"cannot pick one annotation file in {root}: {[str(c) for c in candidates]}")
    return candidates[0]


class CocoDataset:
    """A COCO-format data set: images folder + instances JSON, loaded one Sample at a time.

    Category ids (any, possibly sparse, like COCO's 1..90) map to contiguous labels 1..K in sorted id
    order; `class_names[label]` names them, index 0 is "__background__". Images without annotations are
    kept: they are legitimate negatives for training and count for evaluation.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ann_file: str | os.PathLike | None = None,
        images_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = Path(root)
        self.ann_file = Path(ann_file) if ann_file else find_annotation_file(self.root)
        if images_dir:
            self.images_dir = Path(images_dir)
        else:
            self.images_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
        self.coco = COCO(str(self.ann_file))
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.label_of_cat: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = ["__background__", *(self.coco.cats[c]["name"] for c in self.cat_ids)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def read_image(self, image_id: int) -> np.ndarray:
        """uint8 [H, W, 3] RGB; checks the file against the JSON size, since masks are decoded at the
        JSON size and a mismatch would silently misalign them."""
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        # Stored pixel order (no EXIF rotation), as torchvision's loader reads it: COCO sizes ignore EXIF.
        try:
            with Image.open(path) as im:
                rgb = np.array(im.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot read image {path} ({exc})") from None
        if rgb.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: size {rgb.shape[1]}x{rgb.shape[0]} differs from the JSON's {info['width']}x{info['height']}"
            )
        return np.ascontiguousarray(rgb)

    def load(self, index: int) -> Sample:
        """Image `index` (in sorted image-id order) with its non-crowd, non-degenerate instances."""
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
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        labels = np.array([self.label_of_cat[a["category_id"]] for a in anns], dtype=np.int64)
        return Sample(image=image, boxes=boxes[keep], labels=labels, masks=masks, image_id=image_id)


def hflip(sample: Sample) -> Sample:
    """Mirror image, masks and boxes left-right."""
    w = sample.width
    boxes = sample.boxes.copy()
    boxes[:, [0, 2]] = w - sample.boxes[:, [2, 0]]
    return Sample(
        image=np.ascontiguousarray(sample.image[:, ::-1]),
        boxes=boxes,
        labels=sample.labels,
        masks=np.ascontiguousarray(sample.masks[:, :, ::-1]),
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


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resize binary masks [N, H, W] to (h, w) as uint8, bilinear then >= 0.5 so thin parts survive
    downscaling more faithfully than nearest-neighbour picking."""
    t = torch.from_numpy(masks)
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if t.shape[0] == 0:
        return t.new_zeros((0, *size))
    out = F.interpolate(t[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return (out >= 0.5).to(torch.uint8)


class Item(NamedTuple):
    """One prepared image: CHW uint8 tensor at the resized size, its target, and where it came from."""

    image: torch.Tensor
    target: dict[str, torch.Tensor]
    image_id: int
    orig_size: tuple[int, int]


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
        "masks": resize_masks(sample.masks.astype(np.uint8), (nh, nw)),
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
