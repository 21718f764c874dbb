"""export/exporter.py weight transforms: batch norms folded into convolutions, float16 weight storage."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from export.exporter import fold_batch_norms, load_weights_fp32, round_weights_to_fp16, store_weights_fp16


def _randomize(bn: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return bn


def _conv_bn(norm: type[nn.Module], bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)]
    return nn.Sequential(convs[0], _randomize(norm(4)), nn.ReLU(), nn.Sequential(convs[1], _randomize(norm(6)))).eval()


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_module_computes_the_same(norm, bias):
    module = _conv_bn(norm, bias)
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        expected = module(x)
        folded = fold_batch_norms(module)(x)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_folding_keeps_float64_and_is_exact_there():
    """The exporter's verification runs the folded model in float64 (float32's own noise is measured
    against it): the fold must keep the dtype, and in float64 it is exact to rounding."""
    module = _conv_bn(nn.BatchNorm2d, bias=True).double()
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = module(x)
        folded = fold_batch_norms(module)
        out = folded(x)
    assert folded[0].weight.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
def test_batch_norms_become_identity(norm):
    folded = fold_batch_norms(_conv_bn(norm, bias=False))
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in folded.modules())
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[3][1], nn.Identity)
    conv = folded[3][0]
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (2, 2), (2, 2), 2)
    assert conv.bias is not None


def test_batch_norm_after_something_else_is_kept():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), _randomize(nn.BatchNorm2d(4))).eval()
    assert isinstance(fold_batch_norms(module)[2], nn.BatchNorm2d)


def test_round_weights_to_fp16_makes_every_float_representable():
    module = _conv_bn(nn.BatchNorm2d, bias=True)
    round_weights_to_fp16(module)
    tensors = list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]
    assert tensors and all(torch.equal(t, t.half().float()) for t in tensors)
    assert module[1].num_batches_tracked.dtype == torch.int64


def _conv_graph(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """X -> Conv(W, B) -> Reshape(shape) -> Y, the shape an int64 initializer."""
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["conv", "shape"], ["Y"]),
    ]
    initializers = [
        numpy_helper.from_array(weight, "W"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 5, 6])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, None])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(graph_model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x})[0]


def test_store_weights_fp16_halves_large_initializers_only():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)  # 1152 values: stored as float16
    bias = rng.normal(size=16).astype(np.float32)  # 16 values: stays float32
    graph_model = _conv_graph(weight, bias)
    store_weights_fp16(graph_model)
    onnx.checker.check_model(graph_model)
    types = {init.name: init.data_type for init in graph_model.graph.initializer}
    assert types == {"W__fp16": TensorProto.FLOAT16, "B": TensorProto.FLOAT, "shape": TensorProto.INT64}
    cast = graph_model.graph.node[0]
    assert (cast.op_type, list(cast.input), list(cast.output)) == ("Cast", ["W__fp16"], ["W"])
    assert helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT


def test_fp16_file_computes_like_the_rounded_float32_weights():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    x = rng.normal(size=(1, 8, 5, 6)).astype(np.float32)
    stored = _conv_graph(weight, bias)
    store_weights_fp16(stored)
    rounded = _conv_graph(weight.astype(np.float16).astype(np.float32), bias)
    np.testing.assert_array_equal(_run(stored, x), _run(rounded, x))
    assert not np.array_equal(_run(stored, x), _run(_conv_graph(weight, bias), x))


def test_load_weights_fp32_undoes_the_storage_and_names_limit_it():
    """load_weights_fp32 gives back float32 initializers under the weights' own names, without the Casts
    (what ONNX Runtime's quantizer needs to find weights), with the values the Casts produced."""
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    bias = rng.normal(size=16).astype(np.float32)
    graph_model = _conv_graph(weight, bias)
    store_weights_fp16(graph_model, names={"B"})  # B is too small anyway: nothing is stored half-size
    assert all(init.data_type != TensorProto.FLOAT16 for init in graph_model.graph.initializer)
    store_weights_fp16(graph_model, names={"W"})
    assert load_weights_fp32(graph_model) == ["W"]
    onnx.checker.check_model(graph_model)
    assert "Cast" not in {node.op_type for node in graph_model.graph.node}
    loaded = {init.name: onnx.numpy_helper.to_array(init) for init in graph_model.graph.initializer}
    np.testing.assert_array_equal(loaded["W"], weight.astype(np.float16).astype(np.float32))
