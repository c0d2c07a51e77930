"""GradCAM (Selvaraju et al. 2017), written by hand: one object owns its hook and removes it.

    with GradCAM(model, model.layer3) as cam:
        maps = cam(images, targets)      # [B, H, W] in [0, 1]

weights_k = spatial mean of d(score_target) / d(A_k); map = ReLU(sum_k weights_k * A_k), upsampled
bilinearly to the input size, then min-max normalised per image, (x - min) / (max - min + 1e-7),
as pytorch-grad-cam does. Gradients come from `torch.autograd.grad` on the hooked activation, so no
`.grad` is ever written to the model's parameters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path such as 'layer3' or 'layer3.1', with a clear error."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"model has no layer {name!r}; top-level layers: {names}") from None


class GradCAM:
    """Class-activation maps from the gradients flowing into `target_layer`."""

    def __init__(self, model: nn.Module, target_layer: nn.Module | str) -> None:
        self.model = model
        self.layer = find_layer(model, target_layer) if isinstance(target_layer, str) else target_layer
        self._activation: torch.Tensor | None = None
        self._handle = self.layer.register_forward_hook(self._keep_activation)

    def _keep_activation(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._activation = output

    def release(self) -> None:
        """Remove the hook; the object cannot be used afterwards."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activation = None

    def __enter__(self) -> GradCAM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()  # returns None, so exceptions propagate

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Maps [B, H, W] in [0, 1] for `targets` (LongTensor [B]; None: the predicted class)."""
        if self._handle is None:
            raise RuntimeError("GradCAM was released; create a new one")
        if images.ndim != 4:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                # A leaf that needs grad keeps the graph alive even if the model is frozen.
                logits = self.model(images.detach().requires_grad_(True))
                activation = self._activation
                if targets is None:
                    targets = logits.argmax(1)
                targets = torch.as_tensor(targets, device=logits.device).long().view(-1, 1)
                if targets.shape[0] != logits.shape[0]:
                    raise ValueError(f"{targets.shape[0]} targets for {logits.shape[0]} images")
                # Samples do not interact in eval mode, so the gradient of the summed scores
                # holds each sample's own gradient: a batch equals one image at a time.
                score = logits.gather(1, targets).sum()
                (grads,) = torch.autograd.grad(score, activation)
        finally:
            self._activation = None
            self.model.train(was_training)
        cam = cam_from(activation.detach().float(), grads.float())
        return normalize_per_image(upsample(cam, images.shape[-2:]))


def cam_from(activation: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k mean_xy(dY/dA_k) * A_k): [B, K, h, w] -> [B, h, w]."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activation).sum(1))


def upsample(cam: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [B, h, w] maps to the input's [H, W]."""
    return F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def normalize_per_image(cam: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min + 1e-7) per image: [0, 1], and a constant map becomes zeros (never NaN)."""
    flat = cam.flatten(1)
    flat = flat - flat.min(1, keepdim=True).values
    flat = flat / (flat.max(1, keepdim=True).values + 1e-7)
    return flat.view_as(cam)


def overlay(image: np.ndarray, cam: np.ndarray | torch.Tensor, alpha: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped CAM over an HWC image (uint8 or floats in [0, 1]) -> floats in [0, 1]."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    if image.max() > 1.0:
        image = image / 255.0
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    if cam.shape != image.shape[:2]:
        raise ValueError(f"CAM shape {cam.shape} does not match image shape {image.shape[:2]}")
    heat = colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)


def explain(model: nn.Module, layer: nn.Module | str, images: torch.Tensor,
            targets: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
    """GradCAM maps [N, H, W] for a stack of model-ready images, in batches, on the model's device."""
    device = next(model.parameters()).device
    maps = []
    with GradCAM(model, layer) as cam:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            target = None if targets is None else targets[start:start + batch_size].to(device)
            maps.append(cam(chunk, target).cpu())
    return torch.cat(maps) if maps else torch.zeros(0, *images.shape[-2:])


def explain_items(model: nn.Module, layer: nn.Module | str, dataset, indices,
                  targets: torch.Tensor | None = None, channels_last: bool = False) -> torch.Tensor:
    """GradCAM maps for dataset items (model-ready tensors, e.g. misclassified test images)."""
    if len(indices) == 0:
        return torch.zeros(0, 32, 32)
    images = torch.stack([dataset[int(i)][0] for i in indices])
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return explain(model, layer, images, targets)
