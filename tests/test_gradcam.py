"""GradCAM: the classic-CAM identity, batch = single, range, NaN-free, hooks and mode restored."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers.gradcam import GradCAM, normalize_per_image
from helpers.models import create_model


class CamNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: the network of the original CAM paper."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=stride, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def classic_cam(model: CamNet, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Zhou et al.'s CAM: sum_k w[c, k] A_k, ReLU, upsampled, min-max normalised (no gradients).

    Through the average pool, d(score)/d(A_k) = w[c, k] / (h * w) at every position, so GradCAM's
    raw map is CAM / (h * w). The division is kept here because the +1e-7 of the normalisation
    makes the normalised maps depend (slightly) on the raw scale.
    """
    with torch.no_grad():
        activation = model.features(images)
        area = activation.shape[-2] * activation.shape[-1]
        weights = model.fc.weight[targets] / area
        cam = torch.einsum("bk,bkhw->bhw", weights, activation).relu()
        cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear",
                            align_corners=False)[:, 0]
        flat = cam.flatten(1)
        flat = flat - flat.min(1, keepdim=True).values
        return (flat / (flat.max(1, keepdim=True).values + 1e-7)).view_as(cam)


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcam_equals_classic_cam_on_a_gap_linear_net(stride):
    torch.manual_seed(0)
    model = CamNet(stride)
    images = torch.randn(6, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    with GradCAM(model, model.features) as cam:
        maps = cam(images, targets)
    assert maps.shape == (6, 32, 32)
    torch.testing.assert_close(maps, classic_cam(model, images, targets), rtol=1e-4, atol=1e-5)


def models_and_layers():
    """The two assignment networks with the layers the recipes explain."""
    torch.manual_seed(0)
    return [(create_model("custom_resnet"), "layer2"),
            (create_model("resnet18", norm="ln"), "layer3")]


@pytest.mark.parametrize("model, layer", models_and_layers(), ids=["s10", "s8"])
def test_batch_equals_one_image_at_a_time(model, layer):
    images = torch.randn(4, 3, 32, 32)
    targets = torch.tensor([3, 1, 4, 1])
    with GradCAM(model, layer) as cam:
        batch = cam(images, targets)
        single = torch.cat([cam(images[i:i + 1], targets[i:i + 1]) for i in range(4)])
    # fp32 convolutions pick different kernels for different batch sizes: 1e-3 of the range
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-3)
    assert batch.min() >= 0 and batch.max() <= 1 and not batch.isnan().any()
    peaks = batch.flatten(1).max(1).values
    assert ((peaks > 0.99) | (peaks == 0)).all(), "each map is stretched to [0, 1] (or all zero)"


@pytest.mark.parametrize("model, layer", models_and_layers(), ids=["s10", "s8"])
def test_explained_layer_is_at_least_8x8(model, layer):
    shapes = []
    model.get_submodule(layer).register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model.eval()(torch.randn(1, 3, 32, 32))
    assert shapes[0][-2:] == (8, 8)


@pytest.mark.parametrize("model, layer", models_and_layers(), ids=["s10", "s8"])
def test_hooks_removed_mode_restored_and_no_gradients_left(model, layer):
    model.train()
    target = model.get_submodule(layer)
    with GradCAM(model, target) as cam:
        assert len(target._forward_hooks) == 1
        cam(torch.randn(2, 3, 32, 32))
    assert len(target._forward_hooks) == 0
    assert model.training, "train mode restored"
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with GradCAM(model, layer) as cam:
        cam(torch.randn(1, 3, 32, 32))
    assert not model.training, "eval mode restored"


def test_hooks_removed_when_the_body_raises():
    model = CamNet()
    with pytest.raises(RuntimeError, match="boom"):
        with GradCAM(model, model.features):
            raise RuntimeError("boom")
    assert len(model.features._forward_hooks) == 0


def test_released_object_refuses_to_run():
    model = CamNet()
    cam = GradCAM(model, model.features)
    cam.release()
    with pytest.raises(RuntimeError):
        cam(torch.randn(1, 3, 32, 32))


def test_default_target_is_the_predicted_class():
    model = CamNet()
    images = torch.randn(3, 3, 32, 32)
    with GradCAM(model, model.features) as cam:
        torch.testing.assert_close(cam(images), cam(images, model(images).argmax(1)))


def test_all_zero_maps_are_zeros_not_nan():
    model = CamNet()
    with torch.no_grad():
        model.features[0].weight.zero_()
        model.features[0].bias.fill_(-1.0)  # ReLU kills every activation
    with GradCAM(model, model.features) as cam:
        maps = cam(torch.randn(2, 3, 32, 32))
    assert torch.equal(maps, torch.zeros(2, 32, 32))
    assert torch.equal(normalize_per_image(torch.zeros(1, 4, 4)), torch.zeros(1, 4, 4))


def test_frozen_model_still_gets_maps():
    model = CamNet()
    for p in model.parameters():
        p.requires_grad_(False)
    with GradCAM(model, model.features) as cam:
        maps = cam(torch.randn(2, 3, 32, 32))
    assert maps.shape == (2, 32, 32) and maps.max() > 0.99


def test_unknown_layer_and_bad_shapes_are_reported():
    model = CamNet()
    with pytest.raises(ValueError):
        GradCAM(model, "layer9")
    with GradCAM(model, "features") as cam:
        with pytest.raises(ValueError):
            cam(torch.randn(3, 32, 32))
        with pytest.raises(ValueError):
            cam(torch.randn(3, 3, 32, 32), torch.tensor([0, 1]))


def test_a_batch_is_explained_as_each_image_alone():
    model = CamNet()
    images, targets = torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 1, 1, 2])
    with GradCAM(model, model.features) as cam:
        whole = cam(images, targets)
        alone = torch.cat([cam(images[i:i + 1], targets[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(whole, alone)


def test_channels_last_gives_the_same_maps_as_nchw():
    torch.manual_seed(0)
    model = create_model("custom_resnet").eval()
    images = torch.randn(3, 3, 32, 32)
    with GradCAM(model, model.layer2) as cam:
        nchw = cam(images)
    model_cl = model.to(memory_format=torch.channels_last)
    with GradCAM(model_cl, model_cl.layer2) as cam:
        channels_last = cam(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, nchw, rtol=1e-4, atol=1e-4)
    assert nchw.amax((1, 2)).gt(0.99).all(), "non-trivial maps: each reaches 1"
