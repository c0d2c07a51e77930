"""The S9 network: four conv blocks, no max-pool, depthwise-separable and dilated convs, GAP: 194,282 params.

| block | layers (BN and ReLU after each conv and each sep)              | output    | RF | jump |
|-------|----------------------------------------------------------------|-----------|----|------|
| c1    | conv 3x3 3->32; conv 3x3 32->64 stride 2                       | 64x16x16  |  5 |   2  |
| c2    | [conv 3x3 64->64; conv 3x3 64->64] + identity; sep 64->144 s2  | 144x8x8   | 17 |   4  |
| c3    | [sep 144->144 dilation 2; sep 144->144] + identity             | 144x8x8   | 41 |   4  |
| c4    | [sep 144->144 dilation 2; sep 144->144] + identity             | 144x8x8   | 65 |   4  |
| head  | global average pool, linear 144->10                            | 10        |    |      |

"sep" is a depthwise-separable conv: depthwise 3x3 (groups = channels) then pointwise 1x1. The
map stops shrinking at 8x8 (so GradCAM on `c4` has 8x8 cells); c3 and c4 grow the receptive
field with dilation instead of striding. `helpers.receptive_field` computes the RF column.
Forward cost: 30.7M multiply-adds per 32x32 image, most of it in c2's two 16x16 convs.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SepConvBNReLU(nn.Sequential):
    """Depthwise 3x3 (optionally strided or dilated), pointwise 1x1, BN, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        # padding = dilation keeps the size at stride 1; no BN/ReLU between dw and pw (Xception)
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, dilation, dilation, groups=c_in, bias=False)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)


class Residual(nn.Sequential):
    """x + layers(x): an identity shortcut around same-shape layers (no conv, so the RF is the chain's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class DilatedDWSepNet(nn.Module):
    """C1 (32->16) C2 (16->8) C3 C4 (8x8, dilated), GAP, linear: strided convs and dilation, no max-pool."""

    def __init__(self, num_classes: int = 10, width: int = 144) -> None:
        super().__init__()
        self.c1 = nn.Sequential(conv_bn_relu(3, 32), conv_bn_relu(32, 64, stride=2))
        self.c2 = nn.Sequential(
            Residual(conv_bn_relu(64, 64), conv_bn_relu(64, 64)), SepConvBNReLU(64, width, stride=2)
        )
        # 144x144 full 3x3 convs would cost 187k parameters each; separable ones cost 22k.
        # 144 rather than 128 spends the 200k budget: 194k, and the 8x8 maps keep the cost low.
        self.c3 = Residual(SepConvBNReLU(width, width, dilation=2), SepConvBNReLU(width, width))
        self.c4 = Residual(SepConvBNReLU(width, width, dilation=2), SepConvBNReLU(width, width))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))
        return self.head(torch.flatten(self.gap(x), 1))
