"""export/onnx_ops.py: each custom op exported to ONNX alone, run in ONNX Runtime on a second input shape."""

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

from export.onnx_ops import translation_table


class RoiAlign(nn.Module):
    def __init__(self, sampling_ratio: int, aligned: bool):
        super().__init__()
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return torch.ops.maskrcnn.roi_align(features, rois, 0.25, 7, 6, self.sampling_ratio, self.aligned)


class MulticlassNms(nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.ops.maskrcnn.multiclass_nms(boxes, scores, 12, 0.3, 0.2)


def _export(module: nn.Module, sample: tuple[torch.Tensor, ...], dynamic_shapes: dict) -> onnx.ModelProto:
    program = torch.onnx.export(
        module.eval(),
        sample,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=translation_table(),
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    return program.model_proto


def _run(graph_model: onnx.ModelProto, *inputs: torch.Tensor) -> list:
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs, strict=True)})


def _custom_domains(graph_model: onnx.ModelProto) -> set[str]:
    return {node.domain for node in graph_model.graph.node} - {"", "ai.onnx"}


def _rois(k: int, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """[K, 5] RoIs in input pixels (stride 4), some crossing the map's border."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * torch.tensor([width * 4.0, height * 4.0]) - 8
    wh = torch.rand(k, 2, generator=g) * 100 + 0.5
    return torch.cat([torch.randint(0, batch, (k, 1), generator=g).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["fixed", "adaptive"])
def test_roi_align_runs_in_onnx_runtime_on_another_shape(sampling_ratio, aligned):
    """Fixed sampling, and adaptive sampling (ONNX's sampling_ratio=0: the RoIs here take 1 to 5 samples
    per bin side at 7 x 6 bins on a quarter-scale map, so several counts occur in one call)."""
    sample = (torch.randn(2, 4, 16, 20), _rois(6, 2, 16, 20, seed=0))
    dims = {"features": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}, "rois": {0: Dim("rois")}}
    graph_model = _export(RoiAlign(sampling_ratio, aligned), sample, dims)
    (node,) = [n for n in graph_model.graph.node if n.op_type == "RoiAlign"]
    attributes = {a.name: a for a in node.attribute}
    assert attributes["coordinate_transformation_mode"].s.decode() == ("half_pixel" if aligned else "output_half_pixel")
    assert attributes["sampling_ratio"].i == sampling_ratio
    assert not _custom_domains(graph_model)
    features, rois = torch.randn(3, 4, 24, 18), _rois(40, 3, 24, 18, seed=1)
    (ours,) = _run(graph_model, features, rois)
    expected = torch.ops.maskrcnn.roi_align(features, rois, 0.25, 7, 6, sampling_ratio, aligned)
    assert ours.shape == (40, 4, 7, 6)
    torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=1e-5, atol=1e-5)


def _nms_inputs(b: int, c: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes crowded into a 60 px square: NMS at IoU 0.3 keeps about 11 of the 70 per group, some groups hit the cap."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, n, 2, generator=g) * 30
    return torch.cat([xy, xy + 10 + torch.rand(b, n, 2, generator=g) * 20], -1), torch.rand(b, c, n, generator=g)


def test_multiclass_nms_runs_in_onnx_runtime_on_another_shape():
    batch, boxes = Dim("batch"), Dim("boxes")
    dims = {"boxes": {0: batch, 1: boxes}, "scores": {0: batch, 1: Dim("classes"), 2: boxes}}
    graph_model = _export(MulticlassNms(), _nms_inputs(2, 3, 20, seed=0), dims)
    assert [n.op_type for n in graph_model.graph.node if n.op_type == "NonMaxSuppression"] == ["NonMaxSuppression"]
    assert not _custom_domains(graph_model)
    boxes, scores = _nms_inputs(3, 4, 70, seed=1)
    (ours,) = _run(graph_model, boxes, scores)
    expected = torch.ops.maskrcnn.multiclass_nms(boxes, scores, 12, 0.3, 0.2)
    assert expected.shape[0] > 3 * 4
    assert torch.equal(torch.from_numpy(ours), expected)
