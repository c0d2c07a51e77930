"""The S10 "custom ResNet" (David Page's ResNet-9 layout): 6,573,130 parameters."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), optional 2x2 max-pool, BN, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two (conv 3x3, BN, ReLU) at constant width; the caller adds the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualStage(nn.Module):
    """X = conv-pool-BN-ReLU(x); output X + ResBlock(X)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(c_in, c_out, pool=True)
        self.res = ResBlock(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x + self.res(x)


class CustomResNet(nn.Module):
    """PrepLayer 64x32x32 -> Layer1 128x16x16 (+res) -> Layer2 256x8x8 -> Layer3 512x4x4 (+res)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.prep = conv_bn_relu(3, 64)
        self.layer1 = ResidualStage(64, 128)
        self.layer2 = conv_bn_relu(128, 256, pool=True)
        self.layer3 = ResidualStage(256, 512)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
