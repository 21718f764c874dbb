"""Loading weights: torchvision's ``maskrcnn_resnet50_fpn`` state dict (the COCO checkpoint users
already have) or a checkpoint written by ``model.train``, recognized by their contents.

``load_model`` resolves everything a checkpoint implies (architecture, classes and their names, input
size policy), so the exporter and the evaluation read these facts instead of re-deriving them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from contract import COCO_NUM_CLASSES, DEFAULT_ARCH, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE
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


@dataclass
class LoadedModel:
    """A model in eval mode with what its checkpoint says about it, defaults resolved."""

    model: MaskRCNN
    source: str  # "torchvision" or "train"
    arch: str
    class_names: list[str]  # index = label, index 0 = "__background__"
    min_size: int  # the input size policy the model was trained for
    max_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def default_class_names(num_classes: int) -> list[str]:
    """Names for a checkpoint that carries none: torchvision's COCO names for its 91-class label space
    (index = COCO category id, "N/A" in the gaps), else ``class_<i>``."""
    if num_classes == COCO_NUM_CLASSES:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    return ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None, **overrides) -> LoadedModel:
    """Build the model a checkpoint describes (``arch`` / ``num_classes`` default to the checkpoint's
    own, or R-50-FPN with torchvision's 91 COCO classes) and load its weights, strictly. ``overrides``
    are ``build_model`` options (e.g. inference thresholds) over the checkpoint's."""
    ckpt = read_checkpoint(path)
    cfg = ckpt.config
    arch = arch or cfg.get("arch", DEFAULT_ARCH)
    if num_classes is None:
        num_classes = int(cfg.get("num_classes") or COCO_NUM_CLASSES)
    kwargs = {**cfg.get("model", {}), **overrides}
    what = f"{arch} with {num_classes} classes"
    try:
        model = build_model(arch, num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # the checkpoint's options do not fit the architecture asked for
        raise CheckpointError(f"checkpoint does not match {what}: {exc}") from None
    check_compatible(model, ckpt.state_dict, what)
    model.load_state_dict(ckpt.state_dict, strict=False)
    names = list(ckpt.class_names) if ckpt.class_names else default_class_names(num_classes)
    if len(names) != num_classes:
        raise CheckpointError(f"checkpoint has {len(names)} class names for {num_classes} classes")
    return LoadedModel(
        model=model.eval(),
        source=ckpt.source,
        arch=arch,
        class_names=names,
        min_size=int(cfg.get("min_size", DEFAULT_MIN_SIZE)),
        max_size=int(cfg.get("max_size", DEFAULT_MAX_SIZE)),
    )
