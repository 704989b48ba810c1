"""CLI-level tests of `bnexport fold` and `bnexport verify` on checkpoints saved here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.onnx._constants import ONNX_DEFAULT_OPSET

from bnexport.cli import main


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 4 - 2)
            m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 3 - 2))
            m.weight.data.copy_(torch.rand(n, generator=gen) * 4 - 2)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model.eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head_bn = nn.BatchNorm1d(6 * 8 * 8)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.head_bn(y.flatten(1)))


class TwoInputsDictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.lin = nn.Linear(5, 4)
        self.bn2 = nn.BatchNorm1d(4)

    def forward(self, signal, features):
        a = self.bn(self.conv(signal)).mean(-1)
        b = self.bn2(self.lin(features))
        return {"sum": a + b, "parts": (a, b)}


def _save_pt2(model: nn.Module, args: tuple, path) -> None:
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    torch.export.save(torch.export.export(model, args, dynamic_shapes=dyn), str(path))


@pytest.fixture(scope="module")
def cnn_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt2"
    torch.manual_seed(0)
    _save_pt2(_trained_like(SmallCNN()), (torch.randn(2, 1, 8, 8),), path)
    return path


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_fold_writes_verified_onnx_and_json(cnn_pt2, tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _invoke("fold", cnn_pt2, "-o", out, "--json", report, "--samples", "2")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "bn" in result.output and "head_bn" in result.output
    data = json.loads(report.read_text())
    assert set(data) >= {"model", "output", "batchnorm", "onnx", "verify"}
    assert data["batchnorm"]["total"] == 2 and data["batchnorm"]["folded"] == 2
    assert data["batchnorm"]["left"] == []
    # the export follows torch.onnx's own default opset
    expected = {"path": str(out), "opset": ONNX_DEFAULT_OPSET, "batchnorm_nodes": 0}
    assert data["onnx"] == {**data["onnx"], **expected}
    v = data["verify"]
    assert v["passed"] is True and v["samples"] == 2
    assert isinstance(v["max_abs_err"], float) and 0 <= v["max_rel_err"] < 1e-4
    assert {1, 4} == set(v["batch_sizes"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    folded = json.loads(meta["bnexport_folded"])
    assert {f["name"] for f in folded} == {"bn", "head_bn"}
    assert meta["bnexport_version"]


def test_opset_option_sets_the_export_opset(cnn_pt2, tmp_path):
    out = tmp_path / "m17.onnx"
    result = _invoke("fold", cnn_pt2, "-o", out, "--opset", "18", "--samples", "1")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    assert "opset 18" in result.output


def test_default_output_is_next_to_model_and_input_untouched(cnn_pt2, tmp_path):
    model = tmp_path / "net.pt2"
    model.write_bytes(cnn_pt2.read_bytes())
    before = model.read_bytes()
    result = _invoke("fold", model, "--samples", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "net.onnx").is_file()
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.pt2"]


def test_dynamic_batch_onnx_runs_at_any_batch(cnn_pt2, tmp_path):
    out = tmp_path / "m.onnx"
    assert _invoke("fold", cnn_pt2, "-o", out, "--samples", "1").exit_code == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 17):
        (y,) = sess.run(None, {sess.get_inputs()[0].name: np.zeros((batch, 1, 8, 8), "f4")})
        assert y.shape == (batch, 5)


def test_static_batch_fixes_the_batch_axis(cnn_pt2, tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _invoke(
        "fold",
        cnn_pt2,
        "-o",
        out,
        "--static-batch",
        "--input-shape",
        "4,1,8,8",
        "--json",
        report,
        "--samples",
        "1",
    )
    assert result.exit_code == 0, result.output
    dim0 = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 4 and not dim0.dim_param
    assert json.loads(report.read_text())["verify"]["batch_sizes"] == [4]


def test_verify_uses_the_static_batch_of_the_onnx_file(cnn_pt2, tmp_path):
    out = tmp_path / "m.onnx"
    args = ["--static-batch", "--input-shape", "4,1,8,8", "--samples", "1"]
    assert _invoke("fold", cnn_pt2, "-o", out, *args).exit_code == 0
    result = _invoke("verify", cnn_pt2, out, "--samples", "2")
    assert result.exit_code == 0, result.output
    assert "batch sizes [4]" in result.output


def test_multi_input_dict_output_end_to_end(tmp_path):
    torch.manual_seed(1)
    model = _trained_like(TwoInputsDictOut())
    path = tmp_path / "two.pt2"
    _save_pt2(model, (torch.randn(2, 3, 7), torch.randn(2, 5)), path)
    report = tmp_path / "r.json"
    result = _invoke("fold", path, "--json", report, "--samples", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["batchnorm"]["folded"] == 2
    assert len(data["verify"]["outputs"]) == 3
    assert all(o["max_rel_err"] < 1e-5 for o in data["verify"]["outputs"])
    sess = ort.InferenceSession(str(tmp_path / "two.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["signal", "features"]


def test_input_shapes_for_several_inputs_of_a_state_dict(tmp_path):
    """One --input-shape per forward argument, in order: the ONNX file's inputs take those
    shapes (batch dynamic), both BNs fold and the export verifies."""
    torch.manual_seed(2)
    (tmp_path / "twonets.py").write_text(
        "from tests.test_cli import TwoInputsDictOut\n\n"
        "def build():\n    return TwoInputsDictOut()\n"
    )
    model = _trained_like(TwoInputsDictOut())
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    result = _invoke(
        "fold",
        tmp_path / "w.pt",
        "--arch",
        tmp_path / "twonets.py:build",
        "--input-shape",
        "1,3,9",
        "--input-shape",
        "1,5",
        "--samples",
        "2",
    )
    assert result.exit_code == 0, result.output
    assert "BatchNorm: 2 before, 0 after (2 folded)" in result.output
    assert "verify: PASS" in result.output
    graph = onnx.load(str(tmp_path / "w.onnx")).graph
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in graph.input
    }
    assert [*shapes] == ["signal", "features"]
    assert shapes["signal"][1:] == [3, 9] and shapes["features"][1:] == [5]
    assert isinstance(shapes["signal"][0], str)  # the batch axis is dynamic


def test_data_file_gives_accuracy_and_agreement(cnn_pt2, tmp_path):
    gen = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=gen.normal(size=(50, 1, 8, 8)).astype("f4"), labels=gen.integers(0, 5, 50))
    report = tmp_path / "r.json"
    result = _invoke(
        "fold",
        cnn_pt2,
        "-o",
        tmp_path / "m.onnx",
        "--data",
        data,
        "--json",
        report,
        "--samples",
        "1",
    )
    assert result.exit_code == 0, result.output
    v = json.loads(report.read_text())["verify"]
    assert v["data_argmax_agreement"] == 1.0
    assert v["accuracy"]["n"] == 50
    assert v["accuracy"]["original"] == v["accuracy"]["onnx"]
    assert "accuracy on 50 labelled samples" in result.output


def test_verification_failure_exits_1_and_keeps_file(cnn_pt2, tmp_path):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    result = _invoke("fold", cnn_pt2, "-o", out, "--atol", "0", "--rtol", "0", "--json", report)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert out.is_file()
    assert json.loads(report.read_text())["verify"]["passed"] is False


def test_verify_accepts_matching_file(cnn_pt2, tmp_path):
    out = tmp_path / "m.onnx"
    assert _invoke("fold", cnn_pt2, "-o", out, "--samples", "1").exit_code == 0
    result = _invoke("verify", cnn_pt2, out, "--samples", "2")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


def test_verify_rejects_onnx_of_another_model(cnn_pt2, tmp_path):
    torch.manual_seed(5)
    other = tmp_path / "other.pt2"
    _save_pt2(_trained_like(SmallCNN(), seed=9), (torch.randn(2, 1, 8, 8),), other)
    out = tmp_path / "other.onnx"
    assert _invoke("fold", other, "-o", out, "--samples", "1").exit_code == 0
    result = _invoke("verify", cnn_pt2, out)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_verify_rejects_onnx_with_other_inputs(cnn_pt2, tmp_path):
    torch.manual_seed(6)
    mlp = tmp_path / "mlp.pt2"
    _save_pt2(
        _trained_like(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))), (torch.randn(2, 4),), mlp
    )
    out = tmp_path / "mlp.onnx"
    assert _invoke("fold", mlp, "-o", out, "--samples", "1").exit_code == 0
    result = _invoke("verify", cnn_pt2, out)
    assert result.exit_code == 1
    assert "FAIL" in result.output


def test_bad_usage_exits_2_and_writes_nothing(cnn_pt2, tmp_path):
    result = _invoke("fold", cnn_pt2, "-o", tmp_path / "m.onnx", "--samples", "0")
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_help_documents_exit_codes():
    result = _invoke("fold", "--help")
    assert result.exit_code == 0
    assert "Exit codes: 0" in result.output and "1 exported" in result.output
