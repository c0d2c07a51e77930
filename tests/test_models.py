"""Models: shapes, exact parameter counts, which normalisation layers they hold."""

import pytest
import torch
from torch import nn

from helpers.models import NORMS, count_parameters, create_model
from helpers.models.custom_resnet import CustomResNet

RESNET_PARAMS = {"resnet18": 11_173_962, "resnet34": 21_282_122}
# stem + two per block + one per shortcut (3 stages change shape)
NORM_LAYERS = {"resnet18": 1 + 2 * 8 + 3, "resnet34": 1 + 2 * 16 + 3}
GROUPS = {"ln": lambda channels: 1, "gn": lambda channels: 32, "in": lambda channels: channels}


def test_custom_resnet_shape_and_exact_parameter_count():
    model = CustomResNet()
    assert count_parameters(model) == 6_573_130
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_custom_resnet_stage_shapes():
    model = CustomResNet().eval()
    shapes = {}
    for name in ("prep", "layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == {"prep": (64, 32, 32), "layer1": (128, 16, 16),
                      "layer2": (256, 8, 8), "layer3": (512, 4, 4)}


def test_custom_resnet_residuals_add_identity():
    model = CustomResNet().eval()
    with torch.no_grad():
        for p in model.layer1.res.parameters():
            p.zero_()  # BN weight and bias zero: the ResBlock outputs 0, the stage is its conv
        x = torch.randn(1, 64, 32, 32)
        assert torch.equal(model.layer1(x), model.layer1.conv(x))


@pytest.mark.parametrize("depth", sorted(RESNET_PARAMS))
@pytest.mark.parametrize("norm", NORMS)
def test_resnet_shape_count_and_norm_types(depth, norm):
    with torch.device("meta"):  # counting needs shapes, not memory
        model = create_model(depth, norm=norm)
    assert count_parameters(model) == RESNET_PARAMS[depth]
    assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    groupnorms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    if norm == "bn":
        assert len(batchnorms) == NORM_LAYERS[depth] and not groupnorms
        return
    assert not batchnorms, "a non-BN variant must hold no BatchNorm, the shortcut's included"
    assert not any(isinstance(m, (nn.LayerNorm, nn.modules.instancenorm._InstanceNorm))
                   for m in model.modules())
    assert len(groupnorms) == NORM_LAYERS[depth]
    # ln: one group of all channels; gn: 32 groups; in: one group per channel
    assert all(m.num_groups == GROUPS[norm](m.num_channels) and m.affine for m in groupnorms)


def test_shortcut_norm_follows_the_argument():
    model = create_model("resnet18", norm="ln")
    shortcut_norm = model.layer2[0].shortcut[1]
    assert isinstance(shortcut_norm, nn.GroupNorm) and shortcut_norm.num_groups == 1


@pytest.mark.parametrize("norm", ["ln", "gn", "in"])
def test_layer_group_and_instance_norm_are_per_sample_in_train_mode(norm):
    torch.manual_seed(0)
    model = create_model("resnet18", norm=norm).train()
    batch = torch.randn(8, 3, 32, 32)
    alone = model(batch[:1])
    together = model(batch)[:1]
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


def test_batchnorm_is_not_per_sample_in_train_mode():
    # The contrast that makes the per-sample test meaningful.
    model = create_model("resnet18", norm="bn").train()
    batch = torch.randn(8, 3, 32, 32)
    assert not torch.allclose(model(batch[:2])[:1], model(batch)[:1], atol=1e-3)


def test_zero_init_residual_makes_blocks_start_as_identity():
    model = create_model("resnet18", norm="ln", zero_init_residual=True)
    assert all(not b.norm2.weight.detach().any() for b in model.layer1)


def test_unknown_names_give_clear_errors():
    with pytest.raises(ValueError):
        create_model("resnet50")
    with pytest.raises(ValueError):
        create_model("resnet18", norm="batch")
