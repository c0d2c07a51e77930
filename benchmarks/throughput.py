"""Where the time goes: the model alone on pre-made batches, and the loader alone."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from helpers.models import create_model
from helpers.recipes import Recipe
from helpers.runtime import Runtime
from helpers.train import build_criterion, build_optimizer, evaluate, train_one_epoch


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(fast: Runtime) -> list[Runtime]:
    """The runtimes worth comparing on one device: the fast one (autocast + channels_last where
    the hardware has them), the same in NCHW (a norm layer may hand back NCHW and force a
    conversion per layer), and plain fp32 NCHW; each once."""
    candidates = [fast, replace(fast, channels_last=False), Runtime(fast.device)]
    return [r for i, r in enumerate(candidates) if r not in candidates[:i]]


def random_batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalized-looking NCHW batch and labels, made once and already on the device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    return images.to(device), torch.randint(0, 10, (size,), generator=generator).to(device)


def images_per_second(run: Callable[[int], dict[str, Any]], warmup: int, batches: int,
                      device: torch.device) -> float:
    """Rate of `run(batches)` after `run(warmup)`; run returns a dict with an 'images' count."""
    if warmup:
        run(warmup)  # the first steps pay for algorithm choice, allocator growth, lazy init
    _synchronize(device)
    start = time.perf_counter()
    images = run(batches)["images"]
    _synchronize(device)
    return images / (time.perf_counter() - start)


def model_throughput(recipe: Recipe, runtime: Runtime, batches: int, warmup: int,
                     compile: bool = False) -> dict[str, float]:
    """Images/s of the recipe's train step (fit's own loop, no loader) and of evaluation at 2x batch.

    `compile` steps torch.compile'd modules (static shapes: each batch size compiled once); the
    warm-up then also pays for compiling both graphs, so pass warmup >= 1.
    """
    torch.manual_seed(0)
    model = runtime.prepare(create_model(recipe.model, **recipe.model_kwargs))
    # any LR: a step's speed does not depend on it (One Cycle recipes have no starting LR)
    optimizer, criterion = build_optimizer(model, recipe, recipe.lr or 1e-3), build_criterion(recipe)
    if compile:
        model = torch.compile(model, dynamic=False)
    train_batch = random_batch(recipe.batch_size, runtime.device)
    eval_batch = random_batch(2 * recipe.batch_size, runtime.device)  # build_loaders evaluates at 2x

    def train_steps(n: int) -> dict[str, Any]:
        return train_one_epoch(model, [train_batch] * n, optimizer, criterion, runtime, progress=False)

    def eval_steps(n: int) -> dict[str, Any]:
        return evaluate(model, [eval_batch] * n, runtime, progress=False)

    return {"train_images_per_second": images_per_second(train_steps, warmup, batches, runtime.device),
            "eval_images_per_second": images_per_second(eval_steps, warmup, batches, runtime.device)}


def _endless(loader: DataLoader) -> Iterator[Any]:
    """Batches epoch after epoch, selecting each epoch's shuffle and augmentation as fit() does."""
    for epoch in itertools.count():
        for holder in (loader.sampler, loader.dataset):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        yield from loader


def loader_throughput(loader: DataLoader, batches: int) -> dict[str, float]:
    """Images/s of iterating a loader alone (images are decoded up front: augmentation and collation)."""
    stream = _endless(loader)
    try:
        next(stream)  # the first batch pays for starting workers, once per run
        start = time.perf_counter()
        images = sum(len(labels) for _, labels in itertools.islice(stream, batches))
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds}
