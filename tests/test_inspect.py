"""`bnexport inspect`: flags, fold decisions and drift figures on models whose statistics are
known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnexport.cli import main
from bnexport.stats.inspect import drift, inspect_program
from bnexport.stats.population import ChannelMoments


class InputBN(nn.Module):
    """BN on raw features, then a Linear: the BN's input is the data itself."""

    def __init__(self, features: int = 5):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, 2)

    def forward(self, x):
        return self.fc(self.bn(x))


def _data(n: int = 4000, features: int = 5, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    loc = torch.linspace(-2, 3, features)
    scale = torch.linspace(0.5, 4, features)
    return torch.randn(n, features, generator=gen) * scale + loc


def _program(model: nn.Module, features: int = 5):
    x = torch.randn(4, features)
    return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


class _Data:
    def __init__(self, x: torch.Tensor):
        self.inputs, self.path, self.labels = (x,), "synthetic", None

    @property
    def size(self) -> int:
        return int(self.inputs[0].shape[0])

    def batches(self, size: int):
        for i in range(0, self.size, size):
            yield (self.inputs[0][i : i + size],)


def test_channel_moments_match_float64_and_ignore_batching():
    x = _data(1000)
    whole, parts = ChannelMoments(), ChannelMoments()
    whole.add(x)
    for chunk in torch.split(x, 37):
        parts.add(chunk)
    x64 = x.double()
    # float32 one-pass moments merged in float64: about 1e-7 of the spread
    std = x64.std(0)
    assert ((parts.mean - x64.mean(0)).abs() <= 1e-6 * std).all()
    assert torch.allclose(parts.var, x64.var(0, unbiased=True), rtol=1e-6)
    assert torch.allclose(whole.var, parts.var, rtol=1e-6)


def test_channel_moments_of_a_large_mean_stay_exact():
    """A mean 1e4 standard deviations off zero is summed in float64, not rounded in float32."""
    x = _data(1000) + 1e4
    m = ChannelMoments()
    for chunk in torch.split(x, 100):
        m.add(chunk)
    x64 = x.double()
    assert ((m.mean - x64.mean(0)).abs() <= 1e-6 * x64.std(0)).all()
    assert torch.allclose(m.var, x64.var(0), rtol=1e-5)


@pytest.mark.parametrize("shift,var_factor", [(0.0, 1.0), (1.5, 1.0), (0.0, 4.0), (0.8, 0.25)])
def test_drift_figures_on_known_statistics(shift, var_factor):
    x = _data()
    model = InputBN()
    mean, var = x.double().mean(0), x.double().var(0)
    model.bn.running_mean.copy_(mean + shift * var.sqrt())
    model.bn.running_var.copy_(var * var_factor)
    report = inspect_program(_program(model), "m", dataset=_Data(x))
    entry = report.batchnorm[0]
    # eps = 1e-5 is small against these variances
    assert entry.mean_shift == pytest.approx(shift, abs=1e-3)
    assert entry.var_ratio == pytest.approx(max(var_factor, 1 / var_factor), rel=1e-3)
    assert ("stale" in entry.flags) == (shift > 0.5 or max(var_factor, 1 / var_factor) > 2)
    assert entry.fold["status"] == "folded" and entry.fold["into"] == "fc"


def test_drift_formula():
    shift, ratio = drift(
        torch.tensor([1.0, 0.0]),
        torch.tensor([1.0, 9.0]),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
        torch.tensor([1.0, 1.0], dtype=torch.float64),
        0.0,
    )
    assert shift == pytest.approx(1.0) and ratio == pytest.approx(9.0)


def _flags_of(edit) -> list[str]:
    model = InputBN()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.num_batches_tracked.fill_(10)
    with torch.no_grad():
        edit(model.bn)
    return inspect_program(_program(model), "m").batchnorm[0].flags


def test_flags():
    def never(bn):
        bn.running_mean.zero_()
        bn.running_var.fill_(1)
        bn.num_batches_tracked.zero_()

    assert "never updated" in _flags_of(never)
    assert "dead channels" in _flags_of(lambda bn: bn.weight.data.__setitem__(2, 0.0))
    assert "NaN/Inf" in _flags_of(lambda bn: bn.running_var.__setitem__(0, float("nan")))
    assert "negative variance" in _flags_of(lambda bn: bn.running_var.__setitem__(1, -0.5))
    assert "fold scale beyond float16" in _flags_of(lambda bn: bn.weight.data.fill_(1e6))
    assert _flags_of(lambda bn: None) == []


def test_no_running_statistics_flag():
    model = InputBN()
    model.bn = nn.BatchNorm1d(5, track_running_stats=False)
    entry = inspect_program(_program(model), "m").batchnorm[0]
    assert entry.flags == ["no running statistics"]
    assert entry.fold["status"] == "left"


# --------------------------------------------------------------------------- CLI


def _save(model: nn.Module, path, x: torch.Tensor) -> None:
    torch.export.save(_program(model), str(path))
    np.savez(path.with_name(path.stem + "_test.npz"), x=x.numpy())


def test_cli_inspect_finds_the_stale_layer(tmp_path):
    x = _data()
    model = InputBN()
    model.bn.running_mean.copy_(x.mean(0))
    model.bn.running_var.copy_(x.var(0) * 9)  # stale by construction
    _save(model, tmp_path / "m.pt2", x)
    result = CliRunner().invoke(
        main, ["inspect", str(tmp_path / "m.pt2"), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    assert "stale: 1 of 1 BNs (bn)" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["stale"] == ["bn"] and data["batchnorm"][0]["var_ratio"] == pytest.approx(
        9, rel=1e-2
    )
    assert set(data["batchnorm"][0]) >= {"name", "kind", "channels", "flags", "fold", "mean_shift"}


def test_cli_inspect_without_data_has_no_drift_keys(tmp_path):
    model = InputBN()
    torch.export.save(_program(model), str(tmp_path / "m.pt2"))
    result = CliRunner().invoke(
        main, ["inspect", str(tmp_path / "m.pt2"), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "r.json").read_text())["batchnorm"][0]
    assert "mean_shift" not in entry and entry["fold"]["status"] == "folded"
    assert "drift not measured" in result.output


def test_cli_inspect_refuses_a_model_without_batchnorm(tmp_path):
    program = torch.export.export(nn.Linear(3, 2), (torch.randn(2, 3),))
    torch.export.save(program, str(tmp_path / "lin.pt2"))
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "lin.pt2")])
    assert result.exit_code == 2 and "no BatchNorm" in result.output


def test_cli_inspect_plot_is_a_png(tmp_path):
    import matplotlib.image

    x = _data()
    model = InputBN()
    model.bn.running_var.fill_(30.0)
    _save(model, tmp_path / "m.pt2", x)
    png = tmp_path / "drift.png"
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.pt2"), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300


def test_cli_inspect_plot_needs_data(tmp_path):
    torch.export.save(_program(InputBN()), str(tmp_path / "m.pt2"))
    result = CliRunner().invoke(
        main, ["inspect", str(tmp_path / "m.pt2"), "--plot", str(tmp_path / "d.png")]
    )
    assert result.exit_code == 2 and "--data" in result.output
    assert not (tmp_path / "d.png").exists()


def test_cli_inspect_flags_a_module_saved_in_training_mode(tmp_path):
    from tests.nets import SmallNet

    model = SmallNet().train()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(model, tmp_path / "whole.pt")
    result = CliRunner().invoke(
        main,
        [
            "inspect",
            str(tmp_path / "whole.pt"),
            "--trust-pickle",
            "--input-shape",
            "2,1,8,8",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "r.json").read_text())["batchnorm"][0]
    assert "saved in training mode" in entry["flags"]


def test_verdict_without_any_running_statistics():
    model = InputBN()
    model.bn = nn.BatchNorm1d(5, track_running_stats=False)
    report = inspect_program(_program(model), "m", dataset=_Data(_data(100)))
    assert report.verdict == "no BN has running statistics to compare with the data"
