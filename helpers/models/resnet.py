"""CIFAR ResNet18 and ResNet34 (kuangliu/pytorch-cifar layouts) with the normalisation as an argument.

Every normalisation layer, the 1x1 shortcut's included, is built by `make_norm(norm, channels)`:

- ``"bn"``: BatchNorm2d, statistics over the batch (and running averages for eval).
- ``"ln"``: LayerNorm for images, i.e. ``GroupNorm(1, C)``. It normalises each sample over all of
  (C, H, W) and then applies a per-channel scale and shift. ``nn.LayerNorm([C, H, W])`` would
  normalise the same statistics but learn a scale per *pixel*, tying the weights to one input
  size and multiplying the parameter count; the per-channel affine keeps the parameter count of
  BatchNorm (so every variant has the same size) and works at any resolution.
- ``"gn"``: GroupNorm with 32 groups (Wu & He's default): each sample over groups of channels.
- ``"in"``: InstanceNorm as ``GroupNorm(C, C)``: each sample and channel over its own H x W.

ln, gn and in have no running statistics: train and eval behave the same, and a sample's output
does not depend on the other samples in its batch.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn
from torch.nn import functional as F

Norm = Literal["bn", "ln", "gn", "in"]
NORMS: tuple[str, ...] = get_args(Norm)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Build the normalisation layer named by `norm` for `channels` channels."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    groups = {"ln": 1, "gn": 32, "in": channels}
    if norm not in groups:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return nn.GroupNorm(groups[norm], channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with norms; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR stem (3x3 stride 1, no max-pool), stages 64/128/256/512 at 32, 16, 8 and 4 pixels a side,
    global average pool, FC."""

    def __init__(self, num_blocks: tuple[int, int, int, int], norm: Norm = "bn", num_classes: int = 10,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.norm1 = make_norm(norm, 64)
        widths, c_in = (64, 128, 256, 512), 64
        for i, (width, stride, n) in enumerate(zip(widths, (1, 2, 2, 2), num_blocks), start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(c_in, width, s, norm))
                c_in = width
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, num_classes)
        if zero_init_residual:
            # Each block starts as the identity, which makes deep nets without BN easier to train.
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.norm2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)  # the 4x4 map of a 32x32 input, any size otherwise
        return self.fc(torch.flatten(out, 1))


def ResNet18(norm: Norm = "bn", num_classes: int = 10, **kwargs) -> ResNet:  # noqa: N802
    """ResNet18 for 32x32 inputs: 11,173,962 parameters with any norm."""
    return ResNet((2, 2, 2, 2), norm, num_classes, **kwargs)


def ResNet34(norm: Norm = "bn", num_classes: int = 10, **kwargs) -> ResNet:  # noqa: N802
    """ResNet34 for 32x32 inputs: 21,282,122 parameters with any norm."""
    return ResNet((3, 4, 6, 3), norm, num_classes, **kwargs)
