"""The LR range test (Smith 2015): an exponential LR sweep, and the max LR it suggests."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .recipes import Recipe
from .runtime import FP32_CPU, Runtime
from .train import Stoppable, build_criterion, build_optimizer, stop_between_batches


class RangeTestError(RuntimeError):
    """The sweep gave no LR to suggest; the one-line message says what to do instead."""


@dataclass
class LRRangeResult:
    """An LR sweep: the LRs tried, raw and smoothed losses, and the suggested max LR."""

    lrs: list[float]
    losses: list[float]  # exponentially smoothed (bias-corrected)
    raw_losses: list[float]
    suggested_lr: float
    min_loss_lr: float
    steepest_lr: float
    rule: str = ""

    def as_dict(self) -> dict:
        """Plain values, for checkpoints and metrics.json."""
        return asdict(self)

    def summary(self) -> str:
        """One line: steps, where the smoothed loss was lowest and fell fastest, the max LR chosen."""
        return (f"{len(self.lrs)} steps; smoothed loss lowest at {self.min_loss_lr:.3e}, steepest descent "
                f"at {self.steepest_lr:.3e}; max LR {self.suggested_lr:.3e} ({self.rule})")


def lr_range_test(model: nn.Module, loader: DataLoader, recipe: Recipe, runtime: Runtime = FP32_CPU,
                  num_iter: int | None = None, progress: bool = True) -> LRRangeResult:
    """Sweep the LR exponentially with the recipe's optimizer and loss. The model is moved to the runtime's
    device and layout in place (as `fit` would); its weights and train/eval mode are restored after."""
    settings = recipe.lr_finder
    num_iter = num_iter or settings.num_iter
    if num_iter < 2:
        raise ValueError(f"the LR range test needs at least 2 iterations, got {num_iter}")
    model = runtime.prepare(model)
    saved, was_training = copy.deepcopy(model.state_dict()), model.training
    optimizer, criterion = build_optimizer(model, recipe, settings.start_lr), build_criterion(recipe)
    scaler = runtime.scaler()  # fp16 (T4) needs loss scaling here as much as in training
    factor = (settings.end_lr / settings.start_lr) ** (1 / (num_iter - 1))
    lrs, raw, smoothed, average = [], [], [], 0.0
    model.train()
    with stop_between_batches() as asked:  # Ctrl-C waits for the batch, as in `fit`
        # as many passes over the loader as the sweep needs
        batches = (batch for _ in itertools.count() for batch in Stoppable(loader, asked))
        try:
            for i in tqdm(range(num_iter), desc="LR range test", leave=False, disable=not progress):
                lrs.append(settings.start_lr * factor**i)
                for group in optimizer.param_groups:
                    group["lr"] = lrs[-1]
                images, labels = runtime.to_device(*next(batches))
                with runtime.autocast():
                    loss = criterion(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                raw.append(loss.item())  # the sweep needs every loss on the host anyway
                average = settings.smooth * raw[-1] + (1 - settings.smooth) * average
                smoothed.append(average / (1 - (1 - settings.smooth) ** (i + 1)))
                if not math.isfinite(smoothed[-1]) or smoothed[-1] > settings.diverge * min(smoothed):
                    break
        finally:
            model.load_state_dict(saved)
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    return suggest_lr(lrs, smoothed, raw, settings.fraction)


def suggest_lr(lrs: list[float], smoothed: list[float], raw: list[float],
               fraction: float = 0.1) -> LRRangeResult:
    """`fraction` of the LR where the smoothed loss is lowest. There the loss is about to blow up; a tenth
    of it (fastai's rule of thumb) stays well inside the stable region, while a One Cycle warm-up from far
    lower can peak at the minimum itself (S10 with Adam does). The steepest descent is for comparison."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 2:
        raise RangeTestError("the LR range test diverged at once (no finite loss); set the peak yourself "
                             "with onecycle.max_lr (CLI: --onecycle.max-lr), or lower lr_finder.start_lr")
    i_min = min(finite, key=lambda i: smoothed[i])
    slopes = np.gradient(np.asarray(smoothed)[finite], np.log10(np.asarray(lrs)[finite]))
    steepest = lrs[finite[int(np.argmin(slopes[: max(finite.index(i_min), 1)]))]]
    share = {1.0: "", 0.1: "a tenth of "}.get(fraction, f"{fraction:g} times ")
    rule = f"{share}the LR at the minimum of the smoothed loss"
    return LRRangeResult(lrs, smoothed, raw, lrs[i_min] * fraction, lrs[i_min], steepest, rule)
