"""model/c4.py: the C4 head's parts on a slim R-50-C4: the RPN on C4 alone, res5 per RoI as the box head, and
the mask branch on res5's output (14x14 masks), in inference and in training (Mask R-CNN, Figure 4 left)."""

import pytest
import torch

from model import build_model
from model.c4 import C4_ANCHORS, C4_MASK_SIZE, C4_STRIDE
from tests.conftest import SLIM_MODELS
from tests.helpers import scene, training_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("r50_c4", 3, norm="bn", **SLIM_MODELS["r50_c4"], box_batch_size_per_image=64)


def _features(model, images, sizes):
    with torch.no_grad():
        return model.backbone(model.normalize(images, sizes), sizes)


def test_rpn_reads_c4_alone_with_15_anchors_per_location(model):
    images, sizes, _ = training_batch([scene(0, (128, 160))])
    (c4,) = _features(model.eval(), images, sizes)
    assert c4.shape[-2:] == (128 // C4_STRIDE, 160 // C4_STRIDE) and c4.shape[1] == model.backbone.out_channels
    assert model.rpn.anchors == C4_ANCHORS and model.rpn.head.cls_logits.out_channels == 15
    assert not hasattr(model.backbone.body, "layer4")  # res5 runs per RoI, in the heads


def test_box_and_mask_branches_read_res5(model):
    """The box head is res5's 7x7 output average-pooled; a detection's mask is the deconvolution of that same
    output through its own class's 1x1 predictor only, which equals all K predictors' output at its class."""
    heads = model.eval().roi_heads
    images, sizes, _ = training_batch([scene(0, (128, 160)), scene(1, (96, 128))])
    features = _features(model, images, sizes)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 128.0, 96.0], [30.5, 5.25, 60.0, 40.0]])
    batch_index, labels = torch.tensor([0, 1, 1]), torch.tensor([1, 2, 1])
    with torch.no_grad():
        res5 = heads.res5_features(features, boxes, batch_index)
        assert res5.shape[-2:] == (7, 7)
        torch.testing.assert_close(heads.box_features(features, boxes, batch_index), res5.mean((2, 3)))
        probs = heads.mask_inference(features, boxes, batch_index, labels)
        every_class = torch.sigmoid(heads.mask_predictor(res5))
    assert probs.shape == (3, C4_MASK_SIZE, C4_MASK_SIZE) == (3, 14, 14)
    torch.testing.assert_close(probs, every_class[torch.arange(3), labels])


def test_training_runs_res5_once_and_the_mask_loss_trains_it(model):
    """In training res5 runs once on the sampled RoIs (at most 64 per image here) and the mask branch reads the
    positives' output, so L_mask alone sends gradients into res5."""
    images, sizes, targets = training_batch([scene(0, (128, 160)), scene(1, (96, 128))])
    calls = []
    hook = model.roi_heads.res5.register_forward_hook(lambda _, inputs, __: calls.append(inputs[0].shape[0]))
    try:
        torch.manual_seed(1)
        losses = model.train()(images, sizes, targets)
    finally:
        hook.remove()
    assert len(calls) == 1 and 0 < calls[0] <= 2 * 64
    model.zero_grad()
    losses["loss_mask"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.roi_heads.res5.parameters())
    assert model.roi_heads.box_predictor.cls_score.weight.grad is None
