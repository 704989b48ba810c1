"""Each accepted checkpoint format loads, folds, exports and verifies; model-state checks."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bnexport.cli import main
from bnexport.load import (
    PICKLED_MODULE,
    PT2,
    SAFETENSORS,
    STATE_DICT,
    TORCHSCRIPT,
    detect_format,
    load_model,
)
from tests.nets import SmallNet, randomize_bn

ARCH = "tests.nets:small_net"
SHAPE = ["--input-shape", "1,1,8,8"]


def _net() -> SmallNet:
    torch.manual_seed(0)
    return randomize_bn(SmallNet()).eval()


def _fold(*args) -> tuple[int, str, dict | None]:
    args = [str(a) for a in args]
    report = None
    if "--json" in args:
        report_path = args[args.index("--json") + 1]
    result = CliRunner().invoke(main, ["fold", *args, "--samples", "1"])
    if "--json" in args and result.exit_code in (0, 1):
        with open(report_path) as fh:
            report = json.load(fh)
    return result.exit_code, result.output, report


def test_pt2_needs_no_flags(tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_net(), (torch.randn(2, 1, 8, 8),)), str(path))
    assert detect_format(path) == PT2
    loaded = load_model(path)
    assert loaded.input_specs[0].shape == (2, 1, 8, 8)
    code, out, _ = _fold(path)
    assert code == 0, out


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "optimizer": {}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict", "model", "model_state_dict", "module_prefix", "lightning"],
)
def test_state_dict_containers_with_arch(tmp_path, wrap):
    model = _net()
    path = tmp_path / "w.pth"
    torch.save(wrap(model.state_dict()), path)
    assert detect_format(path) == STATE_DICT
    loaded = load_model(path, arch=ARCH)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    code, out, _ = _fold(path, "--arch", ARCH, *SHAPE)
    assert code == 0, out


def test_safetensors_with_arch_as_file_path(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(_net().state_dict(), str(path))
    assert detect_format(path) == SAFETENSORS
    code, out, _ = _fold(path, "--arch", "tests/nets.py:small_net", *SHAPE)
    assert code == 0, out


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_net(), path)
    code, out, _ = _fold(path, *SHAPE, "-o", tmp_path / "o.onnx")
    assert code == 2
    assert "--trust-pickle" in out and "arbitrary code" in out and "state_dict" in out
    assert not (tmp_path / "o.onnx").exists()
    assert load_model(path, trust_pickle=True).format == PICKLED_MODULE
    code, out, _ = _fold(path, *SHAPE, "--trust-pickle")
    assert code == 0, out


def test_training_mode_pickle_is_folded_in_eval_with_warning(tmp_path):
    path, report = tmp_path / "train.pt", tmp_path / "r.json"
    model = _net().train()
    torch.save(model, path)
    code, out, data = _fold(path, *SHAPE, "--trust-pickle", "--json", report)
    assert code == 0, out
    assert any("training mode" in w for w in data["warnings"])
    assert "warning: the model was in training mode" in out


def test_torchscript_is_converted(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(_net(), torch.randn(2, 1, 8, 8)), str(path))
    assert detect_format(path) == TORCHSCRIPT
    code, out, _ = _fold(path, *SHAPE)
    assert code == 0, out
    assert "folded" in out


def test_fresh_and_float16_warnings(tmp_path):
    """Fresh statistics and a fold scale beyond float16 are warned about; both still fold
    exactly and verify (exit 0)."""
    fresh = SmallNet().eval()
    path, report = tmp_path / "fresh.pt", tmp_path / "r.json"
    torch.save(fresh.state_dict(), path)
    code, out, data = _fold(path, "--arch", ARCH, *SHAPE, "--json", report)
    assert code == 0, out
    assert any("never updated" in w for w in data["warnings"])

    big = _net()
    big.bn.running_var.fill_(1e-6)
    big.bn.weight.data.fill_(500.0)
    torch.save(big.state_dict(), path)
    code, out, data = _fold(path, "--arch", ARCH, *SHAPE, "--json", report)
    assert code == 0, out
    assert data["batchnorm"]["folded"] == 1 and data["verify"]["passed"]
    assert data["verify"]["max_rel_err"] < 1e-6  # measured 6e-8: the float32 fold is exact
    # s = 500 / sqrt(1e-6 + 1e-5) = 1.51e5
    assert any(
        w.startswith("bn:") and "reaches 1.51e+05, beyond float16" in w for w in data["warnings"]
    )


@pytest.mark.parametrize("what", ["nan_mean", "inf_weight", "negative_var"])
def test_broken_statistics_stop_before_writing(tmp_path, what):
    model = _net()
    if what == "nan_mean":
        model.bn.running_mean[0] = float("nan")
    elif what == "inf_weight":
        model.bn.weight.data[1] = float("inf")
    else:
        model.bn.running_var[2] = -0.5
    path = tmp_path / "bad.pt"
    torch.save(model.state_dict(), path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, _ = _fold(path, "--arch", ARCH, *SHAPE, "--json", tmp_path / "r.json")
    assert code == 2
    assert "'bn'" in out
    assert ("negative running_var" in out) if what == "negative_var" else ("NaN or Inf" in out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
