"""Verification of float16 and bfloat16 checkpoints: against the model's float32 twin, with a
tolerance that follows the dtype; a bfloat16 file onnxruntime cannot run is verified through
its float32 twin. Real torch and onnxruntime throughout."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnexport.cli import main
from bnexport.defaults import DEFAULT_ATOL, DEFAULT_RTOL, HALF_ERROR_FACTOR
from bnexport.runs import RunOptions, run_fold

MODELS = Path(__file__).resolve().parent.parent / "models"
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# the keys of the JSON `verify` object of a float32 model whose export meets the fixed
# tolerance: those before half precision, plus the per-layer check and the random inputs
FLOAT32_VERIFY_KEYS = {
    "layers",
    "layer_rtol",
    "random",
    "passed",
    "max_abs_err",
    "max_rel_err",
    "samples",
    "atol",
    "rtol",
    "batch_sizes",
    "outputs",
    "accuracy",
    "data_argmax_agreement",
    "data",
    "reference",
}
FLOAT32_OUTPUT_KEYS = {"name", "max_abs_err", "max_rel_err", "scale", "argmax_agreement"}


def _invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


class BnMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 5),
        )

    def forward(self, x):
        return self.net(x)


class SmallVarCNN(nn.Module):
    """Conv-BN-ReLU twice and a linear head; its first BN has variances down to 1e-4, where
    a wrong fold (eps omitted, a variance off by 1e-3) changes weights by far more than
    float16 or bfloat16 round them."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _trained_like(model: nn.Module, low: float, seed: int = 0) -> nn.Module:
    """Running variances log-uniform in [10**low, 1], gammas in [0.25, 1.75]."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * -low + low))
            m.weight.data.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def _save_half(model: nn.Module, example: torch.Tensor, dtype: str, path: Path) -> Path:
    half = copy.deepcopy(model).to(HALF[dtype])
    args = (example.to(HALF[dtype]),)
    program = torch.export.export(half, args, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return path


def _digits_cnn() -> nn.Module:
    return torch.export.load(str(MODELS / "digits_cnn.pt2")).module()


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    """Each model in float16 and bfloat16, with the digits CNN's held-out data beside it."""
    root = tmp_path_factory.mktemp("half")
    made = {}
    for dtype in HALF:
        cnn = _save_half(_digits_cnn(), torch.randn(4, 1, 8, 8), dtype, root / f"cnn_{dtype}.pt2")
        shutil.copy(MODELS / "digits_cnn_test.npz", root / f"cnn_{dtype}_test.npz")
        made["cnn", dtype] = cnn
        mlp = _trained_like(BnMLP(), low=-2)
        made["mlp", dtype] = _save_half(mlp, torch.randn(4, 20), dtype, root / f"mlp_{dtype}.pt2")
    return made


@pytest.fixture(scope="module")
def folded_cnn16(half_models, tmp_path_factory):
    """`bnexport fold` of the float16 digits CNN: (exit code, text, JSON, ONNX file)."""
    out = tmp_path_factory.mktemp("fold16")
    onnx_file, report = out / "cnn.onnx", out / "report.json"
    code, text = _invoke("fold", half_models["cnn", "float16"], "-o", onnx_file, "--json", report)
    return code, text, json.loads(report.read_text()), onnx_file


def test_float16_digits_cnn_passes_with_the_dtype_tolerance(folded_cnn16):
    code, text, data, _ = folded_cnn16
    assert code == 0, text
    verify = data["verify"]
    assert data["verdict"] == "passed"
    assert verify["model_dtype"] == "float16"
    assert verify["reference_dtype"] == "float32"
    assert verify["verified_file"] == "ONNX file"
    assert verify["factor"] == HALF_ERROR_FACTOR["float16"]
    (out,) = verify["outputs"]
    # both errors are reported, against the float32 twin; the original's own is not zero
    assert 0 < out["original_err"] == verify["original_err"]
    assert 0 < out["max_abs_err"] <= out["tolerance"]
    assert out["tolerance"] == pytest.approx(
        HALF_ERROR_FACTOR["float16"] * out["original_err"]
        + DEFAULT_ATOL
        + DEFAULT_RTOL * out["scale"]
    )
    # the float32 tolerance alone would have refused this correct export
    assert out["max_abs_err"] > DEFAULT_ATOL + DEFAULT_RTOL * out["scale"]
    # the held-out digits: same accuracy, every prediction the same
    assert verify["data"]["samples"] == 450
    assert verify["accuracy"]["onnx"] == verify["accuracy"]["original"] > 0.95
    assert verify["data_argmax_agreement"] == 1.0
    assert "original err" in text and "export err" in text
    assert "tolerance for float16: export error <= 3 x the float16 original's own error (" in text
    assert "argmax agreement 100.00%" in text
    assert "verify: PASS" in text


def test_float16_mlp_passes_with_the_dtype_tolerance(half_models, tmp_path):
    report = run_fold(
        RunOptions(model=half_models["mlp", "float16"], output=tmp_path / "mlp.onnx", samples=6)
    )
    assert report.passed, report.verify
    v = report.verify
    assert (v.model_dtype, v.reference_dtype, v.verified_file) == (
        "float16",
        "float32",
        "ONNX file",
    )
    (out,) = v.outputs
    assert out.original_err > 0 and out.max_abs_err <= v.tolerance(out)
    assert report.fold is not None and len(report.fold.folded) == 2


def _twin_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("bnexport-twin-*")}


def test_bfloat16_digits_cnn_verifies_its_float32_twin(half_models, tmp_path):
    before = _twin_dirs()
    report = tmp_path / "report.json"
    onnx_file = tmp_path / "cnn.onnx"
    code, text = _invoke("fold", half_models["cnn", "bfloat16"], "-o", onnx_file, "--json", report)
    assert code == 0, text
    data = json.loads(report.read_text())
    verify = data["verify"]
    assert verify["verified_file"] == "float32 twin"
    assert verify["model_dtype"] == "bfloat16" and verify["reference_dtype"] == "float32"
    assert verify["passed"] and data["verdict"] == "passed"
    assert verify["data_argmax_agreement"] >= 0.99  # a near tie may go either way in bfloat16
    warning = (
        "onnxruntime's CPU provider cannot run bfloat16 Conv, so the bfloat16 file itself was "
        "not run; its float32 twin (the same folded weights, cast exactly) was verified instead"
    )
    assert warning in data["warnings"]
    assert warning in text
    assert "tolerance for bfloat16: export error <= 2 x the bfloat16 original's own error" in text
    assert "INVALID_GRAPH" not in text
    # the output is the bfloat16 file; the twin was never left behind
    import onnx

    model = onnx.load(str(onnx_file))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "report.json"]
    assert _twin_dirs() <= before


def test_bfloat16_mlp_verifies_its_float32_twin(half_models, tmp_path):
    report = run_fold(
        RunOptions(model=half_models["mlp", "bfloat16"], output=tmp_path / "mlp.onnx", samples=6)
    )
    assert report.passed, (report.verify, report.verify_error)
    assert report.verify.verified_file == "float32 twin"
    assert any("bfloat16 Gemm" in w or "bfloat16 MatMul" in w for w in report.warnings)
    assert report.verify.original_err > 0


# ------------------------------------------------------------------------------- wrong folds


def _wrong(model: nn.Module, kind: str) -> nn.Module:
    """The model a wrong fold computes: eps omitted, or every running_var off by 1e-3."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if kind == "eps":
                m.eps = 0.0
            else:
                m.running_var.add_(1e-3)
    return model


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["eps", "var"])
def test_a_wrong_fold_is_rejected(tmp_path, dtype, kind):
    model = _trained_like(SmallVarCNN(), low=-5, seed=3)
    wrong = _wrong(model, kind)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref32 = model(x).double()
        own = (copy.deepcopy(model).to(HALF[dtype])(x.to(HALF[dtype])).double() - ref32).abs()
        effect = (wrong(x).double() - ref32).abs()
    # the wrong fold matters at this precision: far more than the half model's own error
    assert effect.max() > 3 * HALF_ERROR_FACTOR[dtype] * own.max()

    original = _save_half(model, x[:4], dtype, tmp_path / "model.pt2")
    wrong_pt2 = _save_half(wrong, x[:4], dtype, tmp_path / "wrong.pt2")
    wrong_onnx = tmp_path / "wrong.onnx"
    run_fold(RunOptions(model=wrong_pt2, output=wrong_onnx, samples=1))  # the wrong export
    report = tmp_path / "report.json"
    code, text = _invoke("verify", original, wrong_onnx, "--json", report)
    assert code == 1, text
    verify = json.loads(report.read_text())["verify"]
    assert verify["passed"] is False and verify["reference_dtype"] == "float32"
    (out,) = verify["outputs"]
    assert out["max_abs_err"] > out["tolerance"]
    assert "verify: FAIL" in text


def test_a_wrong_fold_of_the_digits_cnn_is_rejected_in_float16(tmp_path):
    """The shipped digits CNN with every running_var off by 1e-3, folded and exported."""
    original = _save_half(_digits_cnn(), torch.randn(4, 1, 8, 8), "float16", tmp_path / "m.pt2")
    wrong = _digits_cnn()
    with torch.no_grad():
        for name, buffer in wrong.named_buffers():
            if name.endswith("running_var"):
                buffer.add_(1e-3)
    wrong_pt2 = _save_half(wrong, torch.randn(4, 1, 8, 8), "float16", tmp_path / "w.pt2")
    run_fold(RunOptions(model=wrong_pt2, output=tmp_path / "w.onnx", samples=1))
    data = MODELS / "digits_cnn_test.npz"
    code, text = _invoke("verify", original, tmp_path / "w.onnx", "--data", data)
    assert code == 1, text
    assert "verify: FAIL" in text


# ------------------------------------------------------------------- explicit tolerances


def test_explicit_tolerances_apply_the_plain_rule(folded_cnn16, half_models, tmp_path):
    _, _, _, onnx_file = folded_cnn16
    model = half_models["cnn", "float16"]
    report = tmp_path / "report.json"
    # the float32 defaults, given explicitly: export against the float16 original, plain rule
    code, text = _invoke("verify", model, onnx_file, "--rtol", "1e-5", "--json", report)
    verify = json.loads(report.read_text())["verify"]
    assert code == 1, text
    assert "reference_dtype" not in verify and "factor" not in verify
    assert verify["model_dtype"] == "float16"
    assert (verify["atol"], verify["rtol"]) == (DEFAULT_ATOL, 1e-5)
    assert "tolerance atol 1e-06 + rtol 1e-05 x scale" in text
    assert "tolerance for float16" not in text
    # a tolerance wide enough for float16, given explicitly
    code, text = _invoke("verify", model, onnx_file, "--atol", "0.1", "--json", report)
    verify = json.loads(report.read_text())["verify"]
    assert code == 0, text
    assert (verify["atol"], verify["rtol"]) == (0.1, DEFAULT_RTOL)
    (out,) = verify["outputs"]
    assert "original_err" not in out
    assert out["max_abs_err"] <= 0.1 + DEFAULT_RTOL * out["scale"]


def test_default_verify_of_a_float16_model_uses_the_dtype_tolerance(folded_cnn16, half_models):
    _, _, _, onnx_file = folded_cnn16
    code, text = _invoke("verify", half_models["cnn", "float16"], onnx_file)
    assert code == 0, text
    assert "tolerance for float16: export error <= 3 x" in text


# ---------------------------------------------------------------------- float16 ONNX input


def test_float16_onnx_input_is_checked_against_its_float32_twin(half_models, tmp_path):
    from bnexport.export import export_program

    unfolded = tmp_path / "cnn16.onnx"
    export_program(torch.export.load(str(half_models["cnn", "float16"])), unfolded)
    report = run_fold(RunOptions(model=unfolded, output=tmp_path / "folded.onnx", samples=4))
    assert report.passed, report.verify
    v = report.verify
    assert (v.model_dtype, v.reference_dtype) == ("float16", "float32")
    assert v.original_err > 0


# ------------------------------------------------------------------------- float32 models


def test_float32_model_keeps_its_verdict_and_tolerance_fields(tmp_path):
    report = tmp_path / "report.json"
    code, text = _invoke(
        "fold", MODELS / "digits_cnn.pt2", "-o", tmp_path / "cnn.onnx", "--json", report
    )
    assert code == 0, text
    verify = json.loads(report.read_text())["verify"]
    assert set(verify) == FLOAT32_VERIFY_KEYS
    assert all(set(o) == FLOAT32_OUTPUT_KEYS for o in verify["outputs"])
    assert (verify["atol"], verify["rtol"]) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert verify["passed"] is True
    assert "tolerance atol 1e-06 + rtol 1e-05 x scale" in text
    assert "tolerance for" not in text and "original err" not in text
    (out,) = verify["outputs"]
    assert out["max_abs_err"] <= DEFAULT_ATOL + DEFAULT_RTOL * out["scale"]
    assert np.isfinite(out["max_abs_err"])
