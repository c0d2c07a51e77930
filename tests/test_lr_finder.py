"""The LR range test: an exponential sweep that leaves the model as it found it."""

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch

from helpers.lr_finder import RangeTestError, lr_range_test, suggest_lr
from helpers.recipes import S10, LRFinder
from tests.tiny import TinyNet, tiny_setup


def test_sweeps_exponentially_stops_at_divergence_and_restores_the_model():
    finder = LRFinder(start_lr=1e-4, end_lr=10.0, num_iter=60, fraction=0.5)
    recipe = dataclasses.replace(S10, lr_finder=finder)
    train_loader, _ = tiny_setup(recipe, n_train=128, batch=16)
    model = TinyNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = lr_range_test(model, train_loader, recipe, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), "weights restored"
    assert not model.training, "mode restored"
    assert all(p.grad is None for p in model.parameters()), "no gradients left behind"
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert result.lrs[0] == pytest.approx(1e-4)
    assert len(result.lrs) < 60, "an LR up to 10 diverges and the sweep stops early"
    assert result.suggested_lr == pytest.approx(result.min_loss_lr * recipe.lr_finder.fraction)
    assert result.min_loss_lr == result.lrs[int(np.argmin(result.losses))]
    assert result.losses[int(np.argmin(result.losses))] < result.losses[0]


def test_rule_on_a_hand_made_curve():
    lrs = [10.0 ** e for e in range(-5, 1)]
    losses = [2.3, 2.2, 1.5, 1.0, 1.2, 9.0]
    result = suggest_lr(lrs, losses, losses)
    assert result.min_loss_lr == 1e-2 and result.suggested_lr == pytest.approx(1e-3)
    assert result.rule == "a tenth of the LR at the minimum of the smoothed loss"
    at_min = suggest_lr(lrs, losses, losses, fraction=1.0)
    assert at_min.suggested_lr == at_min.min_loss_lr == 1e-2 and at_min.rule.startswith("the LR at")
    assert result.steepest_lr == 1e-3  # the largest drop per decade: 2.2 -> 1.5 -> 1.0
    with pytest.raises(RangeTestError):
        suggest_lr(lrs[:2], [float("nan")] * 2, [float("nan")] * 2)


def test_needs_two_iterations():
    train_loader, _ = tiny_setup(S10, n_train=32, batch=16)
    with pytest.raises(ValueError):
        lr_range_test(TinyNet(), train_loader, S10, num_iter=1, progress=False)


class InterruptedAt:
    """A loader that sends this process SIGINT (Ctrl-C) while producing its `at`-th batch."""

    def __init__(self, loader, at: int) -> None:
        self.loader, self.at = loader, at

    def __iter__(self):
        for count, batch in enumerate(self.loader, start=1):
            if count == self.at:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch


def test_ctrl_c_during_the_sweep_waits_for_the_batch_then_stops_with_the_weights_restored():
    train_loader, _ = tiny_setup(S10, n_train=128, batch=16)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    with pytest.raises(KeyboardInterrupt):
        lr_range_test(model, InterruptedAt(train_loader, 3), S10, num_iter=8, progress=False)
    assert len(forwards) == 3, "the batch being loaded is still trained on; none after it"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
