"""Frozen affine maps and the new folds through the PyTorch engine, on blocks written as the
public models define them (structure from torchvision and timm; small widths):

* torchvision's ResNet-50 bottleneck with FrozenBatchNorm2d (its detection backbones);
* timm's ConvNeXt block with LayerScale (`x.mul(gamma.reshape(1, -1, 1, 1))`);
* timm's LeViT LinearNorm: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as on tokens;
* torchvision's DenseNet-121 dense layer and transition (BN -> ReLU -> Conv, concatenations);
* timm's MixNet MixedConv2d (channel groups with 3x3/5x5/7x7 depthwise convs, one BN);
* timm's NF-ResNet ScaledStdConv2d (weights standardized by F.batch_norm in forward), in a
  module named like torchvision's RegNet blocks (`block1-0`).

Each folded program is compared with the float64 original: it must be as close as the
float32 original is (within a few roundings).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from benchmarks.affine_nets import FrozenBatchNorm2d
from bnexport import fold
from bnexport.cli import main
from bnexport.export import export_onnx
from tests.nets import close_to_float64

aten = torch.ops.aten


def _targets(result) -> list:
    return [n.target for n in result.program.graph.nodes if n.op == "call_function"]


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters of every BN (and FrozenBatchNorm2d) as a trained net
    has them: var log-uniform in 1e-3..1e1, positive gamma around 1."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 4 - 3))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model.eval()


# --------------------------------------------------------------------------- FrozenBatchNorm


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck (1x1 -> 3x3 -> 1x1, expansion 4)."""

    def __init__(self, cin: int, width: int, stride: int = 1, norm=FrozenBatchNorm2d):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class FrozenResNet(nn.Module):
    """A ResNet-50-style backbone (stem and two stages of bottlenecks), FrozenBatchNorm2d."""

    def __init__(self, blocks=(3, 2), width=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False), FrozenBatchNorm2d(16)
        layers, cin = [], 16
        for i, n in enumerate(blocks):
            for b in range(n):
                layers.append(Bottleneck(cin, width * 2**i, 2 if b == 0 and i else 1))
                cin = width * 2**i * 4
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layers(x)


def test_frozen_batchnorm_resnet_folds_every_frozen_bn():
    torch.manual_seed(0)
    model = _trained_like(FrozenResNet())
    x = torch.randn(2, 3, 32, 32)
    result = fold(model, (x,))
    frozen = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert {d.name for d in result.report.folded} == set(frozen)
    assert all(d.kind == "FrozenBatchNorm2d" and not d.batchnorm for d in result.report.folded)
    assert all(d.direction == "preceding" for d in result.report.folded)
    assert not result.report.left
    # left: the residual sums only
    assert _targets(result).count(aten.mul.Tensor) == 0
    assert _targets(result).count(aten.add.Tensor) == len(model.layers)
    close_to_float64(model, result, x)
    summary = result.report.summary()
    what = "affine maps (Mul/Add by constants, frozen BNs, layer scales)"
    assert summary.startswith(f"BatchNorm: none; {what}: {len(frozen)} before, 0 after"), summary
    assert "FrozenBatchNorm2d layers.0.bn1" in str(result.report)


# --------------------------------------------------------------------------- ConvNeXt


class ConvNeXtBlock(nn.Module):
    """timm.models.convnext.ConvNeXtBlock (conv_mlp=False): dwconv7x7 -> channels-last
    LayerNorm -> Linear -> GELU -> Linear -> back to channels-first -> LayerScale gamma."""

    def __init__(self, dim: int, ls_init: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


def test_convnext_layer_scale_folds_into_the_last_linear():
    torch.manual_seed(0)
    model = nn.Sequential(*[ConvNeXtBlock(8) for _ in range(3)]).eval()
    with torch.no_grad():
        for block in model:
            block.gamma.uniform_(0.1, 1.0)
    x = torch.randn(2, 8, 8, 8)
    result = fold(model, (x,))
    # the mul is the block's own op, not a module of its own: named by what and where it is
    names = [(d.name.split(" after ")[0], d.name.split(" in ")[-1]) for d in result.report.folded]
    assert names == [("mul", f"{i}") for i in range(3)]
    assert [(d.kind, d.into) for d in result.report.folded] == [
        ("mul", f"{i}.fc2") for i in range(3)
    ]
    assert _targets(result).count(aten.mul.Tensor) == 0
    close_to_float64(model, result, x)


# --------------------------------------------------------------------------- LeViT


class LinearNorm(nn.Module):
    """timm.models.levit.LinearNorm: Linear, then BatchNorm1d over the flattened tokens."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMlp(nn.Module):
    """timm's LeViT residual MLP: LinearNorm -> Hardswish -> LinearNorm, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1, self.ln2 = LinearNorm(dim, 2 * dim), LinearNorm(2 * dim, dim)

    def forward(self, x):
        return x + self.ln2(F.hardswish(self.ln1(x)))


def test_levit_token_batchnorms_fold_through_the_token_reshapes():
    torch.manual_seed(0)
    model = _trained_like(nn.Sequential(*[LeViTMlp(16) for _ in range(4)]))
    x = torch.randn(2, 10, 16)  # (batch, tokens, channels)
    result = fold(model, (x,))
    assert len(result.report.folded) == 8 and not result.report.left
    assert all(d.into == d.name.replace(".bn", ".linear") for d in result.report.folded)
    close_to_float64(model, result, x)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer: BN -> ReLU -> conv1x1 -> BN -> ReLU -> conv3x3
    on the concatenation of every earlier feature map."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNetStage(nn.Module):
    """A dense block of `layers` layers and torchvision's transition (BN -> ReLU -> conv1x1 ->
    avgpool)."""

    def __init__(self, cin: int = 16, growth: int = 8, layers: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.dense = nn.ModuleList([DenseLayer(cin + k * growth, growth) for k in range(layers)])
        total = cin + layers * growth
        self.norm, self.conv = nn.BatchNorm2d(total), nn.Conv2d(total, total // 2, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.dense:
            features.append(layer(features))
        x = self.conv(F.relu(self.norm(torch.cat(features, 1))))
        return F.avg_pool2d(x, 2)


def test_densenet_preactivation_bns_pass_their_relu_when_scales_are_positive():
    """DenseNet-121 keeps 62 of its 121 BNs today: each BN after a concatenation feeds a ReLU.
    With positive scales all fold (one Add each before the ReLU); a negative scale keeps the
    BN and names the count."""
    torch.manual_seed(0)
    model = _trained_like(DenseNetStage())
    x = torch.randn(2, 3, 8, 8)
    result = fold(model, (x,))
    assert not result.report.left
    kept = {d.name for d in result.report.folded if d.shift_kept}
    assert kept == {f"dense.{k}.norm1" for k in range(6)} | {"norm"}
    assert aten.batch_norm.default not in _targets(result)
    close_to_float64(model, result, x)

    with torch.no_grad():
        model.dense[2].norm1.weight[[0, 3, 7]] *= -1
    result = fold(model, (x,))
    (left,) = result.report.left
    assert left.name == "dense.2.norm1"
    assert "3 of its 32 channels have a scale <= 0 (channel 0, 3, 7)" in left.reason
    close_to_float64(model, result, x)


# --------------------------------------------------------------------------- MixNet


class MixedConv2d(nn.Module):
    """timm.layers.mixed_conv2d.MixedConv2d: channel groups, one depthwise conv per kernel
    size (3, 5, 7), concatenated; then one BN and SiLU (MixNet-S's depthwise stage)."""

    def __init__(self, channels: int = 12, kernels=(3, 5, 7)):
        super().__init__()
        self.splits = [channels // len(kernels)] * len(kernels)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
            for c, k in zip(self.splits, kernels)
        )
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        x = torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)
        return F.silu(self.bn(x))


def test_mixnet_mixed_conv_bn_folds_into_each_branch():
    torch.manual_seed(0)
    model = _trained_like(nn.Sequential(MixedConv2d(), MixedConv2d()))
    x = torch.randn(2, 12, 9, 9)
    result = fold(model, (x,))
    assert [d.into for d in result.report.folded] == [
        f"{i}.convs.0, {i}.convs.1, {i}.convs.2" for i in range(2)
    ]
    assert aten.batch_norm.default not in _targets(result)
    close_to_float64(model, result, x)


# --------------------------------------------------------------------------- NF-ResNet


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d: the weight standardized per output channel by
    F.batch_norm(training=True) at every call, times a learned gain."""

    def __init__(self, cin: int, cout: int, k: int, padding: int = 0, eps: float = 1e-6):
        super().__init__(cin, cout, k, padding=padding)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


class NFStage(nn.Module):
    """NF-ResNet-style convs, then a BN, in modules named as torchvision's RegNet names its
    blocks (`block1-0`: not a Python identifier)."""

    def __init__(self):
        super().__init__()
        self.add_module("block1-0", ScaledStdConv2d(3, 8, 3, padding=1))
        self.add_module("block1-1", ScaledStdConv2d(8, 8, 1))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.relu(getattr(self, "block1-0")(x))
        return self.bn(getattr(self, "block1-1")(x))


def test_weight_standardizing_batchnorms_are_computed_once(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(NFStage())
    with torch.no_grad():
        for name in ("block1-0", "block1-1"):
            model.get_submodule(name).gain.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    result = fold(model, (x,))
    computed = [d for d in result.report.folded if d.direction == "computed"]
    assert {d.name.split(".")[0] for d in computed} == {"block1-0", "block1-1"}
    assert all("computed once at fold time" in d.detail for d in computed)
    assert result.report.decision("bn").into == "block1-1"
    assert aten.batch_norm.default not in _targets(result)
    close_to_float64(model, result, x)
    info = export_onnx(result, tmp_path / "nf.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "nf.onnx")).graph.node]
    assert info.batchnorm_nodes == 0 and ops.count("Conv") == 2 and "ReduceMean" not in ops


# --------------------------------------------------------------------------- the CLI


def test_cli_folds_a_frozen_bn_backbone_and_verifies_every_layer(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(FrozenResNet(blocks=(2,)))
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "frozen.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), path)
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["fold", str(path), "--json", str(report), "--samples", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert data["batchnorm"]["affine_maps"] == {"total": frozen, "folded": frozen}
    assert [row["batchnorm"] for row in data["batchnorm"]["layers"]] == [False] * frozen
    assert data["verify"]["passed"] and len(data["verify"]["layers"]) == frozen
    graph = onnx.load(str(tmp_path / "frozen.onnx")).graph
    assert [n.op_type for n in graph.node].count("Mul") == 0


# --------------------------------------------------------------------------- properties

_FORMS = ("x*c", "c*x", "x+c", "x-c", "c-x", "x/c", "x*k", "x+k")


class ArithmeticAfterConv(nn.Module):
    """conv -> a chain of arithmetic by per-channel constants (c, buffers of shape (C, 1, 1))
    and numbers (k) -> ReLU -> conv."""

    def __init__(self, forms: list[str], seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.forms = forms
        for k, _ in enumerate(forms):
            sign = torch.where(torch.rand(6, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
            self.register_buffer(f"c{k}", (0.5 + torch.rand(6, 1, 1, generator=gen)) * sign)

    def forward(self, x):
        y = self.conv1(x)
        for k, form in enumerate(self.forms):
            y = _arithmetic(form, y, getattr(self, f"c{k}"))
        return self.conv2(F.relu(y))


def _arithmetic(form: str, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if form == "x*c":
        return y * c
    if form == "c*x":
        return c * y
    if form == "x+c":
        return y + c
    if form == "x-c":
        return y - c
    if form == "c-x":
        return c - y
    if form == "x/c":
        return y / c
    return y * 1.5 if form == "x*k" else y + 0.25


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forms=st.lists(st.sampled_from(_FORMS), min_size=1, max_size=4), seed=st.integers(0, 99))
def test_any_chain_of_arithmetic_by_constants_folds_exactly(forms, seed):
    """Folding never changes outputs: the chain is one map, folded into the conv before it,
    and nothing of it stays."""
    torch.manual_seed(seed)
    model = ArithmeticAfterConv(forms, seed).eval()
    x = torch.randn(2, 3, 6, 6)
    result = fold(model, (x,))
    (d,) = result.report.decisions
    assert d.folded and d.into == "conv1" and d.direction == "preceding", d
    targets = _targets(result)
    assert not {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor} & set(targets)
    close_to_float64(model, result, x, factor=8.0)
    s = torch.ones(6, dtype=torch.float64)
    with torch.no_grad():  # the folded bias against an independent float64 computation
        t = model.conv1.bias.double().clone()
        for k, form in enumerate(forms):
            c = getattr(model, f"c{k}").double().flatten()
            s, t = {
                "x*c": (s * c, t * c),
                "c*x": (s * c, t * c),
                "x+c": (s, t + c),
                "x-c": (s, t - c),
                "c-x": (-s, c - t),
                "x/c": (s / c, t / c),
                "x*k": (s * 1.5, t * 1.5),
                "x+k": (s, t + 0.25),
            }[form]
    folded = dict(result.program.state_dict)
    bias = next(v for k, v in folded.items() if k.startswith("conv1") and k.endswith("bias"))
    np.testing.assert_allclose(bias.double().numpy(), t.numpy(), rtol=1e-6, atol=1e-6)


class NFDownsample(nn.Module):
    """timm's NormFreeBlock with DownsampleAvg: `relu(x) * beta` feeds the shortcut (an
    AvgPool2d with ceil_mode, then a 1x1 conv) and the main conv; `out * alpha` after it."""

    def __init__(self, cin: int = 8, cout: int = 16, beta: float = 0.8, alpha: float = 0.2):
        super().__init__()
        self.beta, self.alpha = beta, alpha
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.down = nn.Conv2d(cin, cout, 1)
        self.conv1 = nn.Conv2d(cin, cout, 3, 2, 1)

    def forward(self, x):
        out = F.relu(x) * self.beta
        return self.down(self.pool(out)) + self.conv1(out) * self.alpha


def test_a_scalar_map_folds_into_both_branches_of_a_downsampling_block():
    torch.manual_seed(0)
    model = NFDownsample().eval()
    x = torch.randn(2, 8, 7, 7)
    result = fold(model, (x,))
    into = {d.into for d in result.report.folded}
    assert into == {"conv1, down", "conv1"}, str(result.report)
    assert aten.mul.Tensor not in _targets(result)
    close_to_float64(model, result, x)
