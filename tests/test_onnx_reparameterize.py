"""Structural re-parameterisation through the ONNX engine: the blocks of
benchmarks/reparam_nets.py (RepVGG, MobileOne with 1..4 branches, ACNet, RepViT, RepGhost,
FastViT, DBB), in training form, exported by torch.onnx (dynamo, unoptimized) as one graph, then
folded by `bnexport fold FILE.onnx`: one Conv per block, no BatchNormalization, outputs equal
to the float64 original, every merged Conv checked where its sum was. Sums that must not merge
are hand-built graphs that stay with their reason.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from benchmarks.reparam_nets import (
    ACBlock,
    DiverseBranchBlock,
    MobileOne,
    RepConditionalPosEnc,
    RepGhostModule,
    RepMixer,
    RepVGGBlock,
    RepVggDw,
    trained_like,
)
from bnexport.cli import main
from tests.onnx_builders import GraphBuilder, fold_proto, max_rel_diff, run


class Zoo(nn.Module):
    """Every block in a row: ACNet, RepVGG, MobileOne units of 1..4 branches, RepViT's token
    mixer, a RepGhost module, FastViT's RepMixer and conditional positional encoding, a
    Diverse Branch Block with its average pooling branch."""

    def __init__(self):
        super().__init__()
        self.acnet = ACBlock(3, 8)
        self.repvgg = RepVGGBlock(8, 8)
        self.mobileone = nn.Sequential(
            *MobileOne(widths=(8, 8, 16, 16), branches=(1, 2, 3, 4)).stages[1:]
        )
        self.repvit = RepVggDw(16)
        self.repghost = RepGhostModule(16, 16)
        self.repmixer = RepMixer(16)
        self.cpe = RepConditionalPosEnc(16)
        self.dbb = DiverseBranchBlock(16)

    def forward(self, x):
        x = self.repvgg(F.relu(self.acnet(x)))
        x = self.repghost(self.repvit(self.mobileone(x)))
        return self.dbb(self.cpe(self.repmixer(x)))


# convs after the merges: one per block, the RepGhost module's primary conv beside its merge
ZOO_CONVS = 1 + 1 + 8 + 1 + 2 + 1 + 1 + 1


def test_onnx_engine_merges_every_block_and_checks_each_merged_conv(tmp_path):
    torch.manual_seed(0)
    model, x = trained_like(Zoo()), torch.randn(2, 3, 16, 16)
    path = tmp_path / "zoo.onnx"
    torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False).save(str(path))
    original = onnx.load(str(path))
    report_path = tmp_path / "zoo.json"
    result = CliRunner().invoke(
        main, ["fold", str(path), "--json", str(report_path), "--samples", "2"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report_path.read_text())
    fold = data["batchnorm"]
    assert fold["left"] == [] and all(m["status"] == "merged" for m in fold["merges"])
    into = {m["into"]: m["branches"] for m in fold["merges"]}
    assert into["repvgg"] == ["conv3x3", "conv1x1", "identity BN"]
    assert sorted(into["acnet"]) == ["conv1x3", "conv3x1", "conv3x3"]
    # units of 1..4 branches; the depthwise blocks of units 1 and 3 have stride 2, no identity
    assert sorted(into["mobileone.4"]) == sorted(["conv1x1", "identity BN", *["conv3x3"] * 3])
    assert sorted(into["mobileone.6"]) == sorted(["conv1x1", *["conv3x3"] * 4])
    assert into["mobileone.7"] == ["identity BN"] + ["conv1x1"] * 4
    assert into["dbb"] == ["conv3x3", "conv1x1", "avgpool3x3"]
    assert sorted(into["repmixer"]) == sorted(
        ["identity", "conv3x3", "conv1x1", "identity BN", "identity BN"]
    )
    folded = onnx.load(str(tmp_path / "zoo.folded.onnx"))
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Conv") == ZOO_CONVS and "BatchNormalization" not in ops
    assert sum(o in ("Add", "Sub", "Mul") for o in ops) == 0
    layers = data["verify"]["layers"]
    assert all(row["passed"] for row in layers) and "layers_unmapped" not in data["verify"]
    checked = {row["name"] for row in layers if row["batchnorm"].endswith("merged branches")}
    assert checked == set(into)
    # as close to the float64 original as the float32 original file is
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double()).numpy()
    feeds = {"x": x.numpy()}
    floor = np.abs(run(original, feeds)[0] - ref64).max()
    err = np.abs(run(folded, feeds)[0] - ref64).max()
    assert err <= 4 * floor + 1e-7 * np.abs(ref64).max(), (err, floor)


def _sum_graph(second: str) -> onnx.ModelProto:
    """x -> BN(Conv3x3 stride 2, pads 1) + (BN(Conv5x5 stride 1) | Relu(BN(Conv1x1 stride 2)))
    on an 8x8 input."""
    b = GraphBuilder(seed=1)
    a = b.bn(b.node("Conv", ["x", b.weight(4, 4, 3, 3)], strides=[2, 2], pads=[1, 1, 1, 1]), 4)
    if second == "stride":
        other = b.bn(b.node("Conv", ["x", b.weight(4, 4, 5, 5)]), 4)
    else:
        other = b.node(
            "Relu", [b.bn(b.node("Conv", ["x", b.weight(4, 4, 1, 1)], strides=[2, 2]), 4)]
        )
    y = b.node("Add", [a, other])
    return b.model([("x", [1, 4, 8, 8])], [y])


def test_onnx_sums_that_must_not_merge_stay_with_their_reason():
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    for second, reason in (
        ("stride", "has stride 1 and conv3x3 stride 2, so their outputs do not align"),
        ("relu", "the branch through Relu"),
    ):
        model = _sum_graph(second)
        folded, report = fold_proto(model)
        (merge,) = report.merges
        assert not merge.merged and reason in merge.reason, merge.reason
        assert [n.op_type for n in folded.graph.node].count("Conv") == 2
        assert not report.left  # each branch's BN still folds into its conv
        assert max_rel_diff(run(model, feeds), run(folded, feeds)) <= 1e-5


def test_onnx_merge_can_be_turned_off():
    """RepVGG's block as a hand-built graph: left as three convs without the merge."""
    b = GraphBuilder(seed=2)
    a = b.bn(b.node("Conv", ["x", b.weight(4, 4, 3, 3)], pads=[1, 1, 1, 1]), 4)
    c = b.bn(b.node("Conv", ["x", b.weight(4, 4, 1, 1)]), 4)
    model = b.model([("x", [1, 4, 8, 8])], [b.node("Add", [b.node("Add", [a, c]), b.bn("x", 4)])])
    folded, report = fold_proto(model, merge_branches=False)
    assert report.merges == [] and [d.name for d in report.left] == [report.decisions[-1].name]
    folded, report = fold_proto(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert max_rel_diff(run(model, feeds), run(folded, feeds)) <= 1e-5


def test_onnx_conv_and_the_1x1_conv_after_it_merge():
    """Conv3x3 -> BN -> Conv1x1 -> BN -> Relu becomes one Conv, named as the 1x1 Conv's output;
    a depthwise 3x3 -> 1x1 pair stays (merged, it would grow)."""
    b = GraphBuilder(seed=3)
    y = b.bn(b.node("Conv", ["x", b.weight(8, 4, 3, 3)], pads=[1, 1, 1, 1]), 8)
    y = b.node("Relu", [b.bn(b.node("Conv", [y, b.weight(6, 8, 1, 1)]), 6)])
    y = b.bn(b.node("Conv", [y, b.weight(6, 1, 3, 3)], pads=[1, 1, 1, 1], group=6), 6)
    y = b.bn(b.node("Conv", [y, b.weight(12, 6, 1, 1)]), 12)
    model = b.model([("x", [1, 4, 8, 8])], [y])
    folded, report = fold_proto(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Conv"]
    (chain,) = report.merges
    assert chain.chain and chain.detail.startswith("merged conv3x3 -> conv1x1 into")
    assert not report.left
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert max_rel_diff(run(model, feeds), run(folded, feeds)) <= 1e-5
