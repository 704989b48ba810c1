"""Networks whose frozen affine maps are not (only) BatchNorm nodes, for
benchmarks/affine_maps.py: each small, but written as its public definition builds it.

* `FrozenBNResNet`: torchvision's ResNet-50 with `norm_layer=FrozenBatchNorm2d`, as the
  detection models build their backbone (`x * scale + shift` from buffers).
* `ConvNeXt`: timm's ConvNeXt blocks, LayerScale `gamma` after the second Linear.
* `DenseNet`: torchvision's DenseNet-121 dense layers (BN -> ReLU -> conv on concatenated
  features) and a transition.
* `PreActResNet18`: the pre-activation ResNet-18 (BN -> ReLU -> conv), width-scaled.
* `MixNet`: timm's MixNet-S blocks: mixed depthwise kernels (3x3/5x5/7x7) and split 1x1 convs,
  concatenated, then one BN.
* `benchmarks.deep_nets.LeViT`: timm's LeViT-128S first stage (Linear -> flatten(0, 1) ->
  BatchNorm1d -> reshape_as on the tokens).
* `NFResNet`: timm's NF-ResNet-50 blocks: `ScaledStdConv2d` (weights standardized by
  `F.batch_norm(weight, training=True)` on every call) and the scalar `beta` / `alpha` gains.
* `RegNet`: torchvision's RegNetY, modules named `trunk_output.block1.block1-0`.

`trained_like` gives every BN (and FrozenBatchNorm2d) the state `benchmarks.nets.randomize_bn`
draws: running mean in [-1, 1], running var log-uniform in 1e-2..1e1, gamma in [0.5, 1.5] with
a negative sign for about one channel in ten, beta in [-0.5, 0.5].
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.deep_nets import LeViT
from benchmarks.nets import PreActBlock, ResNet50, randomize_bn

# ---------------------------------------------------------------- torchvision FrozenBatchNorm2d


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d: a BatchNorm2d whose statistics and affine
    parameters are buffers, computed as `x * scale + shift` (no BatchNormalization op)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def freeze_batchnorms(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d holding its state (what torchvision's
    detection models do when they load a classification checkpoint into their backbone)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(model, name, frozen)
        else:
            freeze_batchnorms(child)
    return model


class FrozenBNResNet(ResNet50):
    """torchvision's `resnet50(norm_layer=FrozenBatchNorm2d)`, the backbone of its Faster /
    Mask R-CNN: the 7x7 stem, bottleneck stages (3, 4, 6 blocks of ResNet-50's first three
    stages) at stem width `base`, every norm a FrozenBatchNorm2d; the classifier head kept so the
    output is one tensor. Built with BatchNorm2d, `trained_like`, then frozen."""


# ---------------------------------------------------------------------------- timm ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock (conv_mlp=False): dwconv 7x7 -> permute -> LayerNorm -> Linear
    (4x) -> GELU -> Linear -> permute -> `x.mul(gamma.reshape(1, -1, 1, 1))` (LayerScale) ->
    + shortcut."""

    def __init__(self, dim: int, ls_init_value: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(F.gelu(self.fc1(self.norm(x))))
        x = x.permute(0, 3, 1, 2).mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXt(nn.Module):
    """timm's ConvNeXt (ConvNeXt-Atto layout scaled down): a 4x4 patchify stem + LayerNorm2d,
    stages of ConvNeXtBlocks (`depths`, `dims`) with LayerNorm2d + 2x2 strided conv between,
    global pool -> LayerNorm -> Linear head. LayerScale gammas: trained-like values (log-uniform
    in 0.03..1, one in ten negative), not the 1e-6 initialisation."""

    def __init__(self, depths=(2, 2), dims=(32, 64), classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages, cin = [], dims[0]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            down = (
                nn.Sequential(LayerNorm2d(cin, eps=1e-6), nn.Conv2d(cin, dim, 2, 2))
                if i > 0
                else nn.Identity()
            )
            stages.append(nn.Sequential(down, *[ConvNeXtBlock(dim) for _ in range(depth)]))
            cin = dim
        self.stages = nn.Sequential(*stages)
        self.head_norm = nn.LayerNorm(cin, eps=1e-6)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.head_norm(x.mean((2, 3))))


# ------------------------------------------------------------------------ torchvision DenseNet


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer: concat(inputs) -> norm1 -> ReLU -> conv1 1x1 (bn_size *
    growth) -> norm2 -> ReLU -> conv2 3x3 (growth)."""

    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]):
        x = torch.cat(inputs, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """torchvision's _DenseBlock: every layer reads the concatenation of all earlier outputs."""

    def __init__(self, layers: int, cin: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet-121 structure (conv0 7x7 s2 -> norm0 -> ReLU -> maxpool, dense
    blocks with BN -> ReLU -> conv transitions, norm5 -> ReLU -> pool -> classifier) at growth
    12, bn_size 4, blocks (6, 8) instead of growth 32, blocks (6, 12, 24, 16)."""

    def __init__(self, growth: int = 12, blocks=(6, 8), init: int = 24, classes: int = 100):
        super().__init__()
        feats: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(3, init, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(init),
            relu0=nn.ReLU(),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        c = init
        for i, n in enumerate(blocks):
            feats[f"denseblock{i + 1}"] = DenseBlock(n, c, growth, 4)
            c += n * growth
            if i != len(blocks) - 1:
                feats[f"transition{i + 1}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(c),
                        relu=nn.ReLU(),
                        conv=nn.Conv2d(c, c // 2, 1, bias=False),
                        pool=nn.AvgPool2d(2, 2),
                    )
                )
                c //= 2
        feats["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(feats)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        out = F.relu(self.features(x))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ------------------------------------------------------------------------ PreAct-ResNet-18


class PreActResNet18(nn.Module):
    """The pre-activation ResNet-18 of He et al. 2016 (the CIFAR form of kuangliu's
    pytorch-cifar and benchmarks.nets.PreActResNet18): a 3x3 stem, 4 stages of 2 PreActBlocks
    (BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, 1x1 projection on the activated input),
    a final BN -> ReLU -> pool -> Linear; widths (16, 32, 64, 128) instead of (64 .. 512)."""

    def __init__(self, base: int = 16, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        blocks, cin = [], base
        for i in range(4):
            w = base * 2**i
            for b in range(2):
                blocks.append(PreActBlock(cin, w, 2 if b == 0 and i > 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------- timm MixNet


def _split_channels(channels: int, groups: int) -> list[int]:
    split = [channels // groups] * groups
    split[0] += channels - sum(split)
    return split


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: the input split into channel groups, one conv per group (kernel
    sizes `kernels`, depthwise or not), the outputs concatenated."""

    def __init__(self, cin: int, cout: int, kernels, stride: int = 1, depthwise: bool = False):
        super().__init__()
        in_splits = _split_channels(cin, len(kernels))
        out_splits = _split_channels(cout, len(kernels))
        for i, (k, ci, co) in enumerate(zip(kernels, in_splits, out_splits)):
            groups = ci if depthwise else 1
            self.add_module(str(i), nn.Conv2d(ci, co, k, stride, k // 2, groups=groups, bias=False))
        self.splits = in_splits

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.values())], 1)


class SqueezeExcite(nn.Module):
    """timm's efficientnet SqueezeExcite: mean -> 1x1 reduce -> act -> 1x1 expand -> sigmoid
    gate (a data-dependent Mul, not an affine map)."""

    def __init__(self, chs: int, rd: int, act: type[nn.Module]):
        super().__init__()
        self.conv_reduce = nn.Conv2d(chs, rd, 1)
        self.act = act()
        self.conv_expand = nn.Conv2d(rd, chs, 1)

    def forward(self, x):
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class MixInvertedResidual(nn.Module):
    """timm's InvertedResidual as MixNet builds it: conv_pw (1x1, split in `pw_groups`) ->
    bn1 -> act -> conv_dw (MixedConv2d, depthwise `kernels`) -> bn2 -> act -> SE -> conv_pwl
    (1x1, split in `pwl_groups`) -> bn3 (+ shortcut)."""

    def __init__(
        self, cin, cout, kernels, stride, expand, pw_groups=1, pwl_groups=1, se=0.0, act=nn.ReLU
    ):
        super().__init__()
        mid = cin * expand
        self.conv_pw = MixedConv2d(cin, mid, [1] * pw_groups)
        self.bn1, self.act1 = nn.BatchNorm2d(mid), act()
        self.conv_dw = MixedConv2d(mid, mid, kernels, stride, depthwise=True)
        self.bn2, self.act2 = nn.BatchNorm2d(mid), act()
        self.se = SqueezeExcite(mid, max(1, int(cin * se)), act) if se else nn.Identity()
        self.conv_pwl = MixedConv2d(mid, cout, [1] * pwl_groups)
        self.bn3 = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.act1(self.bn1(self.conv_pw(x)))
        y = self.se(self.act2(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.residual else y


class MixNet(nn.Module):
    """timm's MixNet-S (`_gen_mixnet_s`) with its stage layout shortened: stem 3x3 s2 16 ->
    depthwise-separable block -> `ir_k3_a1.1_p1.1_s2_e6_c24`, `ir_k3_a1.1_p1.1_e3_c24` (ReLU) ->
    `ir_k3.5.7_s2_e6_c40_se0.5`, `ir_k3.5_a1.1_p1.1_e6_c40_se0.5` (Swish) ->
    `ir_k3.5.7_p1.1_s2_e6_c80_se0.25`, `ir_k3.5_p1.1_e6_c80_se0.25` (Swish) -> 1x1 head conv
    (256 instead of 1536) -> BN -> ReLU -> pool -> Linear."""

    def __init__(self, classes: int = 100):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 16, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.ds_dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False)
        self.ds_bn1 = nn.BatchNorm2d(16)
        self.ds_pw = nn.Conv2d(16, 16, 1, bias=False)
        self.ds_bn2 = nn.BatchNorm2d(16)
        silu = nn.SiLU
        self.blocks = nn.Sequential(
            MixInvertedResidual(16, 24, [3], 2, 6, 2, 2),
            MixInvertedResidual(24, 24, [3], 1, 3, 2, 2),
            MixInvertedResidual(24, 40, [3, 5, 7], 2, 6, se=0.5, act=silu),
            MixInvertedResidual(40, 40, [3, 5], 1, 6, 2, 2, se=0.5, act=silu),
            MixInvertedResidual(40, 80, [3, 5, 7], 2, 6, 1, 2, se=0.25, act=silu),
            MixInvertedResidual(80, 80, [3, 5], 1, 6, 1, 2, se=0.25, act=silu),
        )
        self.conv_head = nn.Conv2d(80, 256, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(256)
        self.classifier = nn.Linear(256, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = x + self.ds_bn2(self.ds_pw(F.relu(self.ds_bn1(self.ds_dw(x)))))
        x = F.relu(self.bn2(self.conv_head(self.blocks(x))))
        return self.classifier(x.mean((2, 3)))


# ---------------------------------------------------------------------------- timm NF-ResNet

RELU_GAMMA = 1.7139588594436646  # timm's _nonlin_gamma["relu"], moved into ScaledStdConv2d


class ScaledStdConv2d(nn.Conv2d):
    """timm.layers.std_conv.ScaledStdConv2d: every call standardizes the weight per output
    channel with `F.batch_norm(weight, None, None, weight=gain * scale, training=True)`
    (a BatchNorm of a constant), scale = gamma / sqrt(fan-in)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, gamma=RELU_GAMMA, eps=1e-8):
        super().__init__(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

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
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, 1, self.groups)


class NormFreeBlock(nn.Module):
    """timm's NormFreeBlock (reg=False, as nf_resnet50 builds it): out = ReLU(x) * beta;
    shortcut = DownsampleAvg(out) where the shape changes; 1x1 -> ReLU -> 3x3 -> ReLU -> 1x1
    ScaledStdConv2d; out * alpha + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, alpha: float, beta: float):
        super().__init__()
        mid = cout // 4
        self.alpha, self.beta = alpha, beta
        self.downsample = None
        if cin != cout or stride != 1:
            pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
            self.downsample = nn.Sequential(
                pool if stride > 1 else nn.Identity(), ScaledStdConv2d(cin, cout, 1)
            )
        self.conv1 = ScaledStdConv2d(cin, mid, 1)
        self.conv2 = ScaledStdConv2d(mid, mid, 3, stride)
        self.conv3 = ScaledStdConv2d(mid, cout, 1)

    def forward(self, x):
        out = F.relu(x) * self.beta
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv2(F.relu(self.conv1(out)))
        out = self.conv3(F.relu(out))
        return out * self.alpha + shortcut


class NFResNet(nn.Module):
    """timm's NormFreeNet as `nf_resnet50` configures it (7x7_pool stem, alpha 0.2, beta =
    1 / sqrt(expected variance), ReLU, no final conv) with depths (2, 2, 2) and channels
    (64, 128, 256) instead of (3, 4, 6, 3) and (256 .. 2048). Gains: trained-like U(0.5, 1.5)
    instead of timm's initial 1 (0 for each block's last conv)."""

    def __init__(
        self,
        depths=(2, 2, 2),
        channels=(64, 128, 256),
        stem: int = 16,
        classes: int = 100,
        alpha: float = 0.2,
    ):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2d(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin, expected_var = [], stem, 1.0
        for i, (depth, cout) in enumerate(zip(depths, channels)):
            for b in range(depth):
                stride = 2 if b == 0 and i > 0 else 1
                blocks.append(NormFreeBlock(cin, cout, stride, alpha, expected_var**-0.5))
                if b == 0:
                    expected_var = 1.0
                expected_var += alpha**2
                cin = cout
        self.stages = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.stages(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------- torchvision RegNet


def conv_bn(cin, cout, k, stride=1, groups=1, act=True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias) -> BN (-> ReLU)."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(cout))
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool -> fc1 -> ReLU -> fc2 -> sigmoid -> x *."""

    def __init__(self, chs: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(chs, squeeze, 1), nn.Conv2d(squeeze, chs, 1)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(s)


class BottleneckTransform(nn.Sequential):
    """torchvision's regnet BottleneckTransform: a (1x1) -> b (3x3 grouped) -> se -> c (1x1)."""

    def __init__(self, cin, cout, stride, group_width, se_ratio):
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        groups = cout // group_width
        layers["a"] = conv_bn(cin, cout, 1)
        layers["b"] = conv_bn(cout, cout, 3, stride, groups)
        layers["se"] = SqueezeExcitation(cout, int(round(se_ratio * cin)))
        layers["c"] = conv_bn(cout, cout, 1, act=False)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    """torchvision's ResBottleneckBlock: x (or proj(x)) + f(x), ReLU."""

    def __init__(self, cin, cout, stride, group_width, se_ratio):
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = conv_bn(cin, cout, 1, stride, act=False)
        self.f = BottleneckTransform(cin, cout, stride, group_width, se_ratio)

    def forward(self, x):
        short = self.proj(x) if self.proj is not None else x
        return F.relu(short + self.f(x))


class AnyStage(nn.Sequential):
    """torchvision's AnyStage: its blocks added as `block{stage}-{i}`, a hyphen in the name."""

    def __init__(self, cin, cout, stride, depth, group_width, se_ratio, stage_index):
        super().__init__()
        for i in range(depth):
            block = ResBottleneckBlock(
                cin if i == 0 else cout, cout, stride if i == 0 else 1, group_width, se_ratio
            )
            self.add_module(f"block{stage_index}-{i}", block)


class RegNet(nn.Module):
    """torchvision's RegNetY (regnet_y_400mf structure: SimpleStemIN, AnyStages of
    ResBottleneckBlocks with SE 0.25, group width 8) with depths (1, 2, 3) and widths
    (24, 56, 152) instead of (1, 3, 6, 6) and (48, 104, 208, 440). Module paths such as
    `trunk_output.block1.block1-0.f.a.0` hold hyphens."""

    def __init__(self, depths=(1, 2, 3), widths=(24, 56, 152), stem: int = 32, classes: int = 100):
        super().__init__()
        self.stem = conv_bn(3, stem, 3, 2)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        cin = stem
        for i, (depth, width) in enumerate(zip(depths, widths)):
            stages[f"block{i + 1}"] = AnyStage(cin, width, 2, depth, 8, 0.25, i + 1)
            cin = width
        self.trunk_output = nn.Sequential(stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------- trained-like state


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like state, seeded: every BN as `benchmarks.nets.randomize_bn` draws it (also
    FrozenBatchNorm2d's buffers, the same draws); LayerScale gammas log-uniform in 0.03..1 with
    one sign in ten negative; ScaledStdConv2d gains U(0.5, 1.5); LayerNorm weights U(0.5, 1.5)
    and biases U(-0.2, 0.2). Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    randomize_bn(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 3 - 2))
                sign = torch.where(torch.rand(n, generator=gen) < 0.1, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(n, generator=gen) + 0.5))
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
            elif isinstance(m, ConvNeXtBlock):
                n = m.gamma.numel()
                sign = torch.where(torch.rand(n, generator=gen) < 0.1, -1.0, 1.0)
                m.gamma.copy_(sign * 10 ** (torch.rand(n, generator=gen) * 1.5 - 1.5))
            elif isinstance(m, ScaledStdConv2d):
                m.gain.copy_(torch.rand(m.gain.shape, generator=gen) + 0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
    return model.eval()


def frozen_bn_resnet() -> FrozenBNResNet:
    model = FrozenBNResNet(classes=100, layers=(3, 4, 6), base=16)
    return freeze_batchnorms(model)


# (name, builder, single-sample input shape); the first is the quick benchmark's torch model
TORCH_MODELS = [
    ("preact_resnet18_w16", lambda: PreActResNet18(base=16), (3, 32, 32)),
    ("frozen_bn_resnet50_3stages_w16", frozen_bn_resnet, (3, 64, 64)),
    ("convnext_2x2_d32", lambda: ConvNeXt(), (3, 64, 64)),
    ("densenet121_g12_6_8", lambda: DenseNet(), (3, 64, 64)),
    ("mixnet_s_short", lambda: MixNet(), (3, 64, 64)),
    ("levit128s_stage1", lambda: LeViT(), (3, 64, 64)),
    ("nf_resnet50_2_2_2", lambda: NFResNet(), (3, 64, 64)),
    ("regnety_1_2_3", lambda: RegNet(), (3, 64, 64)),
]


def torch_models(quick: bool = False) -> list[tuple[str, nn.Module, tuple]]:
    """(name, model in eval mode with trained-like state, single-sample input shape)."""
    out = []
    for i, (name, build, shape) in enumerate(TORCH_MODELS[:1] if quick else TORCH_MODELS):
        torch.manual_seed(i)
        out.append((name, trained_like(build(), seed=i), shape))
    return out
