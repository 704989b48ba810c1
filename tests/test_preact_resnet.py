"""Pre-activation ResNet: the BNs left are exactly those followed by a nonlinearity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnexport import fold
from tests.nets import PreActResNet, randomize_bn


def _followed_by_relu(model: PreActResNet) -> set[str]:
    """BNs whose only neighbours are a residual sum before and F.relu after: each block's bn1
    and the final bn. (bn2 also feeds a ReLU but directly follows conv1, so it folds.)"""
    return {n for n in dict(model.named_modules()) if n == "bn" or n.endswith(".bn1")}


def test_preact_resnet_leaves_exactly_the_bns_before_nonlinearities():
    torch.manual_seed(0)
    model = randomize_bn(PreActResNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    result = fold(model, (x,))
    left = {d.name for d in result.report.left}
    assert left == _followed_by_relu(model)
    assert {d.name for d in result.report.folded} == {
        n for n in dict(model.named_modules()) if n.endswith(".bn2")
    }
    for d in result.report.left:
        assert "nonlinearity" in d.reason, d.reason
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-4, rtol=1e-5)


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
