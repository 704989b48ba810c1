"""Structural re-parameterisation through the PyTorch engine: sums of parallel branches of one
tensor merged into one layer, on blocks written as their papers define them in training form
(benchmarks/reparam_nets.py: RepVGG, MobileOne, ACNet, RepViT, RepGhost, FastViT, and the
Diverse Branch Block's average pooling branch).

Each folded program must hold one conv per block and compute what the eval-mode original
does, within a few roundings of the float64 original; RepVGG's and MobileOne's merged
kernels must equal their authors' `reparameterize()`. Sums that must not merge (branches of
different strides, a nonlinearity on one branch, a branch output used elsewhere) stay, with
the reason in the report.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from benchmarks.reparam_nets import (
    ACNet,
    DiverseBranchBlock,
    FastViTStage,
    MobileOne,
    MobileOneBlock,
    RepGhostModule,
    RepVGG,
    RepViTMixer,
    conv_bn,
    trained_like,
)
from bnexport import fold
from bnexport.cli import main
from bnexport.folding import merge_math
from bnexport.folding.merge_math import (
    Geometry,
    combine,
    identity_geometry,
    identity_kernel,
    merged_geometry,
    place_kernel,
)
from bnexport.render import merge_lines
from tests.nets import close_to_float64

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default}


def _convs(result) -> int:
    return sum(n.op == "call_function" and n.target in CONVS for n in result.program.graph.nodes)


# --------------------------------------------------------------------------- the arithmetic


def _conv64(x, weight, bias, g: Geometry) -> torch.Tensor:
    """A conv with `g`'s paddings (begin, end per axis) in float64."""
    pads = [p for begin, end in reversed(g.pads) for p in (begin, end)]
    return F.conv2d(F.pad(x, pads), weight, bias, g.stride, 0, g.dilation, g.groups)


@pytest.mark.parametrize("seed", range(6))
def test_merged_kernel_is_the_sum_of_its_branches(seed):
    """Random centred branches (kernel sizes, 1xk / kx1, dilation, groups, the identity),
    each scaled per channel: the merged conv equals their sum in float64."""
    gen = torch.Generator().manual_seed(seed)
    channels, groups = 8, [1, 2, 4, 8][seed % 4]
    dilation = 1 + seed % 2
    # the first branch dense and the largest, so that the merged conv is no larger
    shapes = [(5, 5) if seed >= 3 else (3, 3), (1, 1), (1, 3), (3, 1)][: 2 + seed % 3]
    branches, labels, weights = [], [], []
    for k, (kh, kw) in enumerate(shapes):
        g = 1 if k == 0 else groups
        pads = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
        branches.append(Geometry((kh, kw), (1, 1), pads, (dilation,) * 2, g, channels, channels))
        shape = (channels, channels // g, kh, kw)
        weights.append(torch.randn(shape, generator=gen, dtype=torch.float64))
        labels.append(f"conv{kh}x{kw}")
    branches.append(identity_geometry(channels, 2))
    labels.append("identity")
    merged = merged_geometry(branches, labels)
    assert not isinstance(merged, str), merged
    x = torch.randn(2, channels, 9, 7, generator=gen, dtype=torch.float64)
    scales = [torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5 for _ in branches]
    biases = [torch.randn(channels, generator=gen, dtype=torch.float64) for _ in branches]
    want = sum(
        a.reshape(1, -1, 1, 1) * _conv64(x, w, b, g)
        for a, w, b, g in zip(scales, weights, biases, branches)
    ) + scales[-1].reshape(1, -1, 1, 1) * (x + biases[-1].reshape(1, -1, 1, 1))
    kernels = [
        place_kernel(w, g.groups, merged.geometry, o)
        for w, g, o in zip(weights, branches, merged.offsets)
    ]
    kernels.append(identity_kernel(merged.geometry, merged.offsets[-1]))
    shift = torch.zeros(channels, dtype=torch.float64)
    weight, bias = combine(kernels, biases, scales, shift)
    got = _conv64(x, weight, bias, merged.geometry)
    assert merged.geometry.kernel == tuple(max(s[a] for s in shapes) for a in range(2))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_geometry_refusals():
    three = Geometry((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 1, 4, 4)
    five = Geometry((5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 4, 4)
    assert "stride" in merged_geometry([three, five], ["conv3x3", "conv5x5"])
    odd = Geometry((2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 4, 4)
    unpadded = Geometry((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 4, 4)
    assert "align" in merged_geometry([odd, unpadded], ["conv2x2", "conv1x1"])
    dense = Geometry((1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, 8, 8)
    depthwise = Geometry((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 8, 8, 8)
    assert "more than" in merged_geometry([dense, depthwise], ["conv1x1", "conv3x3"])


# --------------------------------------------------------------------------- RepVGG, MobileOne


def _merged_weights(result, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each block's merged (weight, bias), in block order."""
    state = result.program.state_dict
    found = []
    for k in range(len(model.stages)):
        # a block of one branch (no identity, no scale branch) keeps its own conv
        name = next(n for n in state if n.startswith(f"stages.{k}.") and n.endswith("weight"))
        name = f"stages.{k}.weight" if f"stages.{k}.weight" in state else name
        found.append((state[name], state[name.removesuffix("weight") + "bias"]))
    return found


def _same_as_hand(result, model: nn.Module, x: torch.Tensor) -> None:
    """bnexport's merged kernels are the authors' `reparameterize()` kernels (computed in
    float32) up to float32 rounding, and the outputs agree."""
    hand = copy.deepcopy(model).reparameterize()
    blocks = [m for m in hand.stages]
    for (w, b), block in zip(_merged_weights(result, model), blocks):
        conv = block.rbr_reparam if hasattr(block, "rbr_reparam") else block.reparam_conv
        scale = conv.weight.abs().max().item()
        torch.testing.assert_close(w, conv.weight.detach(), atol=4e-7 * scale, rtol=0)
        torch.testing.assert_close(b, conv.bias.detach(), atol=4e-7 * b.abs().max(), rtol=0)
    with torch.no_grad():
        ref = hand(x)
    torch.testing.assert_close(result.module(x), ref, atol=1e-5 * ref.abs().max(), rtol=0)


def test_repvgg_is_one_conv_per_block_and_equals_the_hand_reparameterisation():
    torch.manual_seed(0)
    model, x = trained_like(RepVGG()), torch.randn(2, 3, 32, 32)
    result = fold(model, x)
    assert _convs(result) == len(model.stages) + 1  # and the classifier
    assert not result.report.left
    close_to_float64(model, result, x)
    _same_as_hand(result, model, x)
    rows = [m.detail for m in result.report.merges]
    assert "merged 3 branches (conv3x3, conv1x1, identity BN) into stages.2 (" in rows[2]
    assert rows[5].startswith("merged 2 branches (conv3x3, conv1x1) into stages.5")
    identity = result.report.decision("stages.2.rbr_identity")
    assert (identity.status, identity.direction, identity.into) == ("folded", "merged", "stages.2")
    dense = result.report.decision("stages.2.rbr_dense.bn")
    assert dense.into == "stages.2.rbr_dense.conv" and dense.merged_into == "stages.2"
    assert "then merged into stages.2" in dense.detail


def test_mobileone_is_one_conv_per_block_for_one_to_four_branches():
    """Units of 1, 2, 3 and 4 branches, each a depthwise 3x3 block (stride 1 with the identity
    BN, or stride 2 without) and a pointwise 1x1 block."""
    torch.manual_seed(0)
    model = trained_like(MobileOne(widths=(8, 8, 16, 16), branches=(1, 2, 3, 4)))
    x = torch.randn(2, 3, 16, 16)
    result = fold(model, x)
    assert _convs(result) == len(model.stages) + 1
    assert not result.report.left
    close_to_float64(model, result, x)
    _same_as_hand(result, model, x)
    merges = {m.into: m for m in result.report.merges}
    for unit, k in enumerate((1, 2, 3, 4)):
        depthwise = merges[f"stages.{2 * unit + 1}"]
        pointwise = merges.get(f"stages.{2 * unit + 2}")
        identity = ["identity BN"] if unit % 2 == 0 else []
        assert sorted(depthwise.branches) == sorted(["conv1x1", *identity] + ["conv3x3"] * k)
        assert depthwise.convs_removed == k
        if pointwise is not None:  # one 1x1 branch alone, without identity, is no sum
            assert pointwise.branches.count("conv1x1") == k


def test_a_mobileone_block_without_identity_or_scale_branch():
    """A stride-2 pointwise block (no identity, no scale branch) of two 1x1 branches, and
    `0 + 0 + conv` sums."""
    torch.manual_seed(0)
    block = trained_like(MobileOneBlock(4, 6, 1, stride=2, branches=2))
    x = torch.randn(2, 4, 9, 9)
    result = fold(block, x)
    assert _convs(result) == 1
    close_to_float64(block, result, x)


# --------------------------------------------------------------------------- ACNet, RepViT, ...


@pytest.mark.parametrize(
    ("model", "shape", "convs"),
    [
        (ACNet(), (2, 3, 16, 16), 2),
        (ACNet(k=5), (2, 3, 15, 15), 2),
        (RepViTMixer(), (2, 8, 12, 12), 3),  # token mixer merged; channel mixer's 2 convs
        (RepGhostModule(4, 8), (2, 4, 12, 12), 2),  # primary conv; cheap op with fusion BN
        (FastViTStage(), (2, 8, 12, 12), 3),  # RepMixer, fc, RepCPE
        (DiverseBranchBlock(6, stride=2), (2, 6, 9, 9), 1),  # kxk, 1x1 and average pooling
    ],
    ids=["acnet3", "acnet5", "repvit", "repghost", "fastvit", "dbb"],
)
def test_blocks_merge_into_one_conv(model, shape, convs):
    torch.manual_seed(0)
    model, x = trained_like(model), torch.randn(*shape)
    result = fold(model, x)
    assert _convs(result) == convs
    assert not result.report.left
    assert all(m.merged for m in result.report.merges)
    close_to_float64(model, result, x)


def test_fastvit_repmixer_merges_a_subtraction_and_a_layer_scale():
    torch.manual_seed(0)
    model, x = trained_like(FastViTStage()), torch.randn(2, 8, 12, 12)
    result = fold(model, x)
    mixer = next(m for m in result.report.merges if m.into == "token_mixer")
    assert sorted(mixer.branches) == sorted(
        ["identity", "conv3x3", "conv1x1", "identity BN", "identity BN"]
    )
    scale = result.report.decision("token_mixer.layer_scale")
    assert (scale.status, scale.direction) == ("folded", "merged")


class LinearBranches(nn.Module):
    """Two linears and the identity on tokens: a linear residual MLP branch."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def forward(self, x):
        return x + self.a(x) - self.b(x) + self.bn(x)


def test_linear_branches_merge_into_one_linear():
    torch.manual_seed(0)
    model, x = trained_like(LinearBranches()), torch.randn(5, 6)
    result = fold(model, x)
    assert _convs(result) == 1
    assert result.report.merges[0].branches == ["identity", "linear", "linear", "identity BN"]
    close_to_float64(model, result, x)


class ConvThen1x1(nn.Module):
    """BN(conv1x1(BN(conv3x3(x)))) after a sum of a 3x3 and a 1x1 branch (ExpandNets-style
    chains), and a depthwise 3x3 -> 1x1 pair (ShuffleNet's), which would grow if merged."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 8, 3, 1, 1), conv_bn(4, 8, 1)
        self.c = conv_bn(8, 6, 1)
        self.dw, self.pw = conv_bn(6, 6, 3, 2, 1, groups=6), conv_bn(6, 12, 1)

    def forward(self, x):
        y = F.relu(self.c(self.a(x) + self.b(x)))
        return self.pw(self.dw(y))


def test_a_conv_and_the_1x1_conv_after_it_merge_when_no_larger():
    torch.manual_seed(0)
    model, x = trained_like(ConvThen1x1()), torch.randn(2, 4, 9, 9)
    result = fold(model, x)
    assert _convs(result) == 3  # the sum and c in one conv; dw and pw stay
    rows = [m.detail for m in result.report.merges]
    assert rows[0].startswith("merged 2 branches (conv3x3, conv1x1) into a.conv")
    assert rows[1].startswith("merged conv3x3 -> conv1x1 into c.conv (1 layer")
    assert result.report.merges[1].to_dict()["chain"] is True
    assert result.report.decision("b.bn").merged_into == "c.conv"
    assert "1 sum of parallel branches and 1 conv -> 1x1 conv chain merged" in str(result.report)
    close_to_float64(model, result, x)


# --------------------------------------------------------------------------- refusals


class StrideMismatch(nn.Module):
    """BN(conv3x3 stride 2, padding 1) + BN(conv5x5 stride 1, no padding): the outputs have the
    same shape on an 8x8 input, but not the same places."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 2, 1), conv_bn(4, 4, 5, 1, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)


class ReluOnOneBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 1)

    def forward(self, x):
        return self.a(x) + F.relu(self.b(x)) + x


class BranchUsedElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 1)

    def forward(self, x):
        b = self.b(x)
        return self.a(x) + b, b.sigmoid()


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (StrideMismatch(), "conv5x5 has stride 1 and conv3x3 stride 2, so their outputs do not"),
        (ReluOnOneBranch(), "the branch through relu (relu, a nonlinearity) after b.conv is not"),
        (BranchUsedElsewhere(), "the output of b.conv is also used by sigmoid"),
    ],
    ids=["strides", "relu", "used-elsewhere"],
)
def test_sums_that_must_not_merge_stay_with_their_reason(model, reason):
    torch.manual_seed(0)
    model, x = trained_like(model), torch.randn(2, 4, 8, 8)
    result = fold(model, x)
    (merge,) = result.report.merges
    assert not merge.merged and reason in merge.reason, merge.reason
    assert merge.detail.startswith("2 branches") or merge.detail.startswith("3 branches")
    assert _convs(result) == 2  # each branch's BN still folds into its conv
    assert not result.report.left
    with torch.no_grad():
        for got, want in zip(
            torch.utils._pytree.tree_leaves(result.module(x)),
            torch.utils._pytree.tree_leaves(model(x)),
        ):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    row = result.report.to_dict()["merges"][0]
    assert row["status"] == "left" and reason in row["reason"]
    (line,) = merge_lines(result.report)  # the text report's line
    assert line.startswith("left: ") and reason in line


class PlainResidual(nn.Module):
    """A ResNet basic block: relu(BN(conv(relu(BN(conv(x))))) + x) has no branches to merge."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 3, 1, 1)

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + x)


def test_a_plain_residual_is_not_a_sum_of_branches():
    result = fold(trained_like(PlainResidual()), torch.randn(2, 4, 8, 8))
    assert result.report.merges == [] and _convs(result) == 2


# --------------------------------------------------------------------------- the CLI


def _cli_fold(model, x, tmp_path, name="model"):
    path = tmp_path / f"{name}.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)
    report = tmp_path / f"{name}.json"
    result = CliRunner().invoke(main, ["fold", str(path), "--json", str(report), "--samples", "2"])
    return result, json.loads(report.read_text())


def test_cli_merges_and_checks_each_merged_layer_where_it_is(tmp_path, monkeypatch):
    """RepViT's merged token mixer comes before the channel mixer's folded convs: the merge
    renumbers the later convs in the exported file, and each is still checked by its own
    name. One output channel of the merged kernel scaled by 1 + 1e-3 is found there."""
    real = merge_math.combine

    def off_by_a_little(*args):
        weight, bias = real(*args)
        weight[0] *= 1 + 1e-3
        return weight, bias

    monkeypatch.setattr("bnexport.folding.branches.combine", off_by_a_little)
    torch.manual_seed(0)
    model, x = trained_like(RepViTMixer()), torch.randn(2, 8, 12, 12)
    result, data = _cli_fold(model, x, tmp_path)
    assert "1 sum of parallel branches merged into one layer" in result.output
    fold_json = data["batchnorm"]
    assert fold_json["convs_removed"] == 1
    (merge,) = fold_json["merges"]
    assert merge["status"] == "merged" and merge["into"] == "token_mixer"
    assert merge["branches"] == ["conv3x3", "conv1x1", "identity"]
    layers = {row["name"]: row for row in data["verify"]["layers"]}
    assert set(layers) == {"token_mixer", "channel_mixer.0.c", "channel_mixer.2.c"}
    assert "layers_unmapped" not in data["verify"]
    assert [name for name, row in layers.items() if not row["passed"]] == ["token_mixer"]
    assert layers["token_mixer"]["worst_channel"] == 0
    assert data["op_counts"]["before"]["Conv"] == 4 and data["op_counts"]["after"]["Conv"] == 3
