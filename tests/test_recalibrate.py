"""`bnexport recalibrate`: the fixed point, agreement with a one-BN-at-a-time brute force,
repair of stale statistics, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bnexport.cli import main
from bnexport.stats.recalibrate import recalibrate_module


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
        self.head_bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.b(self.a(y)))
        return self.fc(self.head_bn(y.mean((2, 3))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm1d(4)
        self.lin = nn.Linear(4, 5)
        self.bn_b = nn.BatchNorm1d(5)
        self.bn_c = nn.BatchNorm1d(3)

    def forward(self, a, c):
        return torch.cat([self.bn_b(self.lin(self.bn_a(a))), self.bn_c(c)], 1)


def _stale(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-2, 2, generator=gen)
            m.running_var.uniform_(0.1, 5, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


CASES = {
    "sequential": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        ),
        lambda g: (torch.randn(64, 2, 6, 6, generator=g) * 2 + 1,),
    ),
    "residual": (Residual, lambda g: (torch.randn(64, 2, 6, 6, generator=g) * 3 - 1,)),
    "two_inputs": (
        TwoInputs,
        lambda g: (torch.randn(64, 4, generator=g) * 2, torch.randn(64, 3, generator=g) + 5),
    ),
}


def _program(model, data):
    example = tuple(x[:2] for x in data)
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in data)
    return torch.export.export(model, example, dynamic_shapes=dyn)


def _bn_modules(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) per channel (axis 1) over every other axis, in float64."""
    x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = x.sum(1) / x.shape[1]
    return mean, ((x - mean[:, None]) ** 2).sum(1) / (x.shape[1] - 1)


def _inputs_of_each_bn(model, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, unbiased variance) of every BN's input in eval mode, brute force: all of the
    input's batches concatenated, then the float64 sums of `_per_channel`."""
    seen, hooks = [], []
    for bn in _bn_modules(model):
        seen.append([])
        hooks.append(bn.register_forward_pre_hook(lambda _, args, s=seen[-1]: s.append(args[0])))
    with torch.no_grad():
        for i in range(0, data[0].shape[0], 16):
            model(*(x[i : i + 16] for x in data))
    for h in hooks:
        h.remove()
    return [_per_channel(torch.cat(s)) for s in seen]


# running_var against the brute force: recalibrate's agrees to 7e-8 (measured); dividing by n
# instead of n - 1 is 4.3e-4 off at the most values a channel here (64 x 6 x 6), counting the
# batch instead of N x H x W 1.5% off
RTOL = 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_point_and_brute_force(case):
    """recalibrate's statistics against a float64 brute force of each BN's input: the fixed
    point (every BN on the new statistics sees its own statistics) and one BN at a time."""
    build, make = CASES[case]
    data = make(torch.Generator().manual_seed(1))
    model = _stale(build())
    chunks = [tuple(x[i : i + 16] for x in data) for i in range(0, 64, 16)]
    module = _program(model, data).module()
    done, left = recalibrate_module(module, chunks)
    assert not left and len(done) == len(_bn_modules(model))
    # fixed point: each BN's statistics are those of its own input, all BNs on the new ones
    got = {r.mean_target: (r.mean, r.var) for r in done}
    recal = copy.deepcopy(model)
    names = {id(m): n for n, m in recal.named_modules()}
    for bn in _bn_modules(recal):
        mean, var = got[names[id(bn)] + ".running_mean"]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    after = _inputs_of_each_bn(recal, data)
    for bn, (mean, var) in zip(_bn_modules(recal), after):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=RTOL, atol=0)
    # brute force: one BN at a time, in order, each with the ones before it already updated
    brute = copy.deepcopy(model)
    for k, bn in enumerate(_bn_modules(brute)):
        mean, var = _inputs_of_each_bn(brute, data)[k]
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    for a, b in zip(_bn_modules(brute), _bn_modules(recal)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=RTOL, atol=0)


# --------------------------------------------------------------------------- CLI


def _stale_classifier(tmp_path):
    """A linear classifier behind an input BN whose statistics are far off the data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 4
    labels = (x[:, 0] - 4 + (x[:, 1] - 4) / 2 > 0).long()
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, -1.0, 0, 0], [1.0, 1.0, 0, 0]]))
        model[1].bias.zero_()
        model[0].running_mean.zero_()  # stale: the data has mean 4
        model[0].running_var.fill_(1.0)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "calib.npz", x=x.numpy(), labels=labels.numpy())
    return tmp_path / "m.pt2", tmp_path / "calib.npz"


def test_cli_recalibrate_repairs_stale_statistics(tmp_path):
    model, calib = _stale_classifier(tmp_path)
    before = model.read_bytes()
    result = CliRunner().invoke(
        main, ["recalibrate", str(model), "--data", str(calib), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 0, result.output
    assert model.read_bytes() == before
    out = tmp_path / "m.recalibrated.pt2"
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["accuracy"]["after"] > 0.95 > data["accuracy"]["before"]
    layer = data["batchnorm"][0]
    assert layer["mean_shift_before"] > 1 and layer["mean_shift"] < 1e-5
    # the recalibrated program folds and verifies
    folded = CliRunner().invoke(main, ["fold", str(out), "-o", str(tmp_path / "m.onnx")])
    assert folded.exit_code == 0 and "verify: PASS" in folded.output
    recal = torch.export.load(str(out)).state_dict
    assert int(recal["0.num_batches_tracked"]) == 3  # 600 samples in chunks of 256


@pytest.mark.parametrize(
    "make,phrase",
    [
        (lambda x: {"x": x[:1]}, "at least 2"),
        (lambda x: {"x": np.where(np.arange(4) == 1, np.nan, x)}, "NaN"),
        (lambda x: {"x": np.where(np.arange(4) == 2, 1.0, x)}, "variance 0"),
    ],
)
def test_cli_recalibrate_bad_data(tmp_path, make, phrase):
    model, calib = _stale_classifier(tmp_path)
    x = np.load(calib)["x"]
    np.savez(tmp_path / "bad.npz", **make(x))
    result = CliRunner().invoke(
        main, ["recalibrate", str(model), "--data", str(tmp_path / "bad.npz")]
    )
    assert result.exit_code == 2 and phrase in result.output, result.output
    assert not (tmp_path / "m.recalibrated.pt2").exists()


def test_cli_recalibrate_needs_data(tmp_path):
    model, _ = _stale_classifier(tmp_path)
    result = CliRunner().invoke(main, ["recalibrate", str(model)])
    assert result.exit_code == 2 and "--data" in result.output


def test_cli_fold_with_recalibrate(tmp_path):
    model, calib = _stale_classifier(tmp_path)
    np.savez(tmp_path / "test.npz", **dict(np.load(calib)))
    result = CliRunner().invoke(
        main,
        [
            "fold",
            str(model),
            "--recalibrate",
            str(calib),
            "--data",
            str(tmp_path / "test.npz"),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["recalibrated"]["samples"] == 600 and data["recalibrated"]["batchnorm"] == ["0"]
    assert data["verify"]["passed"] and data["verify"]["accuracy"]["original"] > 0.95
    assert data["batchnorm"]["folded"] == 1


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_recalibrate_writes_the_input_format(tmp_path, suffix):
    from safetensors.torch import load_file, save_file

    from tests.nets import SmallNet

    model = _stale(SmallNet())
    path = tmp_path / f"sd{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 + 1
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    result = CliRunner().invoke(
        main,
        [
            "recalibrate",
            str(path),
            "--arch",
            "tests.nets:small_net",
            "--input-shape",
            "2,1,8,8",
            "--data",
            str(tmp_path / "calib.npz"),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / f"sd.recalibrated{suffix}"
    state = torch.load(out) if suffix == ".pt" else load_file(str(out))
    assert set(state) == set(model.state_dict())
    with torch.no_grad():
        mean, var = _per_channel(model.conv(x))
    torch.testing.assert_close(state["bn.running_mean"].double(), mean, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(state["bn.running_var"].double(), var, rtol=RTOL, atol=0)
    assert torch.equal(state["conv.weight"], model.conv.weight)


def test_domain_shift_repaired_on_unlabelled_target_data(tmp_path):
    """Statistics fitted to the source domain; the target is contrast-reduced and brightened
    (0.3 x + 2). Recalibrating on unlabelled target inputs restores the accuracy."""
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(2000, 4, generator=gen)
    labels = (source[:, 0] + source[:, 1] > 0).long()
    target = 0.3 * source + 2
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, -1.0, 0, 0], [1.0, 1.0, 0, 0]]))
        model[1].bias.zero_()
        model[0].running_mean.copy_(source.mean(0))
        model[0].running_var.copy_(source.var(0))
    program = torch.export.export(
        model, (target[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    torch.export.save(program, str(tmp_path / "m.pt2"))
    np.savez(tmp_path / "target.npz", x=target.numpy())  # unlabelled
    result = CliRunner().invoke(
        main, ["recalibrate", str(tmp_path / "m.pt2"), "--data", str(tmp_path / "target.npz")]
    )
    assert result.exit_code == 0, result.output

    def accuracy(m):
        with torch.no_grad():
            return float((m(target).argmax(1) == labels).float().mean())

    repaired = torch.export.load(str(tmp_path / "m.recalibrated.pt2")).module()
    assert accuracy(model) < 0.75 and accuracy(repaired) > 0.98


def test_recalibrate_never_takes_the_held_out_split_by_default(tmp_path):
    model, calib = _stale_classifier(tmp_path)
    np.savez(tmp_path / "m_test.npz", **dict(np.load(calib)))  # a companion test split
    result = CliRunner().invoke(main, ["recalibrate", str(model)])
    assert result.exit_code == 2 and "--data" in result.output
    assert not (tmp_path / "m.recalibrated.pt2").exists()


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.c1(x))
        return self.bn(self.c2(y) * 3 + 1).mean((2, 3))


def _save_and_data(tmp_path, model, x, static=False):
    dyn = None if static else ({0: torch.export.Dim.AUTO},)
    torch.export.save(
        torch.export.export(model, (x[:4],), dynamic_shapes=dyn), str(tmp_path / "m.pt2")
    )
    np.savez(tmp_path / "d.npz", x=x.numpy())
    return tmp_path / "m.pt2", tmp_path / "d.npz"


def test_recalibrate_refuses_a_bn_called_twice(tmp_path):
    model, data = _save_and_data(tmp_path, SharedBN().eval(), torch.randn(40, 3, 8, 8))
    result = CliRunner().invoke(main, ["recalibrate", str(model), "--data", str(data)])
    assert result.exit_code == 2 and "called more than once" in result.output
    assert not (tmp_path / "m.recalibrated.pt2").exists()


def test_recalibrate_refuses_a_bn_saved_in_training_mode(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    m.eval()
    m[3].train()
    model, data = _save_and_data(tmp_path, m, torch.randn(30, 3, 8, 8))
    result = CliRunner().invoke(main, ["recalibrate", str(model), "--data", str(data)])
    assert result.exit_code == 2 and "training mode" in result.output


def test_inspect_leaves_a_training_mode_program_unchanged(tmp_path):
    from bnexport.stats.inspect import inspect_program

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    program = torch.export.export(m, (torch.randn(4, 3, 8, 8),))
    before = {k: v.clone() for k, v in program.state_dict.items()}

    class Data:
        inputs, path, labels, size = (torch.randn(8, 3, 8, 8),), "d", None, 8

        def batches(self, n):
            yield (self.inputs[0][:4],)
            yield (self.inputs[0][4:],)

    inspect_program(program, "m", dataset=Data(), batch_size=4, fixed_batch=True)
    assert all(torch.equal(before[k], v) for k, v in program.state_dict.items())


def test_static_batch_model_is_inspected_and_recalibrated_in_its_batch(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(1)).eval()
    model, data = _save_and_data(tmp_path, _stale(m), torch.randn(10, 3, 8, 8), static=True)
    result = CliRunner().invoke(main, ["inspect", str(model), "--data", str(data)])
    assert result.exit_code == 0 and "only 8 of the 10 rows" in result.output
    result = CliRunner().invoke(main, ["recalibrate", str(model), "--data", str(data)])
    assert result.exit_code == 0, result.output
