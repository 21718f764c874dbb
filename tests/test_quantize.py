"""python -m export.quantize on the session's tiny model: the recipe's rewrite, the CLI, its bar and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from contract import OUTPUT_NAMES, GraphMetadata
from export.exporter import load_weights_fp32, sample_batch
from export.quantize.__main__ import main as quantize_main
from export.quantize.recipes import FAMILIES, GEOMETRY, RECIPES, WEIGHTED_OPS, node_families
from export.quantize.rewrites import masks_as_multiplies, upsampling_as_conv
from model.data.shapes import CALIBRATION_SEED, write_coco
from service.core.runtime import OnnxModel
from service.core.settings import DEFAULT_MODEL_PATH

CALIBRATION = 3
VERIFY = 2
DEMO_CALIBRATION = 8
DEMO_VERIFY = 12
# Random weights score every detection about alike, so int8 rounding reorders them: the success path
# takes a bar the tiny model can meet (every detection compared, none required to match).
LENIENT = ["--verify-threshold", "0", "--min-matched", "0", "--min-mask-iou", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of PNG shapes images (JPEG/PNG files are all the CLI reads; the annotations are ignored)."""
    return write_coco(tmp_path_factory.mktemp("calibration"), num=CALIBRATION + VERIFY, seed=3).parent


@pytest.fixture(scope="module")
def quantized(tiny_onnx_model: Path, images: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny.int8.onnx"
    argv = ["--model", str(tiny_onnx_model), "--calibration", str(images), "--out", str(out),
            "--num-images", str(CALIBRATION), "--num-verify", str(VERIFY), *LENIENT]
    assert quantize_main(argv) == 0
    return out


def float_graph(path: Path) -> onnx.ModelProto:
    graph_model = onnx.load(str(path))
    load_weights_fp32(graph_model)
    return graph_model


def run(graph_model: onnx.ModelProto, images: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {"images": images, "image_sizes": sizes}),
                    strict=True))


def test_families_put_the_padding_masks_in_geometry(tiny_onnx_model: Path) -> None:
    graph_model = float_graph(tiny_onnx_model)
    families = node_families(graph_model)
    by_name = {node.name: node for node in graph_model.graph.node}
    weighted = {name: fam for name, fam in families.items() if by_name[name].op_type in WEIGHTED_OPS}
    # The 1x1 convolutions of ones that spread each padding mask over the channels are geometry ...
    geometry = [name for name, fam in weighted.items() if fam == GEOMETRY]
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in graph_model.graph.initializer}
    assert geometry and all((weights[by_name[name].input[1]] == 1).all() for name in geometry)
    # ... and every module of the model has its weighted layers.
    assert set(weighted.values()) == set(FAMILIES) - {"other"}


def test_masks_as_multiplies_changes_no_output_on_a_padded_batch(tiny_onnx_model: Path) -> None:
    """The rewrite removes every mask-spreading convolution and changes no output, on a padded batch of
    mixed sizes (where the masks matter)."""
    original = float_graph(tiny_onnx_model)
    rewritten = float_graph(tiny_onnx_model)
    multiplies = masks_as_multiplies(rewritten)
    onnx.checker.check_model(rewritten)
    families = node_families(rewritten)
    assert multiplies and {families[name] for name in multiplies} == {"backbone", "fpn"}
    assert GEOMETRY not in {families[n.name] for n in rewritten.graph.node if n.op_type == "Conv"}
    images, sizes = (t.numpy() for t in sample_batch([(320, 416), (224, 288)], seed=5))
    before, after = run(original, images, sizes), run(rewritten, images, sizes)
    assert (before["num_detections"] > 0).all()
    np.testing.assert_array_equal(before["labels"], after["labels"])
    np.testing.assert_allclose(before["boxes"], after["boxes"], atol=1e-3)
    np.testing.assert_allclose(before["scores"], after["scores"], atol=1e-5)


def test_upsampling_as_conv_changes_no_output(tiny_onnx_model: Path) -> None:
    """The mask predictor's 2x2 stride-2 ConvTranspose (and its ReLU) rewritten as a 1x1 convolution, ReLU and
    DepthToSpace: no ConvTranspose is left and the masks, the only output it feeds, are the same to float
    rounding; the other outputs are untouched."""
    original = float_graph(tiny_onnx_model)
    rewritten = float_graph(tiny_onnx_model)
    convs = upsampling_as_conv(rewritten)
    onnx.checker.check_model(rewritten)
    ops = [node.op_type for node in rewritten.graph.node]
    assert len(convs) == 1 and "ConvTranspose" not in ops and "DepthToSpace" in ops
    images, sizes = (t.numpy() for t in sample_batch([(320, 416), (224, 288)], seed=5))
    before, after = run(original, images, sizes), run(rewritten, images, sizes)
    assert (before["num_detections"] > 0).all()
    for name in ("boxes", "scores", "labels", "num_detections"):
        np.testing.assert_array_equal(before[name], after[name])
    np.testing.assert_allclose(before["masks"], after["masks"], atol=1e-5)


def test_cli_writes_a_servable_int8_graph_with_its_metadata(tiny_onnx_model: Path, quantized: Path) -> None:
    graph_model = onnx.load(str(quantized))
    ops = {node.op_type for node in graph_model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph_model.graph.initializer)
    # The input's metadata, unchanged, plus the quantization entry.
    source = {p.key: p.value for p in onnx.load(str(tiny_onnx_model)).metadata_props}
    props = {p.key: p.value for p in graph_model.metadata_props}
    assert {k: v for k, v in props.items() if k != "quantization"} == source
    entry = json.loads(GraphMetadata.from_props(props, "x").quantization)
    assert entry["recipe"] == "backbone+heads" and entry["calibration_images"] == CALIBRATION
    assert GEOMETRY in entry["float"] and "backbone" in entry["int8"]
    assert quantized.stat().st_size < tiny_onnx_model.stat().st_size / 2
    # The service's runtime loads it unchanged and answers with the graph's outputs.
    model = OnnxModel(quantized)
    assert model.metadata.quantization == props["quantization"]
    rng = np.random.default_rng(0)
    preds = model.predict([rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)], score_threshold=0.0)
    assert preds[0].masks.shape[1:] == (28, 28) and len(preds[0].boxes) > 0


@pytest.mark.slow
def test_cli_refuses_a_graph_below_the_bar_and_leaves_no_file(
    tiny_onnx_model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "refused.onnx"
    argv = ["--model", str(tiny_onnx_model), "--calibration", str(images), "--out", str(out),
            "--num-images", str(CALIBRATION), "--num-verify", str(VERIFY), "--verify-threshold", "0",
            "--min-matched", "1", "--min-mask-iou", "1"]
    assert quantize_main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: int8 graph below the bar") and "\n" not in error
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("few_images", "need 3 for calibration and 2 more, held out"),
        ("not_a_model", "not an ONNX model"),
        ("no_detections", "nothing to verify"),
    ],
)
def test_cli_errors_are_one_line_and_leave_no_file(
    case: str, message: str, tiny_onnx_model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, folder, extra = tiny_onnx_model, images, []
    if case == "few_images":
        folder = tmp_path / "few"
        folder.mkdir()
        for path in sorted(images.rglob("*.png"))[:4]:
            (folder / path.name).write_bytes(path.read_bytes())
    elif case == "not_a_model":
        model = tmp_path / "garbage.onnx"
        model.write_bytes(b"not a model")
    else:
        extra = ["--verify-threshold", "1.01"]  # no score reaches it
    out = tmp_path / "out" / "int8.onnx"
    argv = ["--model", str(model), "--calibration", str(folder), "--out", str(out),
            "--num-images", str(CALIBRATION), "--num-verify", str(VERIFY), *extra]
    assert quantize_main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists() and not (out.parent.exists() and list(out.parent.iterdir()))


@pytest.fixture(scope="module")
def shapes_images(tmp_path_factory) -> Path:
    """Held-out shapes images for the trained demo model (neither its training's nor its validation's)."""
    folder = tmp_path_factory.mktemp("shapes")
    return write_coco(folder, num=DEMO_CALIBRATION + DEMO_VERIFY, seed=CALIBRATION_SEED).parent


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "passes"), [("backbone+heads", True), ("every-conv", False)])
def test_the_documented_bar_on_the_trained_demo_model(
    recipe: str, passes: bool, shapes_images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The default recipe meets the default bar on a trained model; quantizing every Conv (the padding masks'
    included) loses every detection and is refused."""
    out = tmp_path / "demo.int8.onnx"
    argv = ["--model", str(DEFAULT_MODEL_PATH), "--calibration", str(shapes_images), "--out", str(out),
            "--recipe", recipe, "--num-images", str(DEMO_CALIBRATION), "--num-verify", str(DEMO_VERIFY)]
    assert quantize_main(argv) == (0 if passes else 1)
    assert out.exists() == passes
    if not passes:
        assert " 0/" in capsys.readouterr().err  # no float32 detection matched


def test_every_recipe_names_known_families() -> None:
    for recipe in RECIPES.values():
        assert set(recipe.families) <= set(FAMILIES), recipe.name
