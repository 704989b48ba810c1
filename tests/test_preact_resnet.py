"""Pre-activation ResNet (He et al. 2016, as torchvision-style PreAct-ResNet-18 builds it):
BN -> ReLU -> conv. A BN whose every scale s = gamma / sqrt(var + eps) is positive folds its
scale through the ReLU into the next layer (ReLU(s x + t) = s ReLU(x + t / s)) and keeps one
Add of t / s; with a scale <= 0 in some channel it stays, and the reason counts them."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnexport import fold
from tests.nets import PreActResNet, randomize_bn


def _before_relu(model: PreActResNet) -> set[str]:
    """BNs whose only neighbours are a residual sum before and F.relu after: each block's bn1
    and the final bn. (bn2 also feeds a ReLU but directly follows conv1, so it folds into it.)"""
    return {n for n in dict(model.named_modules()) if n == "bn" or n.endswith(".bn1")}


def _bn2s(model: PreActResNet) -> set[str]:
    return {n for n in dict(model.named_modules()) if n.endswith(".bn2")}


def _run(model: PreActResNet):
    """Fold; the folded float32 program is as close to the float64 original as the float32
    original is (within 4x: each fold rounds once more)."""
    x = torch.randn(2, 3, 16, 16)
    result = fold(model, (x,))
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        floor = (model(x).double() - ref64).abs().max().item()
        err = (result.module(x).double() - ref64).abs().max().item()
    assert err <= 4 * floor + 1e-6 * ref64.abs().max().item(), (err, floor)
    return result


def test_mixed_sign_scales_leave_exactly_the_bns_before_relus():
    torch.manual_seed(0)
    model = randomize_bn(PreActResNet()).eval()
    for name in _before_relu(model):
        bn = model.get_submodule(name)
        with torch.no_grad():
            bn.weight[1] = -abs(float(bn.weight[1])) - 0.1  # at least one negative scale
    negatives = {n: int((model.get_submodule(n).weight <= 0).sum()) for n in _before_relu(model)}
    result = _run(model)
    assert {d.name for d in result.report.left} == _before_relu(model)
    assert {d.name for d in result.report.folded} == _bn2s(model)
    for d in result.report.left:
        count = negatives[d.name]
        assert f"{count} of its {d.channels} channels have a scale <= 0" in d.reason, d.reason
        assert "nonlinearity" in d.reason


def test_positive_scales_pass_the_relu_and_keep_one_add():
    torch.manual_seed(0)
    model = randomize_bn(PreActResNet()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.abs_().add_(0.05)
    result = _run(model)
    assert not result.report.left
    kept = {d.name for d in result.report.folded if d.shift_kept}
    assert kept == _before_relu(model)
    assert {d.into for d in result.report.folded if d.name == "bn"} == {"fc"}
    graph = result.program.graph
    bns = [n for n in graph.nodes if "batch_norm" in str(n.target)]
    adds = [n for n in graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert not bns
    # one Add per kept shift plus the residual sums (one per block)
    blocks = len(model.layers)
    assert len(adds) == len(kept) + blocks


class PostActResNetBlock(nn.Module):
    """Contrast: conv -> BN -> ReLU folds every BN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


def test_post_activation_block_folds_every_bn():
    model = randomize_bn(PostActResNetBlock()).eval()
    x = torch.randn(2, 4, 6, 6)
    result = fold(model, (x,))
    assert len(result.report.folded) == 2 and not result.report.left
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-5)
