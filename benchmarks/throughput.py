"""Where the time goes: the model alone on pre-made batches, and the loader alone."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers.models import create_model
from helpers.recipes import Recipe
from helpers.train import Runtime, build_optimizer, evaluate, train_one_epoch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalized-looking NCHW batch and labels, made once and already on the device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (size,), generator=generator)
    return images.to(device), labels.to(device)


def images_per_second(run: Callable[[int], dict[str, Any]], warmup: int, batches: int,
                      device: torch.device) -> float:
    """Rate of `run(batches)` after `run(warmup)`; run returns a dict with an 'images' count."""
    if warmup:
        run(warmup)  # the first steps pay for cuDNN algorithm choice, allocator growth, lazy init
    synchronize(device)
    start = time.perf_counter()
    images = run(batches)["images"]
    synchronize(device)
    return images / (time.perf_counter() - start)


def model_throughput(recipe: Recipe, runtime: Runtime, device: torch.device, batches: int,
                     warmup: int) -> dict[str, float]:
    """Images/s of the recipe's train step and of evaluation (2x batch), with no loader at all."""
    torch.manual_seed(0)
    model = runtime.prepare(create_model(recipe.model, **recipe.model_kwargs), device)
    optimizer = build_optimizer(model, recipe)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    train_batch = random_batch(recipe.batch_size, device)
    eval_batch = random_batch(2 * recipe.batch_size, device)  # build_loaders evaluates at 2x

    # helpers' own loops take any iterable of batches, so the timed step is exactly fit()'s step
    # (autocast, channels_last conversion, GradScaler, optimizer) minus the loader.
    def train_steps(n: int) -> dict[str, Any]:
        """n train steps on the same batch."""
        return train_one_epoch(model, [train_batch] * n, optimizer, criterion, device, runtime,
                               progress=False)

    def eval_steps(n: int) -> dict[str, Any]:
        """n forward passes on the same batch."""
        return evaluate(model, [eval_batch] * n, device, runtime, progress=False)

    return {"train_images_per_second": images_per_second(train_steps, warmup, batches, device),
            "eval_images_per_second": images_per_second(eval_steps, warmup, batches, device)}


def endless(loader: DataLoader) -> Iterator[Any]:
    """Batches epoch after epoch, selecting each epoch's shuffle and augmentation as fit() does."""
    for epoch in itertools.count():
        for holder in (loader.sampler, loader.dataset):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        yield from loader


def loader_throughput(loader: DataLoader, batches: int) -> dict[str, float]:
    """Images/s of iterating a loader alone (decode-free: images are arrays; augment, collate)."""
    stream = endless(loader)
    try:
        next(stream)  # the first batch pays for starting the workers, once per run
        start = time.perf_counter()
        images = sum(len(labels) for _, labels in itertools.islice(stream, batches))
        seconds = time.perf_counter() - start
    finally:
        stream.close()  # stops the workers now rather than at garbage collection
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds}
