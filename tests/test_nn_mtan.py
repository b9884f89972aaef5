"""MTAN against a transcription of the paper's attention equations; partition, gradient flow,
training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nn_checks import (
    check_gradient_flow,
    check_partition,
    check_step_matches_aggregation,
    check_training,
    regression_losses,
)
from torch import nn

from mtlgrad.aggregators import PCGrad, UPGrad
from mtlgrad.nn import MTAN

TASKS = ["seg", "depth"]


def conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def make_model(seed: int = 0) -> MTAN:
    torch.manual_seed(seed)
    blocks = [
        (conv(3, 4), conv(4, 4)),
        (nn.Sequential(nn.MaxPool2d(2), conv(4, 6)), conv(6, 6)),
        nn.Sequential(nn.MaxPool2d(2), conv(6, 6)),
    ]
    heads = {
        name: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 1))
        for name in TASKS
    }
    return MTAN(blocks, heads, channels=[4, 6, 6]).double()


def problem(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    targets = {name: torch.randn(4, 1, generator=g, dtype=torch.float64) for name in TASKS}
    return x, regression_losses(targets)


def test_forward_matches_the_attention_equations():
    model = make_model()
    x, _ = problem()
    # Shared features: u_j after the block's first part, p_j its output.
    u0 = model.firsts[0](x)
    p0 = model.rests[0](u0)
    u1 = model.firsts[1](p0)
    p1 = model.rests[1](u1)
    u2 = model.firsts[2](p1)
    p2 = u2
    got = model(x)
    for name in TASKS:
        att = model.attention[name]
        a0 = att[0](u0) * p0  # â^(1) = h(g(u^(1))) ⊙ p^(1)
        f0 = F.max_pool2d(model.extractors[0](a0), 2)  # f^(2), pooled to u^(2)'s resolution
        a1 = att[1](torch.cat([u1, f0], dim=1)) * p1
        f1 = F.max_pool2d(model.extractors[1](a1), 2)
        a2 = att[2](torch.cat([u2, f1], dim=1)) * p2
        torch.testing.assert_close(got[name], model.heads[name](a2))


def test_attention_modules_follow_the_paper():
    model = make_model()
    module = model.attention["seg"][1]
    kinds = [type(m) for m in module]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid]
    assert module[0].kernel_size == (1, 1) and module[3].kernel_size == (1, 1)
    assert module[0].in_channels == 12 and module[3].out_channels == 6  # [u ; f(â)] -> mask on p
    assert model.attention["seg"][0][0].in_channels == 4  # the first block sees u alone
    assert model.extractors[0][0].kernel_size == (3, 3)


def test_partition_and_gradient_flow():
    model = make_model()
    check_partition(model)
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.extractors.parameters()} <= shared
    x, losses = problem()
    check_gradient_flow(model, x, losses)


@pytest.mark.parametrize(
    "aggregator", [UPGrad(), PCGrad(generator=torch.Generator().manual_seed(1))]
)
def test_step_is_the_aggregation(aggregator):
    model = make_model()
    x, losses = problem()
    check_step_matches_aggregation(model, x, losses, aggregator)


def test_training_lowers_the_losses():
    model = make_model()
    x, losses = problem()
    check_training(model, x, losses, UPGrad())


def test_upsampling_blocks_use_interpolation():
    torch.manual_seed(0)
    blocks = [conv(3, 4), nn.Sequential(nn.Upsample(scale_factor=2), conv(4, 4))]
    model = MTAN(blocks, {"a": nn.Identity()}, channels=[4, 4]).double()
    out = model(torch.randn(2, 3, 4, 4, dtype=torch.float64))["a"]
    assert out.shape == (2, 4, 8, 8)


def test_errors():
    heads = {"a": nn.Identity()}
    with pytest.raises(ValueError, match="channels has 1 entries for 2 blocks"):
        MTAN([conv(3, 4), conv(4, 4)], heads, channels=[4])
    with pytest.raises(ValueError, match=r"channels\[0\] must be a positive int"):
        MTAN([conv(3, 4)], heads, channels=[(4, 4, 4)])
    model = MTAN([conv(3, 4)], heads, channels=[5])
    with pytest.raises(ValueError, match=r"block 0 gives u of shape \[2, 4, 4, 4\]"):
        model(torch.randn(2, 3, 4, 4))
    model = MTAN([(conv(3, 4), nn.MaxPool2d(2))], heads, channels=[4])
    with pytest.raises(ValueError, match="block 0 changes the resolution"):
        model(torch.randn(2, 3, 4, 4))
