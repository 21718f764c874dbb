"""Loading weights: a torchvision state dict (``maskrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn_v2``,
from a file or fetched by name through torchvision's weights API) or a checkpoint written by
``model.train``, recognized by their contents.

``load_model`` and ``load_torchvision_weights`` resolve everything a checkpoint implies (architecture,
classes and their names, input size policy), so the exporter and the evaluation read these facts
instead of re-deriving them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from contract import COCO_NUM_CLASSES, DEFAULT_ARCH, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE
from model.architectures import ARCHITECTURES, for_torchvision_builder
from model.backbone import RESNET_LAYOUTS
from model.mask_rcnn import MaskRCNN, build_model

# torchvision's parameter names before its modules' version 2 (torchvision 0.12), which older state dicts,
# the v1 COCO weights among them, still carry -> today's: the FPN's blocks and the RPN head's convolution
# became Conv2dNormActivation blocks, the mask head's mask_fcn1..4 its numbered blocks. torchvision renames
# them as it loads; we rename them first, so that check_compatible compares today's names.
_LEGACY_NAMES = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
    (
        re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$"),
        lambda m: f"{m[1]}.{int(m[2]) - 1}.0.{m[3]}",
    ),
)
_BOX_HEAD_CONV = re.compile(r"roi_heads\.box_head\.\d+\.0\.weight")  # v2's convolutions (Conv2dNormActivation)


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


def current_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with torchvision's legacy parameter names replaced by today's (see _LEGACY_NAMES)."""
    renamed = {}
    for key, value in state_dict.items():
        for pattern, new in _LEGACY_NAMES:
            key = pattern.sub(new, key)
        renamed[key] = value
    return renamed


def torchvision_cache_path(url: str) -> Path:
    """Where torchvision's weights API keeps the file of ``url``: TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def fetch_torchvision_weights(name: str) -> LoadedCheckpoint:
    """torchvision's detection weights ``name`` (e.g. ``MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``) through
    its weights API: downloaded from its URL once with its hash checked, then read from torchvision's cache.
    The architecture is the one that loads the weights' builder's state dicts, the class names the
    weights' own."""
    from torchvision.models import detection, get_model_weights, list_models

    weights = torchvision_weights(name)
    builders = [b for b in list_models(module=detection) if get_model_weights(b) is type(weights)]
    try:
        arch = for_torchvision_builder(builders[0] if builders else type(weights).__name__)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    state_dict = download_weights(name)
    return LoadedCheckpoint(state_dict, "torchvision", {"arch": arch}, list(weights.meta["categories"]))


def torchvision_weights(name: str):  # -> torchvision.models.WeightsEnum member
    """The member of torchvision's weights enums called ``name``, or CheckpointError."""
    from torchvision.models import get_weight

    try:
        return get_weight(name)
    except (ValueError, KeyError, AttributeError):
        example = "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
        raise CheckpointError(f"{name}: not a torchvision weights name (e.g. {example})") from None


def download_weights(name: str) -> dict[str, Tensor]:
    """The state dict of torchvision's weights ``name``: its weights API's cache, download and hash check,
    with one readable line when there is no network (where to put the file instead)."""
    weights = torchvision_weights(name)
    cached = torchvision_cache_path(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as exc:  # urllib's URLError and the socket's errors are OSErrors
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(
            f"cannot download {weights.url} ({reason}); without network, put that file at {cached}"
        ) from None
    except Exception as exc:  # torch.hub's hash check, or a cached file torch.load cannot read
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{name} ({cached}): {type(exc).__name__}: {first_line}") from None


def architecture_of(state_dict: dict[str, Tensor]) -> str | None:
    """Our architecture whose state dicts have these keys and shapes (today's names), or None: the body
    from its blocks (basic or bottleneck, blocks per stage, groups), the rest from the layers each
    architecture has (C4's res5, batch norms in the FPN, the RPN's and box head's convolutions). So a
    torchvision v2 file needs no ``--arch``."""
    keys = set(state_dict)

    def count(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})

    conv2 = state_dict.get("backbone.body.layer1.0.conv2.weight")
    if conv2 is None:
        return None
    stages = tuple(count(f"backbone.body.layer{i}.") for i in (1, 2, 3))
    bottleneck = "backbone.body.layer1.0.conv3.weight" in keys
    groups = state_dict["backbone.body.layer1.0.conv1.weight"].shape[0] // conv2.shape[1]
    bodies = [
        name
        for name, (block, layers, layout_groups, _) in RESNET_LAYOUTS.items()
        if (block.__name__ == "Bottleneck") == bottleneck and layers[:3] == stages and layout_groups == groups
    ]
    found = {
        "head": "c4" if any(k.startswith("roi_heads.res5.") for k in keys) else "fpn",
        "fpn_norm": "backbone.fpn.inner_blocks.0.1.weight" in keys,
        "rpn_convs": count("rpn.head.conv."),
        "box_head_convs": sum(1 for k in keys if _BOX_HEAD_CONV.fullmatch(k)),
    }
    for name, spec in ARCHITECTURES.items():
        if spec.body in bodies and all(getattr(spec, k) == v for k, v in found.items()):
            return name
    return None


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
    """Build the model a checkpoint file describes (``arch`` / ``num_classes`` default to the checkpoint's
    own, or R-50-FPN with torchvision's 91 COCO classes) and load its weights, strictly. ``overrides``
    are ``build_model`` options (e.g. inference thresholds) over the checkpoint's."""
    return _build(read_checkpoint(path), arch, num_classes, **overrides)


def load_torchvision_weights(name: str, arch: str | None = None, num_classes: int | None = None, **overrides):
    """``load_model`` for torchvision's weights ``name``, fetched through its weights API."""
    return _build(fetch_torchvision_weights(name), arch, num_classes, **overrides)


def _build(ckpt: LoadedCheckpoint, arch: str | None, num_classes: int | None, **overrides) -> LoadedModel:
    cfg = ckpt.config
    state_dict = current_names(ckpt.state_dict)
    arch = arch or cfg.get("arch") or architecture_of(state_dict) or DEFAULT_ARCH
    if num_classes is None:
        num_classes = int(cfg.get("num_classes") or (len(ckpt.class_names) if ckpt.class_names else COCO_NUM_CLASSES))
    kwargs = {**cfg.get("model", {}), **overrides}
    what = f"{arch} with {num_classes} classes"
    try:
        model = build_model(arch, num_classes, **kwargs)
    except (TypeError, ValueError) as exc:  # the checkpoint's options do not fit the architecture asked for
        raise CheckpointError(f"checkpoint does not match {what}: {exc}") from None
    check_compatible(model, state_dict, what)
    model.load_state_dict(state_dict, strict=False)
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
