"""Unit tests of the fold engine: each pattern, each refusal, the caller's model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexport import fold
from bnexport.errors import InvalidModelError
from tests.nets import batchnorm_nodes, randomize_bn


def _state(model: nn.Module):
    return {k: v.clone() for k, v in model.state_dict().items()}, [
        m.training for m in model.modules()
    ]


def check_fold(model: nn.Module, *args, folded=(), left=(), seed=0):
    """Fold `model`, assert outputs match and the named BNs were folded / left."""
    randomize_bn(model, seed)
    model.eval()
    before, flags = _state(model)
    result = fold(model, args)
    after, flags_after = _state(model)
    assert flags == flags_after
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        ref, got = model(*args), result.module(*args)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got, ref, atol=2e-5 * scale, rtol=1e-5)
    report = result.report
    for name in folded:
        assert report.decision(name).status == "folded", report
    for name in left:
        assert report.decision(name).status == "left", report
    remaining = batchnorm_nodes(result.module)
    assert remaining == len(report.left)
    return report


def seq(*layers):
    return nn.Sequential(*layers)


# ------------------------------------------------------------------ conv -> BN


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "stride,dilation,groups,padding,mode,bias",
    [
        (1, 1, 1, 0, "zeros", True),
        (2, 1, 2, 1, "zeros", False),
        (1, 2, 4, 2, "reflect", True),
        (3, 1, 1, 1, "replicate", False),
        (1, 1, 1, 1, "circular", True),
    ],
)
def test_conv_bn(dim, stride, dilation, groups, padding, mode, bias):
    conv = getattr(nn, f"Conv{dim}d")(4, 8, 3, stride, padding, dilation, groups, bias, mode)
    bn = getattr(nn, f"BatchNorm{dim}d")(8)
    x = torch.randn(2, 4, *([9] * dim))
    report = check_fold(seq(conv, bn), x, folded=["1"])
    assert report.decision("1").into == "0" and report.decision("1").direction == "preceding"


def test_depthwise_conv_bn():
    check_fold(
        seq(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)),
        torch.randn(2, 6, 7, 7),
        folded=["1"],
    )


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups,output_padding,bias", [(1, 0, True), (2, 1, False)])
def test_conv_transpose_bn(dim, groups, output_padding, bias):
    conv = getattr(nn, f"ConvTranspose{dim}d")(
        4, 6, 3, stride=2, output_padding=output_padding, groups=groups, bias=bias
    )
    check_fold(
        seq(conv, getattr(nn, f"BatchNorm{dim}d")(6)), torch.randn(2, 4, *([5] * dim)), folded=["1"]
    )


# ------------------------------------------------------------------ linear


def test_linear_bn1d():
    check_fold(seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), torch.randn(4, 5), folded=["1"])


class LinearPermuteBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)

    def forward(self, x):  # (N, L, F)
        return self.bn(self.lin(x).permute(0, 2, 1))


class LinearWrongAxisBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):  # (N, 3, 5): BN normalizes the sequence axis, not the features
        return self.bn(self.lin(x))


def test_linear_axes_tracked_through_permute():
    check_fold(LinearPermuteBN(), torch.randn(2, 3, 5), folded=["bn"])


def test_linear_bn_on_wrong_axis_is_left():
    report = check_fold(LinearWrongAxisBN(), torch.randn(2, 3, 5), left=["bn"])
    assert "axis" in report.decision("bn").reason


# ------------------------------------------------------------------ into the following layer


def test_bn_into_following_linear():
    report = check_fold(seq(nn.BatchNorm1d(5), nn.Linear(5, 3)), torch.randn(4, 5), folded=["0"])
    assert report.decision("0").direction == "following"
    assert report.decision("0").into == "1"


def test_bn_into_following_unpadded_conv_with_groups():
    check_fold(
        seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2)),
        torch.randn(2, 4, 9, 9),
        folded=["0"],
    )


def test_bn_flatten_linear_folds_across_merged_axes():
    check_fold(
        seq(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)),
        torch.randn(2, 3, 4, 4),
        folded=["0"],
    )


def test_bn_before_zero_padded_conv_keeps_its_shift():
    report = check_fold(
        seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), torch.randn(2, 3, 6, 6), folded=["0"]
    )
    assert report.decision("0").shift_kept and report.adds_added == 1


def test_bn_before_reflect_padded_conv_folds():
    check_fold(
        seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
        torch.randn(2, 3, 6, 6),
        folded=["0"],
    )


# ------------------------------------------------------------------ identities in between


class ViewBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.lin(x).unsqueeze(-1)).squeeze(-1)


def test_identity_ops_do_not_block():
    check_fold(
        seq(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Identity(), nn.BatchNorm2d(4)),
        torch.randn(2, 3, 6, 6),
        folded=["3"],
    )
    check_fold(ViewBetween(), torch.randn(3, 4), folded=["bn"])


# ------------------------------------------------------------------ BN variants


@pytest.mark.parametrize(
    "bn",
    [
        nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4, momentum=None),
        nn.SyncBatchNorm(4),
    ],
    ids=["affine_false", "momentum_none", "syncbn"],
)
def test_bn_variants(bn):
    check_fold(seq(nn.Conv2d(3, 4, 3), bn), torch.randn(2, 3, 6, 6), folded=["1"])


class FunctionalNet(nn.Module):
    """Functional forward: F.conv2d with registered parameters and F.batch_norm with buffers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3, 3, 3))
        self.gamma = nn.Parameter(torch.rand(5) + 0.5)
        self.beta = nn.Parameter(torch.randn(5))
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.1)

    def forward(self, x):
        y = F.conv2d(x, self.weight, stride=2)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, training=False)


def test_functional_forward_folds():
    report = check_fold(FunctionalNet(), torch.randn(2, 3, 9, 9))
    (decision,) = report.decisions
    assert decision.folded and decision.kind == "F.batch_norm"


class ResidualNested(nn.Module):
    """BN registered before conv; nested containers; residual add after the fold."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList([nn.Sequential(nn.BatchNorm2d(4))])
        self.convs = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))])

    def forward(self, x):
        return x + self.bns[0](self.convs[0](x))


def test_residual_nested_registration_order():
    report = check_fold(ResidualNested(), torch.randn(2, 4, 5, 5), folded=["bns.0.0"])
    assert report.decision("bns.0.0").into == "convs.0.0"


# ------------------------------------------------------------------ refusals


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        # a product (bn(y) + y would be one linear map of y: the merge of parallel branches
        # makes it one conv, see test_reparameterize.py)
        y = self.conv(x)
        return self.bn(y) * y


def test_output_used_twice_is_left():
    report = check_fold(SharedOutput(), torch.randn(2, 3, 6, 6), left=["bn"])
    assert "also used by" in report.decision("bn").reason


def test_no_running_stats_is_left():
    report = check_fold(
        seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
        torch.randn(2, 3, 6, 6),
        left=["1"],
    )
    assert "batch statistics" in report.decision("1").reason


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_shared_weights_with_different_bns_are_left():
    report = check_fold(CalledTwice(), torch.randn(2, 3, 4, 4), left=["bn_a", "bn_b"])
    reason = report.decision("bn_a").reason
    assert "serve 2 calls" in reason and "--duplicate-shared" in reason


def test_nonlinearity_between_is_left():
    report = check_fold(
        seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU()),
        torch.randn(2, 3, 6, 6),
        left=["2"],
    )
    assert "nonlinearity" in report.decision("2").reason


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.c2(self.bn(self.c1(x))))


def test_module_called_twice_reports_each_call():
    report = check_fold(BNTwice(), torch.randn(2, 3, 4, 4))
    assert [d.name for d in report.decisions] == ["bn", "bn (call 2)"]
    assert [d.into for d in report.decisions] == ["c1", "c2"]
    assert all(d.folded for d in report.decisions)


def test_unused_bn_reported():
    model = FunctionalNet()
    model.spare = nn.BatchNorm1d(2)
    report = check_fold(model, torch.randn(2, 3, 9, 9))
    assert report.decision("spare").status == "unused"


# ------------------------------------------------------------------ the caller's model


def test_train_mode_model_untouched_and_warned():
    model = randomize_bn(seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))).train()
    before, flags = _state(model)
    result = fold(model, torch.randn(2, 3, 6, 6))
    after, flags_after = _state(model)
    assert flags_after == flags and all(flags)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("training mode" in w for w in result.report.warnings)
    with torch.no_grad():
        x = torch.randn(3, 3, 6, 6)
        expected = copy.deepcopy(model).eval()(x)
        torch.testing.assert_close(result.module(x), expected, atol=1e-5, rtol=1e-5)


def test_nan_statistics_refused():
    model = randomize_bn(seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[1].running_mean[2] = float("nan")
    with pytest.raises(InvalidModelError, match="'1'.*NaN"):
        fold(model, torch.randn(2, 3, 6, 6))


def test_negative_variance_refused():
    model = randomize_bn(seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    model[1].running_var[0] = -1.0
    with pytest.raises(InvalidModelError, match="negative running_var"):
        fold(model, torch.randn(2, 3, 6, 6))


def test_fresh_statistics_and_float16_scale_warned():
    model = seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    model[3].running_var.fill_(1e-4)
    model[3].weight.data.fill_(1e6)
    model[3].num_batches_tracked.fill_(5)
    warnings = fold(model, torch.randn(2, 3, 6, 6)).report.warnings
    assert any("never updated" in w and w.startswith("1:") for w in warnings)
    assert any("float16" in w and w.startswith("3:") for w in warnings)


def test_report_renders_as_json_and_table():
    import json

    model = seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    report = check_fold(model, torch.randn(2, 3, 6, 6))
    data = json.loads(report.to_json())
    assert data["total"] == 1 and data["folded"] == 0
    assert data["left"][0]["name"] == "2" and data["left"][0]["reason"]
    assert "2" in str(report) and "left" in str(report)
