"""torchvision's weights by name (``python -m export --weights NAME``), offline: a state dict made here is
placed in a temporary TORCH_HOME under the file name torchvision's weights API expects, and exported
through that API; the architecture comes from the weights' builder and the class names from their meta.
The export is v2's (``r50_fpn_v2``): one graph, every batch norm folded, torchvision's detections.
Also: one line naming the file's place when there is no network, and torchvision's legacy names."""

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.models import get_weight

from export.__main__ import main as export_main
from export.exporter import run_onnx, run_torch, sample_batch
from export.verification import Rule, compare
from model import build_model
from model.checkpoint import load_model, torchvision_cache_path
from tests.helpers import free_port, torchvision_detections, torchvision_model

V1 = "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
V2 = "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
ROOT = Path(__file__).resolve().parents[1]
# A small input policy keeps the export fast; torchvision's transform leaves a 320 x 448 image as it is.
MIN_SIZE, MAX_SIZE = 320, 512
SCORE_THRESH = 0.06  # tens of detections (tests.helpers.CLASSIFIER_GAIN), none cut by the top-100 limit
IMAGE = (320, 448)


@pytest.fixture(scope="module")
def v2_export(tmp_path_factory) -> tuple[torch.nn.Module, Path, list[str]]:
    """torchvision's v2 model with random weights, its state dict cached as torchvision's COCO_V1 file, and
    the graph ``--weights`` exports from it (one R-50 export, shared by this file's tests)."""
    tv = torchvision_model("r50_fpn_v2", min_size=MIN_SIZE, max_size=MAX_SIZE, box_score_thresh=SCORE_THRESH)
    home = tmp_path_factory.mktemp("torch_home")
    out = tmp_path_factory.mktemp("v2") / "maskrcnn_v2.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        cached = torchvision_cache_path(get_weight(V2).url)
        assert cached.parent == home / "hub" / "checkpoints"
        cached.parent.mkdir(parents=True)
        torch.save(tv.state_dict(), cached)
        args = ["--weights", V2, "--out", str(out), "--min-size", str(MIN_SIZE), "--max-size", str(MAX_SIZE)]
        assert export_main([*args, "--score-threshold", str(SCORE_THRESH)]) == 0
    return tv, out, get_weight(V2).meta["categories"]


@pytest.mark.slow
def test_architecture_and_class_names_come_from_the_weights(v2_export):
    _, out, categories = v2_export
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["architecture"] == "r50_fpn_v2"
    assert json.loads(meta["class_names"]) == categories and categories[1] == "person"
    assert (meta["min_size"], meta["max_size"]) == (str(MIN_SIZE), str(MAX_SIZE))
    assert meta["verification"] == "float32 noise x4"


@pytest.mark.slow
def test_every_batch_norm_is_folded(v2_export):
    _, out, _ = v2_export
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in ops
    # The body's 53 convolutions, the FPN's 8, the RPN head's 4, the box head's 4 and the mask head's 5 at least.
    assert ops.count("Conv") >= 74 and {"RoiAlign", "NonMaxSuppression"} <= set(ops)


@pytest.mark.slow
def test_the_graph_gives_torchvisions_detections(v2_export):
    """ONNX Runtime's detections are torchvision's v2 model's on an image its transform leaves as it is: all
    paired, as close to the exact (float64) answer as float32's noise allows (torchvision being the float32
    run), and within the parity test's fixed tolerances too."""
    tv, out, _ = v2_export
    images, sizes = sample_batch([IMAGE], seed=11)
    got = run_onnx(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]), images, sizes)
    reference = torchvision_detections(tv, images[0])
    ours = build_model("r50_fpn_v2", 91, score_thresh=SCORE_THRESH).eval()
    ours.load_state_dict(tv.state_dict())
    exact = run_torch(ours.double(), images, sizes)
    verdict = Rule(SCORE_THRESH, 0.5).judge(compare(exact, reference, 0.5), compare(exact, got, 0.5))
    assert verdict.ok(), str(verdict)
    direct = compare(reference, got, 0.5)
    n = int(reference["num_detections"][0])
    assert 0 < n < 100 and direct.paired == n and not direct.unpaired
    assert direct.figures.box <= 1e-3 and direct.figures.score <= 1e-4 and direct.mask_iou >= 0.99


def test_without_network_one_line_says_where_to_put_the_file(tmp_path):
    """No network here (a proxy that refuses every connection): the download fails, and the one error line
    names the URL and the exact place in TORCH_HOME where torchvision's weights API looks for the file."""
    proxy = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy")}
    env |= {"TORCH_HOME": str(tmp_path / "home"), "HTTPS_PROXY": proxy, "https_proxy": proxy}
    out = tmp_path / "v1.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--weights", V1, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    weights = get_weight(V1)
    expected = tmp_path / "home" / "hub" / "checkpoints" / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert line.startswith(f"error: cannot download {weights.url}")
    assert line.endswith(f"put that file at {expected}")
    assert not out.exists()


@pytest.mark.parametrize(
    "name,status,message",
    [
        ("Nonsense_Weights.COCO_V1", 2, "not a torchvision weights name"),
        ("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", 1,
         "no architecture here loads torchvision's fasterrcnn_resnet50_fpn"),
    ],
)
def test_weights_we_cannot_load_are_refused_in_one_line(name, status, message, tmp_path, capsys):
    assert export_main(["--weights", name, "--out", str(tmp_path / "x.onnx")]) == status
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_legacy_parameter_names_load(tmp_path):
    """torchvision's v1 COCO file predates its modules' version 2: FPN blocks, the RPN head's convolution and
    the mask head's mask_fcn1..4 carry the old names. They load as today's names do."""
    torch.manual_seed(0)
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    legacy = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[key] = value
    assert len(set(legacy) - set(state)) == 16 + 2 + 8  # FPN blocks, RPN head convolution, mask head
    torch.save(legacy, tmp_path / "legacy.pth")
    loaded = load_model(tmp_path / "legacy.pth")
    assert loaded.arch == "r50_fpn"
    ours = loaded.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
