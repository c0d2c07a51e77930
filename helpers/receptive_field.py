"""Receptive field of each conv/pool layer of a chain-shaped network, in the order the layers run.

    for layer in receptive_field(model):             # or receptive_field_table(model) in a notebook
        print(layer["name"], layer["out_size"], layer["rf"])

Forward hooks on a dummy input find the layers, so the order and output sizes are the real ones,
whatever the model's nesting. From rf = jump = 1 at the input, for each layer with kernel k, stride s
and dilation d:

    k_eff = d * (k - 1) + 1,   rf_out = rf_in + (k_eff - 1) * jump_in,   jump_out = jump_in * s

Identity shortcuts (x + f(x)) do not change the answer: the longest path is the chain. A branch
holding its own conv (a ResNet's 1x1 projection shortcut) is not a chain: a layer whose input shape
is not the previous layer's output shape raises ValueError. Kernels are square (height axis used).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _first(value: int | tuple[int, ...]) -> int:
    """The height-axis entry of an int-or-tuple layer argument."""
    return value[0] if isinstance(value, tuple) else int(value)


def receptive_field(model: nn.Module, input_size: int = 32, in_channels: int = 3) -> list[dict[str, Any]]:
    """Per-layer receptive fields of `model` on a square `input_size` input, in execution order: each
    conv/pool layer's dotted name, class, geometry (groups 1 for pools), output channels and height,
    `jump` (input pixels between neighbouring outputs) and `rf` (input pixels one output sees)."""
    calls: list[tuple[nn.Module, torch.Size, torch.Size]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        calls.append((module, inputs[0].shape, output.shape))

    # Adaptive pools are skipped: their kernel depends on the input size.
    handles = [m.register_forward_hook(record)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    was_training = model.training
    try:
        model.eval()  # BN on running statistics: a batch of one is fine, and no statistics change
        like = next(model.parameters(), torch.empty(0))  # the dummy input takes the weights' device and dtype
        with torch.no_grad():
            model(like.new_zeros(1, in_channels, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    names = {module: name for name, module in model.named_modules()}
    layers, rf, jump, shape = [], 1, 1, None
    for module, in_shape, out_shape in calls:
        if shape is not None and in_shape[1:] != shape[1:]:
            raise ValueError(f"{names[module]!r} takes {tuple(in_shape[1:])} but the previous layer gave "
                             f"{tuple(shape[1:])}: the conv/pool layers do not form a chain")
        kernel, stride = _first(module.kernel_size), _first(module.stride)
        dilation = _first(getattr(module, "dilation", 1))  # AvgPool2d has none
        rf += dilation * (kernel - 1) * jump  # (effective kernel - 1) * jump_in
        jump *= stride
        layers.append({"name": names[module], "kind": type(module).__name__, "kernel": kernel,
                       "stride": stride, "dilation": dilation, "groups": getattr(module, "groups", 1),
                       "out_channels": out_shape[1], "out_size": out_shape[2], "jump": jump, "rf": rf})
        shape = out_shape
    return layers


def receptive_field_table(model: nn.Module, input_size: int = 32, in_channels: int = 3):
    """`receptive_field` as a pandas DataFrame, one row per layer, indexed by layer name."""
    import pandas as pd  # only the notebook needs it

    return pd.DataFrame(receptive_field(model, input_size, in_channels)).set_index("name")
