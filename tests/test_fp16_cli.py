"""`bnexport fold --fp16`: float16 weights and compute, out-of-range layers kept in float32,
verified against the float32 original, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from benchmarks.half import overflow_net, save_pt2
from bnexport.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _fold(*args) -> tuple[object, dict]:
    json_path = Path(args[args.index("-o") + 1]).with_suffix(".json")
    result = CliRunner().invoke(main, ["fold", *map(str, args), "--json", str(json_path)])
    report = json.loads(json_path.read_text()) if json_path.exists() else {}
    return result, report


def _weight_bytes(model: onnx.ModelProto) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for init in model.graph.initializer:
        n = onnx.numpy_helper.to_array(init).nbytes
        sizes[init.data_type] = sizes.get(init.data_type, 0) + n
    return sizes


def _io_types(model: onnx.ModelProto) -> set[int]:
    values = [*model.graph.input, *model.graph.output]
    return {v.type.tensor_type.elem_type for v in values}


@pytest.mark.parametrize(
    "name,classifier",
    [("digits_cnn", True), ("tabular_mlp", True), ("digits_autoencoder", False)],
)
def test_shipped_models_in_float16(name, classifier, tmp_path):
    """Each shipped model in float16, verified on its held-out split: the classifiers' argmax
    and accuracy agree with the float32 original; the autoencoder has no argmax to compare
    and its outputs stay within the float16 tolerance."""
    out = tmp_path / f"{name}.onnx"
    result, report = _fold(MODELS / f"{name}.pt2", "-o", out, "--fp16")
    assert result.exit_code == 0, result.output
    assert report["verdict"] == "passed" and report["verify"]["model_dtype"] == "float16"
    model = onnx.load(str(out))
    sizes = _weight_bytes(model)
    assert sizes.get(FLOAT16, 0) >= 0.9 * sum(sizes.values())
    assert _io_types(model) == {FLOAT}
    assert report["float16"]["kept_float32"] == []
    verify = report["verify"]
    assert verify["data"]["path"].endswith(f"{name}_test.npz") and verify["data"]["samples"] > 100
    if classifier:
        assert verify["data_argmax_agreement"] >= 0.995
        acc = verify["accuracy"]
        assert acc["n"] == verify["data"]["samples"]
        assert abs(acc["onnx"] - acc["original"]) <= 0.005
    else:
        assert verify.get("data_argmax_agreement") is None and verify.get("accuracy") is None
    assert verify["max_rel_err"] < 5e-3  # measured: 5e-4 for the classifiers, 2e-3 for the AE
    assert "float16: " in result.output and "tolerance for the float16 export" in result.output


def test_fp16_io_gives_float16_inputs_and_outputs(tmp_path):
    out = tmp_path / "mlp.onnx"
    result, report = _fold(MODELS / "tabular_mlp.pt2", "-o", out, "--fp16-io")
    assert result.exit_code == 0, result.output
    assert _io_types(onnx.load(str(out))) == {FLOAT16}
    assert set(report["float16"]["inputs"].values()) == {"float16"}


def test_out_of_range_layers_stay_float32_and_are_named(tmp_path):
    model, x = overflow_net()
    pt2, data = tmp_path / "overflow.pt2", tmp_path / "overflow_data.npz"
    save_pt2(model, x, pt2)
    np.savez(data, x=x)
    out = tmp_path / "overflow.onnx"
    result, report = _fold(pt2, "-o", out, "--fp16", "--data", data)
    assert result.exit_code == 0, result.output
    kept = {k["name"]: k["reason"] for k in report["float16"]["kept_float32"]}
    assert kept, report["float16"]
    assert any("beyond float16's largest finite value" in r for r in kept.values())
    assert any("on the verification inputs" in r for r in kept.values())
    for name in kept:
        assert f"kept in float32: {name}" in result.output
    # the kept nodes compute in float32 in the file; everything else in float16
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    assert set(kept) <= set(nodes)
    assert report["verify"]["passed"] and report["verify"]["max_rel_err"] < 5e-3


def test_fp16_of_a_half_precision_model_is_refused(tmp_path):
    program = torch.export.load(str(MODELS / "digits_cnn.pt2"))
    half = program.module().half()
    x = torch.randn(2, 1, 8, 8).half()
    pt2 = tmp_path / "half.pt2"
    torch.export.save(torch.export.export(half, (x,)), str(pt2))
    out = tmp_path / "half.onnx"
    result, _ = _fold(pt2, "-o", out, "--fp16")
    assert result.exit_code == 2
    assert "already computes in float16" in result.output and not out.exists()


def test_onnx_file_in_float16(tmp_path):
    out = tmp_path / "u.onnx"
    result, report = _fold(MODELS / "digits_cnn.unfolded.onnx", "-o", out, "--fp16")
    assert result.exit_code == 0, result.output
    assert report["onnx"]["batchnorm_nodes"] == 0 and report["verify"]["passed"]
    assert "converted to float16 the same way" in report["verify"]["original_err_of"]
    assert report["verify"]["data_argmax_agreement"] >= 0.995


class _TieNet(torch.nn.Module):
    """A 1x1 conv whose weights are a float16 midpoint (1 + 2**-11) and a BN whose scale is
    1 + 6.8e-9: the folded weight lies just above the midpoint, so rounding it once (float64 ->
    float16) gives 1 + 2**-10, while rounding through float32 first lands on the midpoint and
    then on 1.0."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(2)
        with torch.no_grad():
            self.conv.weight.fill_(1 + 2**-11)
            self.bn.running_var.fill_(1.0)
            self.bn.weight.fill_(float(np.float32(np.sqrt(1 + self.bn.eps))))

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("source", ["pt2", "onnx"])
def test_a_folded_weight_on_a_float16_tie_is_rounded_once(source, tmp_path):
    model = _TieNet().eval()
    w = np.float64(np.float32(1 + 2**-11)) * (
        np.float64(model.bn.weight[0].item()) / np.sqrt(1.0 + model.bn.eps)
    )
    assert np.float16(w) != np.float16(np.float32(w))  # the case this test is about
    x = torch.randn(2, 1, 4, 4)
    path = tmp_path / f"tie.{source}"
    if source == "pt2":
        dims = ({0: torch.export.Dim.AUTO},)
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), str(path))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False)
    out = tmp_path / "tie16.onnx"
    result, _ = _fold(path, "-o", out, "--fp16")
    assert result.exit_code == 0, result.output
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    weights = [v for v in inits.values() if v.dtype == np.float16 and v.ndim == 4]
    assert len(weights) == 1 and np.all(weights[0] == np.float16(w)), weights
