"""Re-parameterisable blocks in training form, written as their papers (and timm) define them,
at small widths, with the `reparameterize()` their authors ship for RepVGG and MobileOne:

* RepVGG (Ding et al. 2021, DingXiaoH/RepVGG `RepVGGBlock`): relu(BN(conv3x3(x)) +
  BN(conv1x1(x)) + BN(x)), the identity BN only where stride 1 and in == out;
* MobileOne (Vasu et al. 2023, apple/ml-mobileone `MobileOneBlock`): k over-parameterised
  kxk conv+BN branches, a 1x1 conv+BN scale branch (k > 1) and the identity BN; a unit is a
  depthwise 3x3 block and a pointwise 1x1 block;
* ACNet (Ding et al. 2019, `ACBlock`): BN(conv kxk) + BN(conv 1xk) + BN(conv kx1);
* RepViT (timm `RepVggDw`): BN(BN(dwconv3x3(x)) + dwconv1x1(x) + x);
* RepGhost (timm `RepGhostModule`): relu(BN(dwconv3x3(x1)) + BN(x1)), x1 the primary conv's
  output;
* FastViT (timm `RepMixer`, `RepConditionalPosEnc`): x + layer_scale * (mixer(x) - norm(x))
  with MobileOne blocks as mixer and norm, and dwconv7x7(x) + x.

`trained_like` gives every BN the statistics of a trained network. Used by
tests/test_reparameterize.py and benchmarks/reparameterize.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every BN with trained-like statistics (var log-uniform in 1e-2..1e1, gamma 0.5..1.5),
    every LayerScale around 0.1; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.running_mean.numel()
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 3 - 2))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
        elif isinstance(m, LayerScale2d):
            with torch.no_grad():
                m.gamma.copy_(0.1 * (0.5 + torch.rand(m.gamma.shape, generator=gen)))
    return model.eval()


def conv_bn(cin: int, cout: int, k, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    """The papers' `conv_bn`: a bias-free conv and its BN, as modules `conv` and `bn`."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def fuse_bn(branch: nn.Module, kernel_size: int, groups: int) -> tuple[torch.Tensor, ...]:
    """The papers' `_fuse_bn_tensor`: (kernel, bias) of a conv_bn branch, or of an identity BN
    as a kernel with 1 on the centre tap of each channel's own input (per group)."""
    if isinstance(branch, nn.Sequential):
        kernel, bn = branch.conv.weight, branch.bn
    else:
        bn = branch
        channels = bn.num_features
        per_group = channels // groups
        kernel = torch.zeros(channels, per_group, kernel_size, kernel_size)
        for i in range(channels):
            kernel[i, i % per_group, kernel_size // 2, kernel_size // 2] = 1
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


# --------------------------------------------------------------------------- RepVGG


class RepVGGBlock(nn.Module):
    """DingXiaoH/RepVGG RepVGGBlock (3x3, padding 1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.groups = groups
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.nonlinearity = nn.ReLU()
        self.rbr_reparam: nn.Conv2d | None = None

    def forward(self, x):
        if self.rbr_reparam is not None:
            return self.nonlinearity(self.rbr_reparam(x))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = fuse_bn(self.rbr_dense, 3, self.groups)
        k1, b1 = fuse_bn(self.rbr_1x1, 3, self.groups)
        kid, bid = 0, 0
        if self.rbr_identity is not None:
            kid, bid = fuse_bn(self.rbr_identity, 3, self.groups)
        return k3 + F.pad(k1, [1, 1, 1, 1]) + kid, b3 + b1 + bid

    def reparameterize(self) -> None:
        conv = self.rbr_dense.conv
        kernel, bias = self.get_equivalent_kernel_bias()
        self.rbr_reparam = nn.Conv2d(
            conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=self.groups
        )
        self.rbr_reparam.weight.data = kernel.detach()
        self.rbr_reparam.bias.data = bias.detach()
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.rbr_identity = None


class RepVGG(nn.Module):
    """RepVGG-A-style network: a stride-2 block at the start of each stage, global pooling
    and a linear head."""

    def __init__(self, widths=(8, 8, 16, 32), depths=(1, 2, 2, 1), classes: int = 10):
        super().__init__()
        blocks, cin = [], 3
        for width, depth in zip(widths, depths):
            for d in range(depth):
                blocks.append(RepVGGBlock(cin, width, 2 if d == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        return self.linear(self.stages(x).mean((2, 3)))

    def reparameterize(self) -> RepVGG:
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.reparameterize()
        return self


# --------------------------------------------------------------------------- MobileOne


class MobileOneBlock(nn.Module):
    """apple/ml-mobileone MobileOneBlock: `branches` kxk conv+BN branches, a 1x1 scale branch
    (k > 1) and the identity BN (stride 1, in == out)."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, branches: int = 1
    ):
        super().__init__()
        self.k, self.groups = k, groups
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches)
        )
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.activation = nn.ReLU()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.activation(self.reparam_conv(x))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out += branch(x)
        return self.activation(out)

    def _get_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = 0, 0
        if self.rbr_scale is not None:
            ks, bs = fuse_bn(self.rbr_scale, self.k, self.groups)
            pad = self.k // 2
            kernel, bias = F.pad(ks, [pad, pad, pad, pad]), bs
        if self.rbr_skip is not None:
            ki, bi = fuse_bn(self.rbr_skip, self.k, self.groups)
            kernel, bias = kernel + ki, bias + bi
        for branch in self.rbr_conv:
            kc, bc = fuse_bn(branch, self.k, self.groups)
            kernel, bias = kernel + kc, bias + bc
        return kernel, bias

    def reparameterize(self) -> None:
        conv = self.rbr_conv[0].conv
        kernel, bias = self._get_kernel_bias()
        self.reparam_conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            self.k,
            conv.stride,
            self.k // 2,
            groups=self.groups,
        )
        self.reparam_conv.weight.data = kernel.detach()
        self.reparam_conv.bias.data = bias.detach()
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.rbr_skip = self.rbr_scale = None
        self.rbr_conv = nn.ModuleList()


class MobileOne(nn.Module):
    """MobileOne-style network: a stem block, then units of a depthwise 3x3 block and a
    pointwise 1x1 block, each with `branches` over-parameterised branches (one count for
    every unit, or one per unit); a unit's depthwise block has its stride from `strides`
    (by default 2 for every other unit)."""

    def __init__(
        self,
        widths=(8, 16, 16),
        branches: int | tuple = 2,
        classes: int = 10,
        strides: tuple | None = None,
    ):
        super().__init__()
        blocks = [MobileOneBlock(3, widths[0], 3, 2, branches=1)]
        cin = widths[0]
        counts = branches if isinstance(branches, tuple) else (branches,) * len(widths)
        strides = strides or tuple(2 if i % 2 else 1 for i in range(len(widths)))
        for width, k, stride in zip(widths, counts, strides):
            blocks.append(MobileOneBlock(cin, cin, 3, stride, groups=cin, branches=k))
            blocks.append(MobileOneBlock(cin, width, 1, 1, branches=k))
            cin = width
        self.stages = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        return self.linear(self.stages(x).mean((2, 3)))

    def reparameterize(self) -> MobileOne:
        for m in self.modules():
            if isinstance(m, MobileOneBlock):
                m.reparameterize()
        return self


# --------------------------------------------------------------------------- ACNet


class ACBlock(nn.Module):
    """DingXiaoH/ACNet ACBlock: a kxk conv+BN with a 1xk and a kx1 conv+BN beside it."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__()
        p = k // 2
        self.square = conv_bn(cin, cout, (k, k), stride, p)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, p))
        self.ver = conv_bn(cin, cout, (k, 1), stride, (p, 0))

    def forward(self, x):
        return self.square(x) + self.ver(x) + self.hor(x)


class ACNet(nn.Module):
    def __init__(self, widths=(8, 16), k: int = 3):
        super().__init__()
        self.block1 = ACBlock(3, widths[0], k)
        self.block2 = ACBlock(widths[0], widths[1], k, stride=2)

    def forward(self, x):
        return self.block2(F.relu(self.block1(x)))


class DiverseBranchBlock(nn.Module):
    """DingXiaoH/DiverseBranchBlock with groups >= out channels (a depthwise block): the kxk
    conv+BN, an average pooling branch (AvgPool2d kxk with the conv's stride and padding, then
    its BN) and a 1x1 conv+BN."""

    def __init__(self, channels: int, k: int = 3, stride: int = 1):
        super().__init__()
        p = k // 2
        self.dbb_origin = conv_bn(channels, channels, k, stride, p, groups=channels)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(channels))
        self.dbb_1x1 = conv_bn(channels, channels, 1, stride, 0, groups=channels)

    def forward(self, x):
        return F.relu(self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x))


# --------------------------------------------------------------------------- RepViT, RepGhost


class ConvNorm(nn.Sequential):
    """timm repvit ConvNorm: conv (no bias) as `c`, BN as `bn`."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, pad: int = 0, groups=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class RepVggDw(nn.Module):
    """timm repvit RepVggDw (not legacy): BN(BN(dwconv kxk(x)) + dwconv1x1(x) + x)."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.conv = ConvNorm(dim, dim, k, 1, (k - 1) // 2, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class RepViTMixer(nn.Module):
    """RepViT block's token mixer and channel mixer (without SE): RepVggDw, then a 1x1
    conv-BN-GELU-conv-BN residual."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.token_mixer = RepVggDw(dim)
        self.channel_mixer = nn.Sequential(
            ConvNorm(dim, dim * 2), nn.GELU(), ConvNorm(dim * 2, dim)
        )

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


class RepGhostModule(nn.Module):
    """timm ghostnet/repghost RepGhostModule (reparam, training form): the primary conv, then
    relu(BN(dwconv3x3(x1)) + fusion_bn(x1))."""

    def __init__(self, cin: int, cout: int, dw_size: int = 3):
        super().__init__()
        self.primary_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(cout, cout, dw_size, 1, dw_size // 2, groups=cout, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.fusion_bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        x2 = x2 + self.fusion_bn(x1)
        return self.relu(x2)


# --------------------------------------------------------------------------- FastViT


class FastViTMobileOneBlock(nn.Module):
    """timm fastvit MobileOneBlock (no activation): identity BN, `branches` conv+BN branches,
    a 1x1 scale branch; `out = scale_out + identity_out; out += conv(x)`."""

    def __init__(self, dim: int, k: int, branches: int = 1, scale: bool = True):
        super().__init__()
        self.identity = nn.BatchNorm2d(dim)
        self.conv_kxk = nn.ModuleList(conv_bn(dim, dim, k, 1, k // 2, dim) for _ in range(branches))
        self.conv_scale = conv_bn(dim, dim, 1, 1, 0, dim) if scale and k > 1 else None

    def forward(self, x):
        identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for rc in self.conv_kxk:
            out += rc(x)
        return out


class LayerScale2d(nn.Module):
    """timm fastvit LayerScale2d: x * gamma, gamma (dim, 1, 1)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class RepMixer(nn.Module):
    """timm fastvit RepMixer: x + layer_scale(mixer(x) - norm(x))."""

    def __init__(self, dim: int, k: int = 3):
        super().__init__()
        self.norm = FastViTMobileOneBlock(dim, k, branches=0, scale=False)
        self.mixer = FastViTMobileOneBlock(dim, k, branches=1)
        self.layer_scale = LayerScale2d(dim)

    def forward(self, x):
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


class RepConditionalPosEnc(nn.Module):
    """timm fastvit RepConditionalPosEnc: dwconv7x7 (with bias) + x."""

    def __init__(self, dim: int, k: int = 7):
        super().__init__()
        self.pos_enc = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)

    def forward(self, x):
        return self.pos_enc(x) + x


class FastViTStage(nn.Module):
    """A RepMixer block's mixer and ConvMlp's first 1x1 conv, then a conditional positional
    encoding."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.fc = nn.Conv2d(dim, dim, 1)
        self.pos_emb = RepConditionalPosEnc(dim)

    def forward(self, x):
        x = self.token_mixer(x)
        x = F.gelu(self.fc(x))
        return self.pos_emb(x)


def repvgg_a0() -> RepVGG:
    """RepVGG-A0's layout (widths 48, 48, 96, 192, 1280; depths 1, 2, 4, 14, 1), 1000 classes."""
    return RepVGG(widths=(48, 48, 96, 192, 1280), depths=(1, 2, 4, 14, 1), classes=1000)


def mobileone_s0() -> MobileOne:
    """MobileOne-S0's layout (k = 4 branches; stages of 48, 128, 256, 1024 channels with 2, 8,
    10, 1 units, the first of each with stride 2; the paper's S0 has no SE), 1000 classes."""
    stages = ((48, 2), (128, 8), (256, 10), (1024, 1))
    widths = tuple(w for w, n in stages for _ in range(n))
    strides = tuple(2 if i == 0 else 1 for _, n in stages for i in range(n))
    return MobileOne(widths=widths, branches=4, classes=1000, strides=strides)


def reparam_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every model above in training form with trained-like BNs, and its input shape."""
    return {
        "repvgg": (trained_like(RepVGG()), (2, 3, 32, 32)),
        "mobileone": (trained_like(MobileOne()), (2, 3, 32, 32)),
        "acnet": (trained_like(ACNet()), (2, 3, 16, 16)),
        "repvit": (trained_like(RepViTMixer()), (2, 8, 16, 16)),
        "repghost": (trained_like(RepGhostModule(4, 8)), (2, 4, 16, 16)),
        "fastvit": (trained_like(FastViTStage()), (2, 8, 16, 16)),
    }
