"""GradCAM (Selvaraju et al. 2017), written by hand: one object owns its hook and removes it.

    with GradCAM(model, model.layer3) as cam:
        maps = cam(images, targets)      # [B, H, W] in [0, 1]

weights_k = spatial mean of d(score_target) / d(A_k); map = ReLU(sum_k weights_k * A_k), upsampled
bilinearly to the input size, then min-max normalised per image, (x - min) / (max - min + 1e-7),
as pytorch-grad-cam does. Gradients come from `torch.autograd.grad` on the hooked activation, so no
`.grad` is ever written to the model's parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path such as 'layer3' or 'layer3.1', with a one-line error."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"model has no layer {name!r}; top-level layers: {names}") from None


class GradCAM:
    """Class-activation maps from the gradients flowing into `layer` (a module or its dotted name)."""

    def __init__(self, model: nn.Module, layer: nn.Module | str) -> None:
        self.model = model
        self.layer = find_layer(model, layer) if isinstance(layer, str) else layer
        self._activation: torch.Tensor | None = None
        self._hook = self.layer.register_forward_hook(self._keep_activation)

    def _keep_activation(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._activation = output

    def release(self) -> None:
        """Remove the hook; the object cannot be used afterwards."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._activation = None

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()  # returns None, so exceptions propagate

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Maps [B, H, W] in [0, 1] for `targets` ([B] class indices; None: the predicted classes)."""
        if self._hook is None:
            raise RuntimeError("GradCAM was released; create a new one")
        if images.ndim != 4:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                # A leaf that needs grad keeps the graph alive even if the model is frozen.
                logits = self.model(images.detach().requires_grad_(True))
                activation, self._activation = self._activation, None  # the hook kept it
                if targets is None:
                    targets = logits.argmax(1)
                targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
                if len(targets) != len(logits):
                    raise ValueError(f"{len(targets)} targets for {len(logits)} images")
                # Samples do not interact in eval mode, so the gradient of the summed scores
                # holds each sample's own gradient: a batch equals one image at a time.
                score = logits.gather(1, targets[:, None]).sum()
                (grads,) = torch.autograd.grad(score, activation)
        finally:
            self.model.train(was_training)
        cam = cam_from(activation.detach().float(), grads.float())
        return normalize_per_image(upsample(cam, images.shape[-2:]))


def cam_from(activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k mean_xy(dY/dA_k) * A_k): [B, K, h, w] -> [B, h, w]."""
    return F.relu((grads.mean((2, 3), keepdim=True) * activation).sum(1))


def upsample(cam: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B, h, w] maps to the input's [H, W]."""
    return F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def normalize_per_image(cam: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min + 1e-7) per [H, W] map: [0, 1], and a constant map becomes zeros (never NaN)."""
    shifted = cam - cam.amin((1, 2), keepdim=True)
    return shifted / (shifted.amax((1, 2), keepdim=True) + 1e-7)
