"""Reference architectures and trained-like BatchNorm statistics for the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def batchnorm_nodes(module: torch.fx.GraphModule) -> int:
    """The BatchNorm ops in a graph module, counted from the ATen op names themselves (every
    batch-norm op, whether or not its output is read)."""
    return sum(
        n.op == "call_function" and "batch_norm" in str(n.target) for n in module.graph.nodes
    )


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN trained-like state: var log-uniform in 1e-4..1e2, gamma in [-2, 2]."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 6 - 3)
            m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 6 - 4))
            m.num_batches_tracked.fill_(100)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 4 - 2)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
    return model


class PreActBlock(nn.Module):
    """He et al. 2016: BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, widths=(8, 16), blocks=2, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(PreActBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layers(self.stem(x))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------- random architectures


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def build_from_spec(spec: list[tuple], in_channels: int) -> nn.Module:
    """Build an nn.Sequential from (kind, params) steps on (N, C, H, W) tensors.

    Kinds: ("conv", cout, k, stride, groups, pad, mode, bias), ("convT", cout, k, stride, groups,
    bias), ("bn",), ("relu",), ("drop",), ("res", substeps) (a residual block keeping shape),
    ("head", classes, bn_before, bn_after) (flatten -> [BN1d] -> Linear -> [BN1d]), last only.
    """
    layers: list[nn.Module] = []
    c = in_channels
    for step in spec:
        kind = step[0]
        if kind == "conv":
            _, cout, k, stride, groups, pad, mode, bias = step
            layers.append(
                nn.Conv2d(c, cout, k, stride, pad, groups=groups, bias=bias, padding_mode=mode)
            )
            c = cout
        elif kind == "convT":
            _, cout, k, stride, groups, bias = step
            layers.append(nn.ConvTranspose2d(c, cout, k, stride, groups=groups, bias=bias))
            c = cout
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "drop":
            layers.append(nn.Dropout(0.3))
        elif kind == "res":
            layers.append(Residual(build_from_spec(step[1], c)))
        elif kind == "head":
            _, classes, bn_before, bn_after, features = step
            layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
            if bn_before:
                layers.append(nn.BatchNorm1d(c * 4))
            layers.append(nn.Linear(c * 4, classes))
            if bn_after:
                layers.append(nn.BatchNorm1d(classes))
    return nn.Sequential(*layers)


class SmallNet(nn.Module):
    """Tiny checkpoint model for loader tests: conv-BN-ReLU-flatten-linear on (N, 1, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def small_net() -> SmallNet:
    return SmallNet()


def not_a_module() -> int:
    return 42


class AssertsOutsideExport(SmallNet):
    """Traces fine, then fails with a bare `assert` (an exception with no message) when run."""

    def forward(self, x):
        if not torch.compiler.is_exporting():
            assert False  # noqa: B011 - the point: an AssertionError without a message
        return super().forward(x)


def asserts_outside_export() -> AssertsOutsideExport:
    return AssertsOutsideExport()


@torch.library.custom_op("bnexport_tests::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    """An op torch.export traces but torch.onnx cannot translate."""
    return x * 2


@twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NotExportableToOnnx(SmallNet):
    def forward(self, x):
        return twice(super().forward(x))


def not_exportable_to_onnx() -> NotExportableToOnnx:
    return NotExportableToOnnx()


class WithUnusedBatchNorm(nn.Module):
    """One BN folds, one stays (before a nonlinearity), one is never called."""

    def __init__(self):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.spare_bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(torch.relu(self.input_bn(x))))).flatten(1))


class ManyReasons(nn.Module):
    """A small net whose report has every kind of line: BNs left for several reasons (after an
    addition, on the model input, after a max pool, after a conv whose output is also used
    elsewhere), a shift kept as an Add (a BN before a zero-padded conv), a layer called twice
    whose BN folds once, and a BN that forward never calls."""

    def __init__(self, width: int = 8, blocks: int = 4, classes: int = 5):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(3)
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.pool_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(*(PreActBlock(width, width) for _ in range(blocks)))
        self.tap = nn.Conv2d(width, width, 1)
        self.tap_bn = nn.BatchNorm2d(width)
        self.pre_bn = nn.BatchNorm2d(width)
        self.padded = nn.Conv2d(width, width, 3, padding=1)
        self.shared = nn.Conv2d(width, width, 1, bias=False)
        self.shared_bn = nn.BatchNorm2d(width)
        self.spare_bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(F.relu(self.input_bn(x)))
        x = self.blocks(F.relu(self.pool_bn(F.max_pool2d(x, 3, 1, 1))))
        t = self.tap(x)
        x = self.padded(self.pre_bn(F.relu(self.tap_bn(t)) + t))
        for _ in range(2):
            x = F.relu(self.shared_bn(self.shared(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def many_reasons() -> ManyReasons:
    return randomize_bn(ManyReasons()).eval()


def close_to_float64(model: nn.Module, result, x: torch.Tensor, factor: float = 4.0) -> float:
    """The folded program's error against the float64 original, at most `factor` times the
    float32 original's own (plus a rounding of the scale); returns the error."""
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        floor = (model(x).double() - ref64).abs().max().item()
        err = (result.module(x).double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= factor * floor + 1e-7 * scale, (err, floor, scale)
    return err
