"""Fine-tuning's start: torchvision's v1 (legacy names) and v2 state dicts and an ImageNet ResNet load into a
model with another class count with every tensor but the predictor layers equal to the file's; a file of
another architecture is refused with the tensor names; weights by name through a temporary TORCH_HOME;
the architecture recognized from a file's keys; frozen stages; the configs that would mislead refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import get_weight

from model import build_model
from model.checkpoint import CheckpointError, architecture_of, load_model, torchvision_cache_path
from model.fine_tune import (
    PREDICTOR_PREFIXES,
    freeze_backbone_stages,
    load_initial_weights,
    resolve_initial_weights,
)

V1 = "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
ROOT = Path(__file__).resolve().parents[1]


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's parameter names before 0.12, as its v1 COCO file still has them."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\2", key)
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", key)
        key = re.sub(
            r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$",
            lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}",
            key,
        )
        renamed[key] = value
    return renamed


@pytest.fixture(scope="module")
def v1_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return legacy_names(model.state_dict())


def _assert_all_but_predictors_equal(model: torch.nn.Module, file_state: dict[str, torch.Tensor]) -> None:
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked") or name.startswith(PREDICTOR_PREFIXES):
            continue
        assert torch.equal(value, file_state[name]), name


def test_v1_file_with_legacy_names_loads_all_but_the_predictors(tmp_path, v1_state):
    assert "backbone.fpn.inner_blocks.0.weight" in v1_state and "rpn.head.conv.weight" in v1_state
    torch.save(v1_state, tmp_path / "maskrcnn_resnet50_fpn_coco.pth")
    weights = resolve_initial_weights(tmp_path / "maskrcnn_resnet50_fpn_coco.pth")
    assert (weights.kind, weights.arch) == ("detection", "r50_fpn")
    model = build_model("r50_fpn", num_classes=3)
    report = load_initial_weights(model, weights)
    assert sorted(report.fresh) == sorted(report.unused) == sorted(
        k for k in model.state_dict() if k.startswith(PREDICTOR_PREFIXES)
    )
    assert len(report.fresh) == 6 and not report.unexplained
    _assert_all_but_predictors_equal(model, weights.state_dict)
    assert "roi_heads.box_predictor" in report.table() and "backbone.fpn" in report.table()


def test_v2_file_loads_and_is_recognized(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    torch.save(state, tmp_path / "v2.pth")
    weights = resolve_initial_weights(tmp_path / "v2.pth")
    assert weights.arch == "r50_fpn_v2"
    model = build_model("r50_fpn_v2", num_classes=4)
    report = load_initial_weights(model, weights)
    assert len(report.fresh) == 6 and not report.unexplained
    _assert_all_but_predictors_equal(model, state)
    assert load_model(tmp_path / "v2.pth").arch == "r50_fpn_v2"  # export needs no --arch for a v2 file


def test_imagenet_classifier_loads_into_the_body(tmp_path):
    torch.manual_seed(2)
    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    model = build_model("r50_fpn", num_classes=3, norm="bn")
    report = load_initial_weights(model, resolve_initial_weights(tmp_path / "resnet50.pth"))
    assert report.unused == ["fc.bias", "fc.weight"] and not report.unexplained
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[f"backbone.body.{key}"], value), key


def test_a_file_of_another_architecture_is_refused_with_the_names(tmp_path, v1_state):
    torch.save(v1_state, tmp_path / "v1.pth")
    model = build_model("r50_fpn_v2", num_classes=3)
    with pytest.raises(CheckpointError, match=r"left fresh or unused .*backbone\.fpn\.") as info:
        load_initial_weights(model, resolve_initial_weights(tmp_path / "v1.pth"))
    assert "--allow-fresh-weights" in str(info.value)
    report = load_initial_weights(model, resolve_initial_weights(tmp_path / "v1.pth"), allow_fresh=True)
    assert len(report.unexplained) > 6


def test_weights_by_name_from_the_cache(tmp_path, v1_state, monkeypatch):
    """A torchvision weights name goes through its weights API: here from a temporary TORCH_HOME cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = torchvision_cache_path(get_weight(V1).url)
    cached.parent.mkdir(parents=True)
    torch.save(v1_state, cached)
    weights = resolve_initial_weights(V1)
    assert (weights.kind, weights.arch) == ("detection", "r50_fpn")
    report = load_initial_weights(build_model("r50_fpn", num_classes=2), weights)
    assert len(report.fresh) == 6 and not report.unexplained


def test_unknown_weights_name_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not a torchvision weights name"):
        resolve_initial_weights("MaskRCNN_ResNet50_FPN_Weights.NOPE")


def test_architecture_of_every_entry():
    from model.architectures import ARCHITECTURES

    for arch in ARCHITECTURES:
        slim = {"width": 16, "mask_channels": 16}
        if not arch.endswith("_c4"):
            slim.update(fpn_channels=32, representation_size=32)
        assert architecture_of(build_model(arch, 3, **slim).state_dict()) == arch


def test_frozen_stages():
    model = build_model("r18_fpn", num_classes=3, norm="bn", width=16, fpn_channels=32, representation_size=32,
                        mask_channels=16)
    assert freeze_backbone_stages(model, 3) == ["conv1", "bn1", "layer1"]
    body = model.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for m in (body.layer2, body.layer4, model.backbone.fpn) for p in m.parameters())
    assert isinstance(body.bn1, torchvision.ops.misc.FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="0..5"):
        freeze_backbone_stages(model, 6)


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_help_shows_the_values_of_the_config(tmp_path):
    done = _train_cli("--config", "configs/shapes_r18_cpu.json", "--help", cwd=ROOT)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "3000 (from configs/shapes_r18_cpu.json)" in text and "--val-data VAL_DATA default: None" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--synthetic", "4", "--model", '{"norm": "frozen_bn"}'], 'norm": "bn"'),
        (["--synthetic", "4", "--data", "somewhere", "--model", '{"norm": "bn"}'], "both synthetic"),
        (["--config", "configs/shapes_cpu.json"], "configs/shapes_cpu.json: no such file"),
        (["--resume", "--out-dir", "nowhere"], "no checkpoint at nowhere/last.pt"),
        (["--synthetic", "4", "--model", '{"norm": "bn"}', "--init-weights", "NoSuch_Weights.X"],
         "not a torchvision weights name"),
        (["--data", "tests", "--model", '{"norm": "bn"}'], "an images/ folder and one instances JSON"),
        (["--config", "pyproject.toml"], "pyproject.toml: not valid JSON"),
        (["--config", "tests/data/unknown_key.json"], "unknown config keys ['typo_key']"),
    ],
)
def test_configs_that_would_mislead_are_one_line(tmp_path, args, says):
    done = _train_cli(*args, "--out-dir", str(tmp_path / "run"), cwd=ROOT) if "--out-dir" not in args else _train_cli(
        *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in done.stderr and says in done.stderr, done.stderr


def _relabelled_shapes(root: Path, num: int, seed: int) -> Path:
    """Shapes in COCO format with another class set: circles are "round", every other shape "angular"."""
    import json

    from model.data.shapes import write_coco

    path = write_coco(root, num=num, seed=seed)
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann["category_id"] = 1 if ann["category_id"] == 1 else 2
    data["categories"] = [{"id": 1, "name": "round"}, {"id": 2, "name": "angular"}]
    path.write_text(json.dumps(data))
    return root


@pytest.mark.slow
def test_fine_tune_export_serve_chain(tmp_path, tiny_checkpoint):
    """The README's chain on a tiny model: fine-tune a 4-class checkpoint on a 2-class folder with validation,
    export best.pt, serve it, segment an image: the served classes are the new ones."""
    import json
    import time

    import httpx

    from tests.helpers import free_port

    train_data = _relabelled_shapes(tmp_path / "train", 3, seed=3)
    val_data = _relabelled_shapes(tmp_path / "val", 2, seed=1000)
    run = tmp_path / "run"
    model = '{"width": 32, "fpn_channels": 128, "representation_size": 256, "mask_channels": 128}'
    done = _train_cli("--data", str(train_data), "--val-data", str(val_data), "--init-weights", str(tiny_checkpoint),
                      "--out-dir", str(run), "--max-steps", "2", "--eval-every", "1", "--batch-size", "2",
                      "--min-size", "96", "--max-size", "128", "--device", "cpu", "--model", model, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "roi_heads.box_predictor" in done.stderr  # the init table
    assert (run / "best.pt").exists()
    graph = tmp_path / "mine.onnx"
    exported = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(run / "best.pt"), "--out",
                               str(graph)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert exported.returncode == 0, exported.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "service", "--model", str(graph), "--host", "127.0.0.1",
                               "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        image = next((train_data / "images").iterdir()).read_bytes()
        answer = httpx.post(f"{url}/segment", files={"image": ("a.png", image, "image/png")}, timeout=60)
        assert answer.status_code == 200, answer.text
        model_info = httpx.get(f"{url}/v2/models/mine", timeout=10)
        assert model_info.status_code == 200
        labels = {d["label"] for d in answer.json()["detections"]}
        assert labels <= {"round", "angular"}
        assert json.loads((run / "config.json").read_text())["num_classes"] == 3
    finally:
        server.terminate()
        server.wait(30)
