"""Models and a tiny name -> builder registry: `create_model("resnet18", norm="ln")`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .custom_resnet import CustomResNet
from .dilated_dwsep_net import DilatedDWSepNet
from .resnet import NORMS, ResNet18, ResNet34, make_norm

MODELS: dict[str, Callable[..., nn.Module]] = {
    "custom_resnet": CustomResNet,
    "dilated_dwsep_net": DilatedDWSepNet,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; keyword arguments go to its builder."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
    return builder(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "MODELS", "NORMS", "CustomResNet", "DilatedDWSepNet", "ResNet18", "ResNet34",
    "count_parameters", "create_model", "make_norm",
]
