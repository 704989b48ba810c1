"""The PyTorch engine on layers called several times and on BNs before zero-padded convs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnexport import fold
from tests.nets import batchnorm_nodes, randomize_bn


def _run(model: nn.Module, *args, duplicate_shared: bool = False, seed: int = 0):
    randomize_bn(model, seed)
    model.eval()
    result = fold(model, args, duplicate_shared=duplicate_shared)
    with torch.no_grad():
        ref64 = _double(model)(*(a.double() for a in args))
        got = result.module(*args)
    err = (got.double() - ref64).abs().max().item() / ref64.abs().max().item()
    return result, err


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def _bn_nodes(result) -> int:
    return batchnorm_nodes(result.module)


def _add_nodes(result) -> int:
    return sum(
        n.op == "call_function" and n.target is torch.ops.aten.add.Tensor
        for n in result.module.graph.nodes
    )


def _encoder() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
    )


class Siamese(nn.Module):
    """One encoder applied to each of `calls` inputs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.enc = encoder

    def forward(self, *xs):
        return torch.stack([self.enc(x) for x in xs], dim=1)


@pytest.mark.parametrize("calls", [2, 3])
def test_siamese_encoder_folds_once_for_every_call(calls):
    model = Siamese(_encoder())
    xs = [torch.randn(2, 3, 8, 8) for _ in range(calls)]
    result, err = _run(model, *xs)
    report = result.report
    assert len(report.folded) == 2 * calls and not report.left, str(report)
    assert {d.shared_calls for d in report.folded} == {calls}
    assert _bn_nodes(result) == 0 and err < 1e-6
    # folded once: W' = s * W, not s^calls * W
    bn = model.enc[1]
    mean, var = bn.running_mean.double(), bn.running_var.double()
    s = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    t = bn.bias.detach().double() - s * mean
    w = model.enc[0].weight.detach().double()
    expected = (w * s[:, None, None, None]).float()
    state = result.program.state_dict
    assert torch.equal(state["enc.0.weight"], expected)
    expected_b = (s * model.enc[0].bias.detach().double() + t).float()
    assert torch.equal(state["enc.0.bias"], expected_b)


class Looped(nn.Module):
    """One Conv-BN-Tanh block applied `times` times (weight tying)."""

    def __init__(self, times: int = 3):
        super().__init__()
        self.times = times
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        for _ in range(self.times):
            x = torch.tanh(self.bn(self.conv(x)))
        return x


def test_weight_tied_block_called_in_a_loop():
    result, err = _run(Looped(3), torch.randn(2, 4, 6, 6))
    report = result.report
    assert [d.name for d in report.folded] == ["bn", "bn (call 2)", "bn (call 3)"]
    assert all(d.shared_calls == 3 and d.into == "conv" for d in report.folded)
    assert _bn_nodes(result) == 0 and err < 1e-6
    # one bias parameter added, shared by the three calls
    assert sum(k.startswith("conv.bias") for k in result.program.state_dict) == 1


class TwoBNs(nn.Module):
    """One conv called twice, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn_a = nn.BatchNorm2d(5)
        self.bn_b = nn.BatchNorm2d(5)

    def forward(self, x, y):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(y))


class OneWithoutBN(nn.Module):
    """One conv called twice, only the first call followed by a BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x, y):
        return self.bn(self.conv(x)) * self.conv(y)


WEIGHT_BYTES = (5 * 3 * 3 * 3 + 5) * 4  # 560: shown as "560 B"


@pytest.mark.parametrize(
    "model,left,why",
    [
        (TwoBNs, ["bn_a", "bn_b"], "followed by a BN with other statistics"),
        (OneWithoutBN, ["bn"], "has no BN to fold"),
    ],
)
def test_calls_that_fold_differently_are_left_with_the_flag_named(model, left, why):
    result, err = _run(model(), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    for name in left:
        reason = result.report.decision(name).reason
        assert why in reason and "--duplicate-shared" in reason, reason
        assert "(+560 B)" in reason, reason
    assert _bn_nodes(result) == len(left) and err < 1e-6


@pytest.mark.parametrize("model,copies", [(TwoBNs, 1), (OneWithoutBN, 1)])
def test_duplicate_shared_gives_calls_their_own_weights(model, copies):
    m = model()
    result, err = _run(m, torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6), duplicate_shared=True)
    report = result.report
    assert not report.left and _bn_nodes(result) == 0 and err < 1e-6
    assert report.bytes_added == copies * WEIGHT_BYTES
    weights = [k for k in result.program.state_dict if k.startswith("conv.weight")]
    assert len(weights) == 1 + copies
    # the original weights serve the other call, unchanged where that call takes no BN
    if model is OneWithoutBN:
        assert torch.equal(result.program.state_dict["conv.weight"], m.conv.weight)


class Pair(nn.Module):
    """A Siamese pair, written so that torch.fx can trace it symbolically."""

    def __init__(self):
        super().__init__()
        self.enc = _encoder()

    def forward(self, a, b):
        return self.enc(a) - self.enc(b)


def test_fx_fuse_double_fold_case_is_exact():
    """torch.fx's fuse folds a shared BN into a shared conv once per call; here it is once."""
    from torch.fx.experimental.optimization import fuse

    model = Pair()
    randomize_bn(model, 3)
    model.eval()
    xs = (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        ref = model(*xs)
        fx_err = (fuse(model)(*xs) - ref).abs().max().item() / ref.abs().max().item()
    result, err = _run(model, *xs, seed=3)
    assert fx_err > 1e-2  # the double fold this guards against
    assert err < 1e-6 and not result.report.left


# ------------------------------------------------------------------ BN -> zero-padded conv


@pytest.mark.parametrize(
    "dim,padding,dilation,stride,groups",
    [
        (2, 1, 1, 1, 1),
        (2, 2, 1, 1, 1),
        (2, 2, 2, 1, 1),
        (2, 1, 1, 2, 1),
        (2, 1, 1, 1, 2),
        (2, 1, 1, 1, 4),
        (1, 1, 1, 1, 1),
        (1, 2, 2, 2, 2),
        (3, 1, 1, 1, 1),
        (3, 1, 2, 2, 2),
    ],
)
def test_bn_before_zero_padded_conv_folds_scale_and_keeps_shift(
    dim, padding, dilation, stride, groups
):
    bn = getattr(nn, f"BatchNorm{dim}d")(4)
    conv = getattr(nn, f"Conv{dim}d")(4, 8, 3, stride, padding, dilation, groups)
    result, err = _run(nn.Sequential(bn, conv), torch.randn(2, 4, *([9] * dim)))
    d = result.report.decision("0")
    assert d.folded and d.shift_kept and d.direction == "following" and d.into == "1"
    assert result.report.adds_added == 1
    assert _bn_nodes(result) == 0 and _add_nodes(result) == 1
    assert err < 1e-6


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_copying_padding_still_folds_the_shift_into_the_bias(mode):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    result, err = _run(model, torch.randn(2, 3, 6, 6))
    d = result.report.decision("0")
    assert d.folded and not d.shift_kept and _add_nodes(result) == 0 and err < 1e-6


def test_padding_same_string():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 5, padding="same"))
    result, err = _run(model, torch.randn(2, 3, 11))
    assert result.report.decision("0").shift_kept and err < 1e-6


def test_bn_before_transposed_conv_folds_scale_and_keeps_shift():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2))
    result, err = _run(model, torch.randn(2, 4, 5, 5))
    d = result.report.decision("0")
    assert d.folded and d.shift_kept and _bn_nodes(result) == 0 and err < 1e-6


def test_zero_gamma_channel_is_left_with_its_reason():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1))
    randomize_bn(model, 0)
    with torch.no_grad():
        model[0].weight[2] = 0.0
    model.eval()
    result = fold(model, (torch.randn(2, 4, 6, 6),))
    d = result.report.decision("0")
    assert d.status == "left"
    assert "channel 2 of the BN have scale 0" in d.reason and "pads with zeros" in d.reason


class PaddedInputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.bn(x)
        return self.conv(y) + y


def test_conv_input_used_elsewhere_is_left():
    result, err = _run(PaddedInputUsedTwice(), torch.randn(2, 3, 5, 5))
    d = result.report.decision("bn")
    assert d.status == "left" and "its output feeds add" in d.reason and err < 1e-6


class SharedPadded(nn.Module):
    """An encoder with an input BN before a zero-padded conv, applied to two inputs."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(
            nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        )

    def forward(self, a, b):
        return self.enc(a) - self.enc(b)


def test_shared_padded_conv_after_shared_input_bn():
    result, err = _run(SharedPadded(), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    report = result.report
    assert not report.left and report.adds_added == 2 and err < 1e-6
    assert all(d.shared_calls == 2 for d in report.folded)
    # the two Adds read one shift parameter
    assert sum(k.endswith("shift") for k in result.program.state_dict) == 1


def test_report_text_and_json_name_the_new_folds():
    result, _ = _run(SharedPadded(), torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    text = str(result.report)
    assert "scale folded into enc.1; shift kept as an Add before it" in text
    assert "weights shared by 2 calls, folded once" in text
    assert "2 shifts kept as Add nodes" in text
    data = result.report.to_dict()
    assert data["adds_added"] == 2 and data["bytes_added"] == 0
    assert data["layers"][0]["shift_kept"] is True and data["layers"][0]["shared_calls"] == 2


# ------------------------------------------------------------------ the command line


def _save_pt2(model: nn.Module, args: tuple, path) -> None:
    randomize_bn(model, 1)
    model.eval()
    dyn = tuple({0: torch.export.Dim.AUTO} for _ in args)
    torch.export.save(torch.export.export(model, args, dynamic_shapes=dyn), str(path))


def _fold_cli(*args):
    from click.testing import CliRunner

    from bnexport.cli import main

    return CliRunner().invoke(main, ["fold", *map(str, args), "--samples", "2"])


def test_cli_duplicate_shared(tmp_path):
    import json

    import onnx

    def count_batchnorm_nodes(path) -> int:
        """BatchNormalization nodes of the file's graph and its local functions."""
        proto = onnx.load(str(path))
        nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
        return sum(n.op_type == "BatchNormalization" for n in nodes)

    model = tmp_path / "two.pt2"
    _save_pt2(TwoBNs(), (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)), model)

    plain = _fold_cli(model, "-o", tmp_path / "a.onnx", "--json", tmp_path / "a.json")
    assert plain.exit_code == 0, plain.output
    data = json.loads((tmp_path / "a.json").read_text())["batchnorm"]
    assert [d["name"] for d in data["left"]] == ["bn_a", "bn_b"]
    assert "--duplicate-shared" in data["left"][0]["reason"] and data["bytes_added"] == 0
    assert count_batchnorm_nodes(tmp_path / "a.onnx") == 2

    dup = _fold_cli(
        model, "-o", tmp_path / "b.onnx", "--json", tmp_path / "b.json", "--duplicate-shared"
    )
    assert dup.exit_code == 0, dup.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["batchnorm"]["left"] == [] and report["batchnorm"]["bytes_added"] == WEIGHT_BYTES
    assert report["verify"]["passed"] is True
    assert count_batchnorm_nodes(tmp_path / "b.onnx") == 0
    assert "560 B of weight copies added" in dup.output


def test_cli_padded_conv_shift_kept_as_add(tmp_path):
    import json

    import onnx

    model = tmp_path / "padded.pt2"
    _save_pt2(SharedPadded(), (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)), model)
    done = _fold_cli(model, "-o", tmp_path / "p.onnx", "--json", tmp_path / "p.json")
    assert done.exit_code == 0, done.output
    assert "BatchNorm: 4 before, 0 after (4 folded); 2 shifts kept as Add nodes" in done.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["batchnorm"]["adds_added"] == 2 and report["onnx"]["batchnorm_nodes"] == 0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "p.onnx")).graph.node]
    assert ops.count("Add") == 2 and "BatchNormalization" not in ops


def test_cli_onnx_file_with_shared_conv(tmp_path):
    """`bnexport fold MODEL.onnx`: the same rule for an initializer read by two Conv nodes."""
    import json

    model = TwoBNs()
    randomize_bn(model, 2)
    model.eval()
    args = (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    src = tmp_path / "two.onnx"
    torch.onnx.export(model, args, str(src), dynamo=True, optimize=False)

    plain = _fold_cli(src, "-o", tmp_path / "a.onnx", "--json", tmp_path / "a.json")
    assert plain.exit_code == 0, plain.output
    left = json.loads((tmp_path / "a.json").read_text())["batchnorm"]["left"]
    assert len(left) == 2 and all("--duplicate-shared" in d["reason"] for d in left)

    dup = _fold_cli(
        src, "-o", tmp_path / "b.onnx", "--json", tmp_path / "b.json", "--duplicate-shared"
    )
    assert dup.exit_code == 0, dup.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["batchnorm"]["left"] == [] and report["onnx"]["batchnorm_nodes"] == 0
    assert report["batchnorm"]["bytes_added"] > 0 and report["verify"]["passed"] is True


class BothSides(nn.Module):
    """A conv called twice: the same BN before both calls, a different BN after each."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 3)
        self.bn_a = nn.BatchNorm2d(5)
        self.bn_b = nn.BatchNorm2d(5)

    def forward(self, x, y):
        return self.bn_a(self.conv(self.bn_in(x))) + self.bn_b(self.conv(self.bn_in(y)))


def test_a_weight_copy_keeps_the_folds_already_made_into_the_shared_weights():
    args = (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    result, err = _run(BothSides(), *args, duplicate_shared=True)
    report = result.report
    assert not report.left and report.decision("bn_in").shared_calls == 2
    assert report.bytes_added == WEIGHT_BYTES and err < 1e-6


class GroupThenCopy(nn.Module):
    """One BN module after both calls of a conv (one fold for both), then another BN before
    the second, zero-padded call only: that call gets a copy of the weights that must carry
    the first fold, bias included."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.bn_same, self.bn_a = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn_same(self.conv(x)))
        return self.bn_same(self.conv(self.bn_a(y)))


@pytest.mark.parametrize("bias", [True, False])
def test_a_weight_copy_keeps_the_bias_of_earlier_folds(bias):
    result, err = _run(GroupThenCopy(bias), torch.randn(2, 4, 8, 8), duplicate_shared=True)
    assert not result.report.left and result.report.decision("bn_a").shift_kept
    assert err < 1e-6


def test_mixed_padding_calls_are_named_as_such():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.padded = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            a = self.padded(self.bn(x))
            b = torch.nn.functional.conv2d(self.bn(x * 2), self.padded.weight, self.padded.bias)
            return a.sum((2, 3)) + b.sum((2, 3))

    result, _ = _run(Mixed(), torch.randn(2, 3, 6, 6))
    reasons = " ".join(d.reason or "" for d in result.report.left)
    assert "pads with zeros, so there the shift stays as an Add" in reasons, str(result.report)


def test_float16_shift_beyond_range_is_left_with_its_reason():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e-3)
        model[0].bias.fill_(100.0)  # u = t / s = 1e5, beyond float16
    model = model.half()
    x = torch.randn(2, 4, 6, 6).half()
    result = fold(model, (x,))
    d = result.report.decision("0")
    assert d.status == "left" and "shift kept as an Add of 1e+05" in d.reason, d.reason
    with torch.no_grad():
        assert torch.isfinite(result.module(x)).all()
