"""Verification on the deep networks users bring: no false alarm on a correct fold, every
folded layer checked where it is, and a defect found and named where it is.

The networks are faithful small versions of public definitions (benchmarks/deep_nets.py):
torchvision's bottleneck ResNet-50 (all 50 layers, narrow), a timm CSPDarknet stage, a timm
DPN dual-path network, timm LeViT-128S's attention and MLP blocks with Linear-BN on tokens, and
a 12-32-16-3 MLP whose hidden units standard-normal inputs never reach.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from benchmarks.deep_nets import DPN, CSPDarknet, LeViT, masked_mlp, raw_feature_mlp
from benchmarks.nets import ResNet50, train_statistics
from bnexport.cli import main
from models.unfolded import export_unfolded


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _save(model: nn.Module, shape: tuple, path) -> None:
    x = torch.randn(2, *shape)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dyn), str(path))


def _scale_channel(src, dst, weight: str, channel: int, factor: float) -> None:
    model = onnx.load(str(src))
    (tensor,) = [t for t in model.graph.initializer if t.name == weight]
    array = numpy_helper.to_array(tensor).copy()
    array[channel] *= factor
    tensor.CopyFrom(numpy_helper.from_array(array, weight))
    onnx.save(model, str(dst))


DEEP = {
    # torchvision's ResNet-50: 53 conv-BN pairs in [3, 4, 6, 3] bottlenecks
    "resnet50": (lambda: ResNet50(classes=10, base=8), (3, 32, 32)),
    # timm's CSPDarknet: cross stages with split, DarkBlocks, transitions and concat
    "cspdarknet": (lambda: CSPDarknet(base=8, depths=(1, 1, 2)), (3, 32, 32)),
    # timm's DPN: pre-activation BN-ReLU-conv units, residual and dense paths
    "dpn": (lambda: DPN(width=8, blocks=(2, 2, 3, 1)), (3, 32, 32)),
    # timm's LeViT-128S: Linear-BN on tokens, attention biases, Hardswish
    "levit": (lambda: LeViT(dim=64, depth=2, resolution=2, classes=10), (3, 32, 32)),
}


_FOLDED: dict = {}


def _folded(family: str, tmp_path_factory):
    """The family's network saved as a program and folded by `bnexport fold`, once per run:
    (family, pt2, onnx, JSON report, exit code, output)."""
    if family not in _FOLDED:
        build, shape = DEEP[family]
        torch.manual_seed(0)
        model = train_statistics(build(), (8, *shape))
        work = tmp_path_factory.mktemp(family)
        pt2, out, report = work / "m.pt2", work / "m.onnx", work / "r.json"
        _save(model, shape, pt2)
        code, text = _invoke("fold", pt2, "-o", out, "--json", report)
        _FOLDED[family] = family, pt2, out, json.loads(report.read_text()), code, text
    return _FOLDED[family]


@pytest.fixture(scope="module", params=sorted(DEEP))
def deep(request, tmp_path_factory):
    return _folded(request.param, tmp_path_factory)


def test_a_correct_fold_of_a_deep_network_passes(deep):
    _, _, _, data, code, text = deep
    assert code == 0, text
    layers = data["verify"]["layers"]
    assert len(layers) == data["batchnorm"]["folded"] > 0
    assert all(row["passed"] for row in layers)
    assert {"name", "max_abs_err", "max_rel_err", "worst_channel", "passed"} <= set(layers[0])
    assert "folded layers match the original where they are" in text


def test_one_channel_off_by_a_thousandth_is_found_and_named(deep, tmp_path):
    _, pt2, out, data, _, _ = deep
    # a layer whose weight the export keeps by name (a Linear on tokens becomes a MatMul by a
    # transposed copy of its weight)
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    folded = [
        d
        for d in data["batchnorm"]["layers"]
        if d["direction"] == "preceding" and f"{d['into']}.weight" in names
    ]
    target = folded[len(folded) // 2]["into"]
    bad = tmp_path / "bad.onnx"
    _scale_channel(out, bad, f"{target}.weight", 1, 1.001)
    code, text = _invoke("verify", pt2, bad, "--json", tmp_path / "v.json")
    assert code == 1, text
    verify = json.loads((tmp_path / "v.json").read_text())["verify"]
    failed = [row for row in verify["layers"] if not row["passed"]]
    assert [row["name"] for row in failed] == [target]
    assert failed[0]["worst_channel"] == 1
    assert f"first diverging layer: {target}" in text and "channel 1:" in text


def test_an_unfolded_export_of_the_same_program_passes_verify(deep, tmp_path):
    """The plain export's own float32 rounding is no defect (no false alarm)."""
    family, pt2, _, _, _, _ = deep
    if family not in ("resnet50", "levit"):
        pytest.skip("one CNN and one transformer suffice: ResNet-50 and LeViT")
    plain = tmp_path / "plain.onnx"
    export_unfolded(pt2, plain)
    code, text = _invoke("verify", pt2, plain)
    assert code == 0, text


def test_a_defect_behind_a_relu_is_caught_at_its_layer(tmp_path):
    """Swapping two biases of the middle Linear: the input BN's statistics put the inputs
    where the model works, and the per-layer check sees the Linear before its ReLU."""
    model = masked_mlp()
    pt2, out = tmp_path / "mlp.pt2", tmp_path / "mlp.onnx"
    _save(model, (12,), pt2)
    code, text = _invoke("fold", pt2, "-o", out, "--json", tmp_path / "r.json")
    assert code == 0, text
    random = json.loads((tmp_path / "r.json").read_text())["verify"]["random"]
    assert random["source"] == "the running statistics of net.0"
    assert random["samples"] >= 256  # a small MLP affords hundreds of rows
    onnx_model = onnx.load(str(out))
    (bias,) = [t for t in onnx_model.graph.initializer if t.name == "net.4.bias"]
    array = numpy_helper.to_array(bias).copy()
    array[[3, 7]] = array[[7, 3]]
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    onnx.save(onnx_model, str(tmp_path / "swapped.onnx"))
    code, text = _invoke("verify", pt2, tmp_path / "swapped.onnx")
    assert code == 1 and "first diverging layer: net.4 (with net.5 folded in)" in text, text
    _scale_channel(out, tmp_path / "scaled.onnx", "net.4.weight", 2, 1.01)
    code, text = _invoke("verify", pt2, tmp_path / "scaled.onnx")
    assert code == 1 and "first diverging layer: net.4" in text and "channel 2:" in text, text


def test_float32_rounding_of_the_original_is_measured_not_taken_for_a_defect(tmp_path):
    pt2, out = tmp_path / "m.pt2", tmp_path / "m.onnx"
    _save(raw_feature_mlp(), (16,), pt2)
    code, text = _invoke(
        "fold", pt2, "-o", out, "--atol", "1e-6", "--rtol", "1e-5", "--json", tmp_path / "a.json"
    )
    assert code == 1, text  # the fixed tolerance calls the correct fold wrong
    code, text = _invoke("fold", pt2, "-o", out, "--json", tmp_path / "b.json")
    assert code == 0, text
    verify = json.loads((tmp_path / "b.json").read_text())["verify"]
    assert verify["reference_dtype"] == "float64" and verify["factor"] == 3.0
    (o,) = verify["outputs"]
    assert o["max_abs_err"] < o["original_err"]  # the fold is closer to float64 than float32
    assert "measured against the model run in float64" in text
    # a defect well above the model's own float32 resolution (6e-4 of the output scale here)
    _scale_channel(out, tmp_path / "bad.onnx", "fc1.weight", 0, 1.01)
    code, text = _invoke("verify", pt2, tmp_path / "bad.onnx")
    assert code == 1 and "first diverging layer: fc1" in text, text


def test_an_onnx_fold_defect_is_located(tmp_path, tmp_path_factory):
    _, pt2, _, _, _, _ = _folded("resnet50", tmp_path_factory)
    unfolded = tmp_path / "m.unfolded.onnx"
    export_unfolded(pt2, unfolded)
    folded = tmp_path / "m.folded.onnx"
    code, text = _invoke("fold", unfolded, "-o", folded, "--json", tmp_path / "r.json")
    assert code == 0, text
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert len(verify["layers"]) == 53 and all(r["passed"] for r in verify["layers"])
    weights = [
        t.name
        for t in onnx.load(str(folded), load_external_data=False).graph.initializer
        if t.name.endswith("conv2.weight")
    ]
    _scale_channel(folded, tmp_path / "bad.onnx", weights[5], 3, 1.001)
    code, text = _invoke("verify", unfolded, tmp_path / "bad.onnx", "--json", tmp_path / "v.json")
    assert code == 1, text
    failed = [
        r
        for r in json.loads((tmp_path / "v.json").read_text())["verify"]["layers"]
        if not r["passed"]
    ]
    assert len(failed) == 1 and failed[0]["worst_channel"] == 3, failed
    assert "first diverging layer:" in text


def test_a_file_without_records_is_mapped_by_tensor_names(tmp_path, tmp_path_factory):
    """`verify` of a file bnexport did not write: its folds are found by the tensor names the
    exporter kept, and the BNs it cannot place are named."""
    _, pt2, out, _, code, text = _folded("resnet50", tmp_path_factory)
    assert code == 0, text
    stripped = onnx.load(str(out))
    del stripped.metadata_props[:]
    onnx.save(stripped, str(tmp_path / "bare.onnx"))
    code, text = _invoke("verify", pt2, tmp_path / "bare.onnx", "--json", tmp_path / "v.json")
    assert code == 0, text
    layers = json.loads((tmp_path / "v.json").read_text())["verify"]["layers"]
    assert len(layers) == 53 and all(r["passed"] for r in layers)
    assert np.isfinite([r["max_rel_err"] for r in layers]).all()


def test_an_onnx_mlp_is_verified_on_hundreds_of_rows_from_its_input_bn(tmp_path):
    pt2, unfolded = tmp_path / "mlp.pt2", tmp_path / "mlp.unfolded.onnx"
    _save(masked_mlp(), (12,), pt2)
    export_unfolded(pt2, unfolded)
    code, text = _invoke("fold", unfolded, "-o", tmp_path / "f.onnx", "--json", tmp_path / "r.json")
    assert code == 0, text
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verify["random"]["samples"] >= 256
    assert verify["random"]["source"].startswith("the running statistics of")
    assert len(verify["layers"]) == 3 and all(r["passed"] for r in verify["layers"])
