"""Reference architectures for the benchmarks, with trained-like BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.down(x) if self.down is not None else x))


class ResNet50(nn.Module):
    """Bottleneck ResNet with the [3, 4, 6, 3] layout of ResNet-50 (about 25.6M parameters)."""

    def __init__(self, classes: int = 1000, layers=(3, 4, 6, 3), base: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        blocks, cin = [], base
        for i, n in enumerate(layers):
            width = base * 2**i
            for b in range(n):
                blocks.append(Bottleneck(cin, width, 2 if b == 0 and i > 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(F.adaptive_avg_pool2d(self.layers(x), 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, classes: int = 1000, width: float = 1.0):
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = [
            nn.Conv2d(3, c, 3, 2, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU6(),
        ]
        for t, ch, n, s in self.SETTINGS:
            out = int(ch * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        layers += [nn.Conv2d(c, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.short(out) if self.short is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        blocks, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            for b in range(2):
                blocks.append(PreActBlock(cin, w, 2 if b == 0 and i > 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class MLP(nn.Module):
    """Input BN directly before a Linear, then Linear-BN1d-ReLU-Dropout blocks."""

    def __init__(self, features: int = 64, hidden=(256, 256, 128), classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(features)]
        c = features
        for h in hidden:
            layers += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.1)]
            c = h
        layers.append(nn.Linear(c, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class EncoderDecoder(nn.Module):
    def __init__(self, c: int = 3, base: int = 32):
        super().__init__()

        def down(i, o):
            return [nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU()]

        def up(i, o):
            return [nn.ConvTranspose2d(i, o, 2, 2), nn.BatchNorm2d(o), nn.ReLU()]

        self.encoder = nn.Sequential(
            *down(c, base), *down(base, base * 2), *down(base * 2, base * 4)
        )
        self.decoder = nn.Sequential(
            *up(base * 4, base * 2), *up(base * 2, base), *up(base, base), nn.Conv2d(base, c, 1)
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


def train_statistics(model: nn.Module, shape: tuple, seed: int = 0, batches: int = 20):
    """Run seeded random batches in train mode so BN statistics are trained-like; then eval."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.2, 0.2, generator=gen)
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(shape, generator=gen) * 2 + 0.5)
    return model.eval()


def reference_models(quick: bool) -> list[tuple[str, nn.Module, tuple]]:
    """(name, model with trained-like stats, single-sample input shape)."""
    torch.manual_seed(0)
    specs = [
        ("mlp_input_bn", lambda: MLP(), (64,)),
        ("encoder_decoder", lambda: EncoderDecoder(), (3, 64, 64)),
    ]
    if not quick:
        specs = [
            ("resnet50", lambda: ResNet50(), (3, 224, 224)),
            ("mobilenet_v2", lambda: MobileNetV2(), (3, 224, 224)),
            ("preact_resnet18", lambda: PreActResNet18(), (3, 32, 32)),
            *specs,
        ]
    out = []
    for name, build, shape in specs:
        model = build()
        stat_batch = 4 if name in ("resnet50", "mobilenet_v2") else 16
        out.append((name, train_statistics(model, (stat_batch, *shape)), shape))
    return out


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like BN state drawn with a fixed seed: running mean in [-1, 1], running var
    log-uniform in 1e-2..1e1, gamma in [0.5, 1.5] with a random sign, beta in [-0.5, 0.5].
    Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(10 ** (torch.rand(n, generator=gen) * 3 - 2))
            m.num_batches_tracked.fill_(100)
            sign = torch.where(torch.rand(n, generator=gen) < 0.1, -1.0, 1.0)
            m.weight.data.copy_(sign * (torch.rand(n, generator=gen) + 0.5))
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


class SiameseEncoder(nn.Module):
    """Conv3x3(padding=1)-BN-ReLU stages (a 2x2 max pool between stages), then global average
    pooling; with `input_bn`, a BatchNorm2d on the raw input before the first zero-padded
    conv."""

    def __init__(self, cin: int = 3, widths=(32, 64, 128, 256), input_bn: bool = False):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(cin) if input_bn else None
        layers: list[nn.Module] = []
        c = cin
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.stages = nn.Sequential(*layers)

    def forward(self, x):
        if self.input_bn is not None:
            x = self.input_bn(x)
        return F.adaptive_avg_pool2d(self.stages(x), 1).flatten(1)


class Siamese(nn.Module):
    """One encoder applied to two inputs (shared weights); the output is both embeddings,
    concatenated."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, a, b):
        return torch.cat([self.encoder(a), self.encoder(b)], dim=1)


class TiedLoop(nn.Module):
    """A Conv-BN-ReLU stem, then one Conv3x3(padding=1)-BN-ReLU block applied `steps` times
    (weight tying), global average pooling and a linear head."""

    def __init__(self, cin: int = 3, channels: int = 32, steps: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(cin, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.steps = steps
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(self.steps):
            x = self.block(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
