"""S9 network: the assignment's rules (size, no max-pool, separable and dilated convs, GAP, RF > 44)
and the receptive-field calculator, checked against the gradient extent of one output unit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.models import DilatedDWSepNet, count_parameters, create_model
from helpers.receptive_field import receptive_field, receptive_field_table

BLOCKS = ("c1", "c2", "c3", "c4")


def executed_convs(model: nn.Module, input_size: int = 32) -> list[nn.Conv2d]:
    """The model's Conv2d layers in the order a forward pass runs them."""
    order: list[nn.Conv2d] = []
    handles = [m.register_forward_hook(lambda m, i, o: order.append(m))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, input_size, input_size))
    for handle in handles:
        handle.remove()
    return order


def block_rf(model: nn.Module, block: str) -> int:
    """Receptive field at the output of a block: that of its last conv/pool layer."""
    return [layer["rf"] for layer in receptive_field(model) if layer["name"].startswith(block + ".")][-1]


def test_registered_and_output_shape():
    model = create_model("dilated_dwsep_net", num_classes=7)
    assert isinstance(model, DilatedDWSepNet)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_parameter_count_under_200k_and_equal_to_the_layer_shapes():
    model = DilatedDWSepNet()

    def conv(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> int:
        return c_out * (c_in // groups) * k * k

    def bn(c: int) -> int:
        return 2 * c  # weight and bias

    def sep(c_in: int, c_out: int) -> int:
        return conv(c_in, c_in, 3, groups=c_in) + conv(c_in, c_out, 1) + bn(c_out)

    design = (conv(3, 32) + bn(32) + conv(32, 64) + bn(64)  # c1
              + 2 * (conv(64, 64) + bn(64)) + sep(64, 144)  # c2
              + 2 * sep(144, 144) + 2 * sep(144, 144)  # c3, c4
              + 144 * 10 + 10)  # head
    by_module = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            by_module += m.out_channels * (m.in_channels // m.groups) * kh * kw
            by_module += m.out_channels if m.bias is not None else 0
        elif isinstance(m, nn.BatchNorm2d):
            by_module += bn(m.num_features)
        elif isinstance(m, nn.Linear):
            by_module += m.in_features * m.out_features + m.out_features
    n = count_parameters(model)
    assert n == by_module == design  # no parameter outside conv/BN/linear, and the layout as designed
    assert 100_000 < n < 200_000


def test_no_max_pool_and_downsampling_only_by_strided_convs():
    model = DilatedDWSepNet()
    assert not any("MaxPool" in type(m).__name__ for m in model.modules())
    layers = receptive_field(model)  # raises if something unhooked (e.g. F.max_pool2d) resizes the map
    assert {layer["kind"] for layer in layers} == {"Conv2d"}
    strides = [layer["stride"] for layer in layers]
    assert strides.count(2) == 2 and set(strides) == {1, 2}
    assert layers[-1]["out_size"] == 32 // layers[-1]["jump"] == 8


def test_depthwise_conv_followed_by_pointwise_conv():
    convs = executed_convs(DilatedDWSepNet())
    pairs = [(a, b) for a, b in zip(convs, convs[1:])
             if a.groups == a.in_channels > 1 and a.out_channels % a.in_channels == 0
             and b.kernel_size == (1, 1) and b.groups == 1 and b.in_channels == a.out_channels]
    assert pairs, "no depthwise conv runs straight into a 1x1 pointwise conv"


def test_dilated_conv_runs():
    assert any(c.dilation[0] > 1 for c in executed_convs(DilatedDWSepNet()))


def test_global_average_pool_then_ten_classes():
    model = DilatedDWSepNet().eval()
    assert isinstance(model.gap, nn.AdaptiveAvgPool2d) and model.gap.output_size in (1, (1, 1))
    pooled = {}
    model.gap.register_forward_hook(lambda m, i, o: pooled.__setitem__("shape", tuple(o.shape)))
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert pooled["shape"] == (3, 144, 1, 1)


def test_gradcam_layer_map_is_at_least_8x8():
    model = DilatedDWSepNet().eval()
    shapes = {}
    for name in BLOCKS:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    model(torch.randn(1, 3, 32, 32))
    assert shapes == {"c1": (64, 16, 16), "c2": (144, 8, 8), "c3": (144, 8, 8), "c4": (144, 8, 8)}


def test_receptive_field_over_44():
    model = DilatedDWSepNet()
    assert {block: block_rf(model, block) for block in BLOCKS} == {"c1": 5, "c2": 17, "c3": 41, "c4": 65}
    assert receptive_field(model)[-1]["rf"] > 44


@pytest.mark.parametrize("last_block", BLOCKS)
def test_receptive_field_equals_gradient_extent(last_block):
    """Backprop from the centre unit of a block's map; the non-zero input gradient spans the RF."""
    model = DilatedDWSepNet().double().eval()  # eval: fresh BN stats make BN a positive scaling
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # all-positive weights and input: every ReLU passes gradient
                m.weight.fill_(1.0 / m.weight[0].numel())
    features = nn.Sequential(*[model.get_submodule(b) for b in BLOCKS[: BLOCKS.index(last_block) + 1]])
    x = torch.ones(1, 3, 128, 128, dtype=torch.float64, requires_grad=True)  # large: the field is not clipped
    out = features(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    extent = (int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
    assert 0 < rows[0] and rows[-1] < 127 and 0 < cols[0] and cols[-1] < 127  # not touching the border
    assert extent == (block_rf(model, last_block),) * 2
    # dilation 2 then 1 leaves no gridding holes: every pixel in the field reaches the unit
    assert seen[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1].all()


def test_receptive_field_of_a_hand_model():
    # conv3 -> conv3 stride 2 -> conv3 dilation 2 -> maxpool 2: rf 3, 3+2*1=5, 5+4*2=13, 13+1*2=15
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, dilation=2, padding=2), nn.MaxPool2d(2),
    )
    layers = receptive_field(model, input_size=32, in_channels=1)
    assert [(lay["name"], lay["kind"]) for lay in layers] == [
        ("0", "Conv2d"), ("2", "Conv2d"), ("4", "Conv2d"), ("5", "MaxPool2d")]
    assert [lay["rf"] for lay in layers] == [3, 5, 13, 15]
    assert [lay["jump"] for lay in layers] == [1, 2, 2, 4]
    assert [lay["out_size"] for lay in layers] == [32, 16, 16, 8]
    assert [lay["dilation"] for lay in layers] == [1, 1, 2, 1]


def test_receptive_field_refuses_a_branch_with_its_own_conv():
    class ProjectionShortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.shortcut = nn.Conv2d(3, 8, 1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.shortcut(x)

    with pytest.raises(ValueError):
        receptive_field(ProjectionShortcut())


def test_receptive_field_table_and_model_state_kept():
    model = DilatedDWSepNet().train()
    bn = model.c1[0][1]
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    table = receptive_field_table(model)
    assert model.training  # the dummy pass ran in eval mode and the mode was restored
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert table.index.name == "name" and table.index[-1] == "c4.1.pw"
    assert {"kernel", "stride", "dilation", "out_size", "jump", "rf"} <= set(table.columns)
    assert table["rf"].iloc[-1] == 65 and table["out_size"].iloc[-1] == 8
