"""The training losses (Fast R-CNN, mask, RPN, the whole model's five terms): seeded regressions, stored values."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.roi_heads import fastrcnn_loss, maskrcnn_loss
from model.rpn import RegionProposalNetwork
from tests.conftest import SLIM_MODELS
from tests.helpers import scene, training_batch

# Computed once by the code under test (torch 2.14.1, CPU) and pasted here. A loss that moves past the
# tolerance fails with its name: update the number only when the change is meant.
RELATIVE_TOLERANCE = 1e-5


def _assert_stored(losses: dict[str, torch.Tensor], stored: dict[str, float]) -> None:
    assert set(losses) == set(stored)
    for name, value in stored.items():
        now = losses[name].item()
        assert math.isclose(now, value, rel_tol=RELATIVE_TOLERANCE), (
            f"{name} moved: stored {value:.8g}, now {now:.8g}; if the change is intended, update the stored number"
        )


def _scenes() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    return training_batch([scene(0, (128, 160)), scene(1, (96, 128))])


def test_fastrcnn_loss_stored_values():
    torch.manual_seed(0)
    class_logits = torch.randn(6, 3)
    box_regression = torch.randn(6, 12)
    labels = torch.tensor([0, 1, 2, 0, 2, 0])
    targets = torch.randn(6, 4)
    losses = fastrcnn_loss(class_logits, box_regression, labels, targets)
    _assert_stored(losses, {"loss_classifier": 1.6619076, "loss_box_reg": 1.7558259})


def test_maskrcnn_loss_stored_value():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 28, 28)
    targets = (torch.rand(4, 28, 28) > 0.5).float()
    loss = maskrcnn_loss(logits, torch.tensor([1, 2, 2, 1]), targets)
    _assert_stored({"loss_mask": loss}, {"loss_mask": 0.8174569})


def test_mask_loss_uses_only_the_ground_truth_class():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 28, 28, requires_grad=True)
    labels = torch.tensor([1, 2, 2, 1])
    targets = (torch.rand(4, 28, 28) > 0.5).float()
    loss = maskrcnn_loss(logits, labels, targets)
    expected = F.binary_cross_entropy_with_logits(logits[torch.arange(4), labels], targets)
    assert torch.allclose(loss, expected)
    loss.backward()
    other = torch.ones(4, 3, dtype=torch.bool)
    other[torch.arange(4), labels] = False
    assert (logits.grad[other] == 0).all()


def test_mask_loss_without_positives_is_zero_and_differentiable():
    logits = torch.randn(0, 3, 28, 28, requires_grad=True)
    loss = maskrcnn_loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == logits.shape


def test_rpn_loss_stored_values():
    _, sizes, targets = _scenes()
    torch.manual_seed(0)
    rpn = RegionProposalNetwork(8).train()
    # Larger head weights than the init's std 0.01, so that the objectness logits are far from 0 and the
    # loss depends on which anchors are labelled positive.
    for layer in (rpn.head.conv[0][0], rpn.head.cls_logits, rpn.head.bbox_pred):
        torch.nn.init.normal_(layer.weight, std=0.3)
    features = [torch.randn(2, 8, 128 // s, 160 // s) for s in (4, 8, 16, 32, 64)]
    torch.manual_seed(1)
    _, _, losses = rpn(features, sizes, targets)
    _assert_stored(losses, {"loss_objectness": 0.67201257, "loss_rpn_box_reg": 0.37494701})


# Architecture -> (build_model options, the five loss terms stored): the FPN heads, and the slim C4 heads and
# ResNeXt body sampling 64 RoIs per image.
STORED_MODEL_LOSSES = {
    "r18_fpn": (
        {"width": 32, "fpn_channels": 64, "representation_size": 64, "mask_channels": 32},
        {
            "loss_objectness": 0.69720054,
            "loss_rpn_box_reg": 0.075968727,
            "loss_classifier": 1.0839871,
            "loss_box_reg": 0.28053516,
            "loss_mask": 0.69287306,
        },
    ),
    "r50_c4": (
        {**SLIM_MODELS["r50_c4"], "box_batch_size_per_image": 64},
        {
            "loss_objectness": 0.70523101,
            "loss_rpn_box_reg": 0.014173785,
            "loss_classifier": 1.0208626,
            "loss_box_reg": 0.77768582,
            "loss_mask": 0.69337749,
        },
    ),
    "x101_fpn": (
        {**SLIM_MODELS["x101_fpn"], "box_batch_size_per_image": 64},
        {
            "loss_objectness": 0.71591896,
            "loss_rpn_box_reg": 0.079658933,
            "loss_classifier": 1.0671767,
            "loss_box_reg": 1.1241082,
            "loss_mask": 0.69374281,
        },
    ),
}


@pytest.mark.parametrize("arch", STORED_MODEL_LOSSES)
def test_model_losses_stored_values(arch):
    images, sizes, targets = _scenes()
    options, stored = STORED_MODEL_LOSSES[arch]
    torch.manual_seed(0)
    model = build_model(arch, 3, norm="bn", **options)
    torch.manual_seed(1)  # the RPN's and the RoI heads' sampling draw from here
    losses = model.train()(images, sizes, targets)
    _assert_stored(losses, stored)
