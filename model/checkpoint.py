"""Loading weights: torchvision's ``maskrcnn_resnet50_fpn`` state dict (the COCO checkpoint users
already have) or a checkpoint written by ``model.train``, recognized by their contents."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.mask_rcnn import MaskRCNN, build_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one readable line naming what does not match."""


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, Tensor]
    source: str  # "torchvision" or "train"
    config: dict = field(default_factory=dict)
    class_names: list[str] | None = None


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read ``path`` and tell a torchvision state dict from a training checkpoint."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return LoadedCheckpoint(obj["model"], "train", dict(obj.get("config") or {}), obj.get("class_names"))
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return LoadedCheckpoint(obj, "torchvision")
    raise CheckpointError(f"{path}: neither a torchvision state dict nor a checkpoint written by model.train")


def check_compatible(model: MaskRCNN, state_dict: dict[str, Tensor], what: str) -> None:
    """Raise CheckpointError naming missing / unexpected keys and shape mismatches, if any."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    problems = []
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    for key in sorted(set(expected) & set(given)):
        if expected[key] != given[key]:
            problems.append(f"{key} has shape {tuple(given[key])}, {what} needs {tuple(expected[key])}")
            break
    if problems:
        raise CheckpointError(f"checkpoint does not match {what}: " + "; ".join(problems))


def load_model(
    path: str | Path, arch: str | None = None, num_classes: int | None = None, **overrides
) -> tuple[MaskRCNN, LoadedCheckpoint]:
    """Build the model a checkpoint describes (``arch`` / ``num_classes`` default to the checkpoint's
    own, or R-50-FPN with 91 COCO classes for torchvision) and load its weights, strictly."""
    ckpt = read_checkpoint(path)
    cfg = ckpt.config
    arch = arch or cfg.get("arch", "r50_fpn")
    if num_classes is None:
        num_classes = int(cfg.get("num_classes") or 91)
    kwargs = {**cfg.get("model", {}), **overrides}
    what = f"{arch} with {num_classes} classes"
    try:
        model = build_model(arch, num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # the checkpoint's options do not fit the architecture asked for
        raise CheckpointError(f"checkpoint does not match {what}: {exc}") from None
    check_compatible(model, ckpt.state_dict, what)
    model.load_state_dict(ckpt.state_dict, strict=False)
    return model.eval(), ckpt
