"""The data checked before step 1: a COCO folder with every kind of bad annotation stops the run with one line
per problem (file, image id, annotation id) and no traceback; the skip policy trains and counts them. Also the
box-local masks (the same pixels as the full-size decode) and the aspect-ratio grouped, resumable order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from model.data.checks import check_dataset, load_annotation_json
from model.data.coco import decode_in_box, resize_masks
from model.data.sample import BoxMasks
from model.data.sampler import ResumableSampler, aspect_ratio_groups

ROOT = Path(__file__).resolve().parents[1]
GOOD = [[10, 10, 40, 10, 40, 40, 10, 40]]
# Each bad annotation on the good image (id 1), by the kind the check must name.
BAD_ANNOTATIONS = [
    ("missing segmentation", {}),
    ("empty segmentation", {"segmentation": []}),
    ("empty segmentation", {"segmentation": [[]]}),
    ("degenerate polygon", {"segmentation": [[10, 10, 20, 10]]}),
    ("unknown category", {"category_id": 99, "segmentation": GOOD}),
    ("zero-area mask", {"segmentation": [[10, 10, 10.2, 10, 10.1, 10.3]]}),
    ("box outside image", {"segmentation": GOOD, "bbox": [50, 50, 40, 40]}),
    ("unknown image", {"segmentation": GOOD, "image_id": 77}),
]
# Problems of the images: one line each.
BAD_IMAGES = ["duplicate image id", "missing image", "unreadable image", "image size mismatch", "image size mismatch"]


def _image(path: Path, size: tuple[int, int], orientation: int | None = None) -> None:
    image = Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, exif=exif)


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """Images: good (1), missing file (2), not an image (3), wrong size (4), a phone photo rotated by EXIF whose
    JSON has the stored size (5), crowd-only (6), a duplicate id (1 again); annotations of every bad kind."""
    images = tmp_path / "images"
    images.mkdir()
    _image(images / "good.png", (64, 64))
    (images / "broken.png").write_bytes(b"not an image")
    _image(images / "small.png", (32, 32))
    _image(images / "phone.jpg", (64, 48), orientation=6)
    _image(images / "crowd.png", (64, 64))
    entries = [(1, "good.png", 64, 64), (2, "missing.png", 64, 64), (3, "broken.png", 64, 64),
               (4, "small.png", 64, 64), (5, "phone.jpg", 64, 48), (6, "crowd.png", 64, 64), (1, "dup.png", 64, 64)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 30, 30], "segmentation": GOOD},
            {"id": 2, "image_id": 6, "category_id": 1, "iscrowd": 1, "bbox": [10, 10, 30, 30], "segmentation": GOOD}]
    for i, (_, extra) in enumerate(BAD_ANNOTATIONS):
        anns.append({"id": 10 + i, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 30, 30], **extra})
    anns.append({**anns[0], "id": 1})  # duplicate annotation id
    data = {"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in entries],
            "annotations": anns, "categories": [{"id": 1, "name": "square"}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return tmp_path


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    model = '{"norm": "bn", "width": 16, "fpn_channels": 32, "representation_size": 32, "mask_channels": 16}'
    args = ["--data", str(data), "--out-dir", str(out), "--max-steps", "1", "--batch-size", "1", "--min-size", "64",
            "--max-size", "64", "--device", "cpu", "--model", model, *extra]
    return subprocess.run([sys.executable, "-m", "model.train", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.mark.slow
def test_every_problem_stops_the_run_before_step_one(bad_folder: Path, tmp_path: Path) -> None:
    done = _train(bad_folder, tmp_path / "run")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    kinds = [kind for kind, _ in BAD_ANNOTATIONS] + ["duplicate annotation id", *BAD_IMAGES]
    for kind in kinds:
        assert any(f": {kind}:" in line for line in lines), (kind, done.stderr)
    assert "good.png (image 1, annotation 13): degenerate polygon" in done.stderr
    assert "- (image 77, annotation 17): unknown image" in done.stderr
    assert "phone.jpg (image 5): image size mismatch" in done.stderr and "unrotated" in done.stderr
    assert lines[-1].startswith("error: data ") and "data_errors: skip" in lines[-1]
    assert len(lines) == len(kinds) + 1
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_skip_policy_trains_and_counts(bad_folder: Path, tmp_path: Path) -> None:
    done = _train(bad_folder, tmp_path / "run", "--data-errors", "skip")
    assert done.returncode == 0, done.stderr
    summary = next(line for line in done.stderr.splitlines() if line.startswith("data check:"))
    assert "1 images used" in summary and "1 crowd-only images dropped" in summary
    assert "1 degenerate polygon" in summary and "1 missing image" in summary
    assert (tmp_path / "run" / "last.pt").exists()


def test_empty_images_kept_or_dropped(bad_folder: Path) -> None:
    data = load_annotation_json(bad_folder / "instances.json")
    data["annotations"] = [a for a in data["annotations"] if a["id"] == 2]  # only the crowd region is left
    data["images"] = data["images"][:1] + data["images"][5:6]
    kept = check_dataset(data, bad_folder / "images", errors="stop", empty_images="keep")
    assert kept.image_ids == [1] and kept.crowd_only_images == 1 and kept.empty_images == 1
    dropped = check_dataset(data, bad_folder / "images", errors="stop", empty_images="drop")
    assert dropped.image_ids == [] and dropped.dropped_empty_images == 1


def test_box_local_decode_matches_the_full_decode() -> None:
    """Polygons on the crop alone and RLE cropped after decoding: the full decode's pixels, up to
    pycocotools' 1/5-pixel rounding on a boundary."""
    rng = np.random.default_rng(1)
    h, w = 97, 143
    for _ in range(50):
        polys = [rng.uniform(-10, 160, size=2 * int(rng.integers(3, 9))).tolist() for _ in range(2)]
        full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
        for segm in (polys, mask_utils.encode(np.asfortranarray(full))):
            crop, (x0, y0) = decode_in_box(segm, h, w)
            pasted = BoxMasks([crop], np.array([[x0, y0]]), (h, w)).full()[0]
            assert np.abs(pasted.astype(int) - full).sum() <= 4


def test_box_local_resize_is_the_full_image_resize() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 137, 211), np.uint8)
    for m in masks[:4]:
        y, x = rng.integers(0, 117), rng.integers(0, 191)
        m[y : y + rng.integers(1, 60), x : x + rng.integers(1, 90)] = 1
    masks[4, :10, :] = 1  # touching the image's edges
    masks[5, -3:, -50:] = 1
    boxed = BoxMasks.from_full(masks)
    np.testing.assert_array_equal(boxed.full(), masks)
    np.testing.assert_array_equal(boxed.hflip().full(), masks[:, :, ::-1])
    for size in [(60, 93), (300, 462), (137, 211), (100, 400)]:
        full = F.interpolate(torch.from_numpy(masks)[None].float(), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(resize_masks(boxed, size), (full[0] >= 0.5).to(torch.uint8))


def test_grouped_order_is_resumable_and_one_group_a_batch() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(200, 600, size=(37, 2))]
    groups = aspect_ratio_groups(sizes, 3)
    assert len(set(groups.tolist())) > 2
    straight = ResumableSampler(groups, 4, seed=5)
    per_epoch = straight.batches_per_epoch
    it = iter(straight)
    batches = [next(it) for _ in range(3 * per_epoch + 2)]
    for batch in batches:
        assert len(batch) == 4 and len({int(groups[i % 37]) for i in batch}) == 1
    first_epoch = {i for batch in batches[:per_epoch] for i in batch}
    assert first_epoch == set(range(37))  # every image once an epoch (a few twice, to fill the last batches)
    for start in (1, per_epoch - 1, per_epoch, 2 * per_epoch + 1):
        resumed = iter(ResumableSampler(groups, 4, seed=5, start_step=start))
        assert [next(resumed) for _ in range(len(batches) - start)] == batches[start:]
