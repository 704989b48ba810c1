"""Architectures of the shipped example models (importable: `models.architectures:digits_cnn`)."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """8x8 digit classifier: input BN, Conv-BN-ReLU blocks, global pooling, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm2d(1)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(self.input_bn(x)))


class TabularMLP(nn.Module):
    """Breast-cancer classifier on raw features: input BN, Linear-BN1d-ReLU-Dropout blocks."""

    def __init__(self, features: int = 30, classes: int = 2) -> None:
        super().__init__()
        self.input_bn = nn.BatchNorm1d(features)
        self.body = nn.Sequential(
            nn.Linear(features, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.2),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.body(self.input_bn(x)))


class DigitsAutoencoder(nn.Module):
    """8x8 digit autoencoder: strided Conv-BN-ReLU encoder, ConvTranspose-BN-ReLU decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 2, stride=2, groups=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 2, stride=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()


def tabular_mlp() -> TabularMLP:
    return TabularMLP()


def digits_autoencoder() -> DigitsAutoencoder:
    return DigitsAutoencoder()
