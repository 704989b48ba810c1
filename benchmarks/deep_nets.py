"""Deep networks of the families whose float32 rounding outgrows a fixed tolerance, written as
their public definitions build them (random weights; BN statistics from train-mode batches).

* `ResNet50` (benchmarks.nets): torchvision's bottleneck ResNet-50, [3, 4, 6, 3] blocks.
* `CSPDarknet`: timm's CSPDarknet-53 stages (`CrossStage`): a strided ConvNormAct, a 1x1
  expansion split in two halves, DarkBlocks (1x1 then 3x3, residual) on one half, 1x1
  transitions and a concatenation; LeakyReLU(0.1).
* `DPN`: timm's dual-path network (DPN-68 layout): pre-activation BnActConv units (BN -> ReLU
  -> conv), grouped 3x3, each block's output split into a residual sum and a dense
  concatenation.
* `LeViT`: timm's LeViT-128S: a ConvNorm stem, then attention and MLP blocks on tokens whose
  every Linear is followed by a BatchNorm1d applied to the tokens flattened over
  (batch, token) (`LinearNorm`), Hardswish, attention biases, a BN-Linear head.
* `MaskedMLP`: 12 -> 32 -> 16 -> 3 with an input BN and a BN after each hidden Linear,
  whose inputs live far from N(0, 1) (the input BN's statistics say where).
* `RawFeatureMLP`: a tabular MLP whose BN normalizes features around 1e4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.nets import MobileNetV2, ResNet50, train_statistics


def conv_norm_act(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act=None):
    act = act if act is not None else nn.LeakyReLU(0.1)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act,
    )


class DarkBlock(nn.Module):
    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.conv1 = conv_norm_act(channels, mid, 1)
        self.conv2 = conv_norm_act(mid, channels, 3)

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class CrossStage(nn.Module):
    """timm's CrossStage: down, expand, split, blocks on one half, transitions, concat."""

    def __init__(self, cin: int, cout: int, depth: int):
        super().__init__()
        self.conv_down = conv_norm_act(cin, cout, 3, 2)
        self.conv_exp = conv_norm_act(cout, 2 * cout, 1)
        self.blocks = nn.Sequential(*[DarkBlock(cout, cout // 2) for _ in range(depth)])
        self.conv_transition_b = conv_norm_act(cout, cout, 1)
        self.conv_transition = conv_norm_act(2 * cout, cout, 1)

    def forward(self, x):
        xs, xb = self.conv_exp(self.conv_down(x)).chunk(2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CSPDarknet(nn.Module):
    """CSPDarknet-53's stage layout (1, 2, 8, 8, 4) at `base` stem width."""

    def __init__(self, base: int = 16, depths=(1, 2, 8, 8, 4), classes: int = 100):
        super().__init__()
        self.stem = conv_norm_act(3, base, 3)
        stages, cin = [], base
        for i, depth in enumerate(depths):
            cout = base * 2 ** (i + 1)
            stages.append(CrossStage(cin, cout, depth))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


class BnActConv(nn.Module):
    """DPN's pre-activation unit: BN -> ReLU -> conv."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)

    def forward(self, x):
        return self.conv(F.relu(self.bn(x)))


class DualPathBlock(nn.Module):
    def __init__(self, cin, num_1x1_a, num_3x3_b, num_1x1_c, inc, groups, kind):
        super().__init__()
        self.num_1x1_c, self.inc, self.kind = num_1x1_c, inc, kind
        stride = 2 if kind == "down" else 1
        if kind in ("proj", "down"):
            self.c1x1_w = BnActConv(cin, num_1x1_c + 2 * inc, 1, stride)
        self.c1x1_a = BnActConv(cin, num_1x1_a, 1)
        self.c3x3_b = BnActConv(num_1x1_a, num_3x3_b, 3, stride, groups)
        self.c1x1_c = BnActConv(num_3x3_b, num_1x1_c + inc, 1)

    def forward(self, x):
        x_in = torch.cat(x, dim=1) if isinstance(x, tuple) else x
        if self.kind in ("proj", "down"):
            w = self.c1x1_w(x_in)
            x_s1, x_s2 = w[:, : self.num_1x1_c], w[:, self.num_1x1_c :]
        else:
            x_s1, x_s2 = x
        out = self.c1x1_c(self.c3x3_b(self.c1x1_a(x_in)))
        resid = x_s1 + out[:, : self.num_1x1_c]
        dense = torch.cat([x_s2, out[:, self.num_1x1_c :]], dim=1)
        return resid, dense


class DPN(nn.Module):
    """DPN-68's layout: blocks (3, 4, 12, 3), increments (16, 32, 32, 64), groups 32 (bw
    scaled by `width`)."""

    def __init__(self, width: int = 1, classes: int = 100, blocks=(3, 4, 12, 3)):
        super().__init__()
        k_r, groups, stem = 128 // width, 32 // width, 10 * (8 // width)
        layout = blocks
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
        )
        blocks, cin = [], stem
        for i, (n, inc) in enumerate(zip(layout, (16, 32, 32, 64))):
            inc //= width
            bw = 64 // width * 2**i
            r = k_r * bw // (64 // width)
            for b in range(n):
                kind = ("proj" if i == 0 else "down") if b == 0 else "normal"
                blocks.append(DualPathBlock(cin, r, r, bw, inc, groups, kind))
                cin = bw + (3 + b) * inc if b == 0 else cin + inc
            cin = bw + (n + 2) * inc
        self.blocks = nn.ModuleList(blocks)
        self.bn_out = nn.BatchNorm2d(cin)
        self.classifier = nn.Conv2d(cin, classes, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = F.relu(self.bn_out(torch.cat(x, dim=1)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1)).flatten(1)


class LinearNorm(nn.Module):
    """LeViT's Linear -> BatchNorm1d over the tokens flattened across (batch, token)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, ratio: int, resolution: int):
        super().__init__()
        self.heads, self.key_dim, self.d = heads, key_dim, ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.d))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.d, dim))
        self.attention_biases = nn.Parameter(torch.randn(heads, resolution**2) * 0.1)
        pos = torch.stack(
            torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        ).flatten(1)
        rel = (pos[..., :, None] - pos[..., None, :]).abs()
        self.register_buffer("bias_idxs", rel[0] * resolution + rel[1], persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, n, self.heads, -1)
            .split([self.key_dim, self.key_dim, self.d], dim=3)
        )
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = q @ k.transpose(-2, -1) * self.scale + self.attention_biases[:, self.bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.d)
        return self.proj(x)


class LeViT(nn.Module):
    """LeViT-128S's first stage (dim 128, 4 heads of key dim 16, 2 x (attention, MLP) at
    resolution `resolution`), its ConvNorm stem and BN-Linear head."""

    def __init__(self, dim: int = 128, depth: int = 2, resolution: int = 4, classes: int = 100):
        super().__init__()
        act = nn.Hardswish()
        self.stem = nn.Sequential(
            conv_norm_act(3, dim // 8, 3, 2, act=act),
            conv_norm_act(dim // 8, dim // 4, 3, 2, act=act),
            conv_norm_act(dim // 4, dim // 2, 3, 2, act=act),
            nn.Conv2d(dim // 2, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim),
        )
        blocks = []
        for _ in range(depth):
            blocks.append(Attention(dim, 16, 4, 2, resolution))
            blocks.append(
                nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))
            )
        self.blocks = nn.ModuleList(blocks)
        self.head_bn = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.head_bn(x.mean(1)))


class MaskedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(12),
            nn.Linear(12, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Linear(32, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.net(x)


def masked_mlp(seed: int = 0) -> MaskedMLP:
    """Trained on inputs around 6 with spread 4 per feature: the input BN's running statistics
    record that, and standard-normal inputs leave many hidden units below their ReLU."""
    gen = torch.Generator().manual_seed(seed)
    model = MaskedMLP()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(64, 12, generator=gen) * 4 + 6)
    return model.eval()


class RawFeatureMLP(nn.Module):
    """A tabular MLP on raw features (prices, timestamps): its first layer's outputs sit
    around 1e4 and a BatchNorm normalizes them, so float32 keeps only a few digits of
    x - mu and the model's own output error is far above rtol 1e-5."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def raw_feature_mlp(seed: int = 0) -> RawFeatureMLP:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RawFeatureMLP()
    with torch.no_grad():
        model.fc1.bias.fill_(1e4)
        model.bn.running_mean.copy_(1e4 + torch.randn(32, generator=gen) * 0.1)
        model.bn.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


def deep_models(quick: bool = False) -> list[tuple[str, nn.Module, tuple]]:
    """(name, model with trained-like statistics, single-sample input shape)."""
    torch.manual_seed(0)
    specs = [
        ("resnet50_w16", lambda: ResNet50(classes=100, base=16), (3, 64, 64)),
        ("cspdarknet53_w8", lambda: CSPDarknet(base=8), (3, 64, 64)),
        ("dpn68_w4", lambda: DPN(width=4), (3, 64, 64)),
        ("levit128s_stage1", lambda: LeViT(), (3, 64, 64)),
    ]
    if not quick:
        specs += [
            ("resnet50", lambda: ResNet50(), (3, 224, 224)),
            ("mobilenet_v2", lambda: MobileNetV2(), (3, 224, 224)),
            ("cspdarknet53_w32", lambda: CSPDarknet(base=32), (3, 128, 128)),
            ("dpn68", lambda: DPN(width=1), (3, 128, 128)),
        ]
    out = []
    for name, build, shape in specs:
        model = build()
        out.append((name, train_statistics(model, (8, *shape)), shape))
    out.append(("masked_mlp", masked_mlp(), (12,)))
    out.append(("raw_feature_mlp", raw_feature_mlp(), (16,)))
    return out
