"""Our R-50-FPN with torchvision's maskrcnn_resnet50_fpn state dict gives torchvision's detections.

Image sizes are multiples of 64 with the short side at torchvision's min_size, so torchvision's
transform leaves them unchanged (no resize, no padding) and both models see the same tensor.
Our batched run of images of different sizes is compared with torchvision on each image alone:
our model is padding-invariant, so each image's answer in a batch is its answer alone (up to float
rounding: convolutions over a larger padded tensor sum in another order).
"""

import numpy as np
import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from export.exporter import box_error, mask_iou, pair_detections
from model import build_model
from model.backbone import calibrate_batch_norms

MIN_SIZE, MAX_SIZE = 320, 512
SCORE_THRESH = 0.03  # calibrated random weights: tens of detections, none cut by the top-100 limit
SIZES = [(320, 448), (320, 320), (448, 320)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE, box_score_thresh=SCORE_THRESH
    ).eval()
    calibrate_batch_norms(tv.backbone.body, MIN_SIZE)
    ours = build_model("r50_fpn", 91, score_thresh=SCORE_THRESH).eval()
    ours.load_state_dict(tv.state_dict())
    return tv, ours


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _assert_same(ours: dict, index: int, ref: dict, size: tuple[int, int]) -> None:
    n = int(ours["num_detections"][index])
    assert n == len(ref["boxes"]) and n > 0
    reference = {k: v.numpy()[None] for k, v in ref.items()} | {"num_detections": np.array([n])}
    candidate = {k: ours[k][index : index + 1].numpy() for k in ("boxes", "labels", "num_detections")}
    pick = pair_detections(reference, candidate, 0)
    assert pick is not None
    boxes, scores = ours["boxes"][index, pick], ours["scores"][index, pick]
    # 1e-3 px, or 0.1% of the box's extent for boxes over 1 px (see export.exporter.BOX_TOLERANCE).
    assert box_error(ref["boxes"].numpy(), boxes.numpy()) <= 1e-3
    assert (scores - ref["scores"]).abs().max().item() <= 1e-4
    assert torch.equal(ours["labels"][index, pick], ref["labels"])
    pasted = paste_masks_in_image(ours["masks"][index, pick, None], boxes, size)[:, 0]
    assert mask_iou(np.asarray(pasted > 0.5), np.asarray(ref["masks"][:, 0] > 0.5)) >= 0.99


def test_state_dict_loads_strictly(models):
    tv, ours = models
    assert set(ours.state_dict()) == {k for k in tv.state_dict() if not k.endswith("num_batches_tracked")}


def test_one_image(models):
    tv, ours = models
    image = _image(*SIZES[0], seed=1)
    with torch.no_grad():
        ref = tv([image.float() / 255])[0]
        result = ours(image[None], torch.tensor([SIZES[0]]))
    _assert_same(result, 0, ref, SIZES[0])


def test_batch_of_three_sizes(models):
    tv, ours = models
    images = [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    batch = torch.zeros(3, 3, 448, 448, dtype=torch.uint8)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    with torch.no_grad():
        result = ours(batch, torch.tensor(SIZES))
        refs = [tv([image.float() / 255])[0] for image in images]
    for i, ref in enumerate(refs):
        _assert_same(result, i, ref, SIZES[i])
