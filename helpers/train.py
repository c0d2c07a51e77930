"""Training: device and seeds, optimizer and schedule from a recipe, the epoch loops, the LR range
test, checkpoints with resume, and predictions on the test set."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .recipes import Recipe

# ----------------------------------------------------------------------------- device and runtime


def pick_device(name: str | None = None) -> torch.device:
    """The named device, else CUDA, then Apple's MPS, then the CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Runtime:
    """How a run uses the hardware: mixed precision, memory layout, compilation."""

    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device, fast: bool = True, compile: bool = False) -> Runtime:
        """Fast settings on CUDA (bf16 from Ampere on, else fp16; channels_last); fp32 elsewhere."""
        if not fast or device.type != "cuda":
            return cls()
        # Not torch.cuda.is_bf16_supported(): it says yes on a T4 (emulated), where cuDNN has
        # no bf16 convolutions. Compute capability 8.0 (Ampere) is where bf16 is native.
        native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        dtype = torch.bfloat16 if native_bf16 else torch.float16
        return cls(amp_dtype=dtype, channels_last=True, compile=compile)

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Move the model to the device in this runtime's memory layout."""
        model = model.to(device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def autocast(self, device: torch.device):
        """Autocast context for the forward pass (a no-op in fp32)."""
        return torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """Loss scaling for fp16 only (bf16 has fp32's range); its inf check syncs once a step."""
        return torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, runtime: Runtime):
    """Non-blocking copy of a batch, in the runtime's memory layout."""
    images = images.to(device, non_blocking=True)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- optimizer and schedule


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: not on norm scales/shifts nor biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer (Adam or SGD+Nesterov) at `lr` (default: the recipe's)."""
    groups = parameter_groups(model, recipe.weight_decay)
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; expected 'adam' or 'sgd'")


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int,
                    max_lr: float | None = None):
    """One Cycle (stepped per batch) or ReduceLROnPlateau (stepped per epoch on test accuracy)."""
    if recipe.scheduler == "onecycle":
        cycle = recipe.onecycle
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lr or recipe.lr,
            epochs=recipe.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=cycle.pct_start(recipe.epochs),  # peak at the end of epoch `peak_epoch`
            anneal_strategy="linear",
            three_phase=False,
            div_factor=cycle.div_factor,
            final_div_factor=cycle.final_div_factor,
            cycle_momentum=False,
        )
    if recipe.scheduler == "plateau":
        plateau = recipe.plateau
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=plateau.factor, patience=plateau.patience,
            threshold=plateau.threshold, threshold_mode="abs", min_lr=plateau.min_lr,
        )
    raise ValueError(f"unknown scheduler {recipe.scheduler!r}; expected 'onecycle' or 'plateau'")


def steps_per_batch(scheduler) -> bool:
    """True for schedules stepped every batch (One Cycle), False for per-epoch ones (Plateau)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


# ----------------------------------------------------------------------------- epoch loops


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> None:
    """Backward and update through the loss scaler (a pass-through when it is disabled)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    criterion: nn.Module, device: torch.device, runtime: Runtime = Runtime(),
                    scheduler=None, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = True, desc: str = "train") -> dict[str, float]:
    """One pass over the loader; returns mean loss, accuracy, seconds and images."""
    model.train()
    scaler = scaler or runtime.scaler(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start, lr = 0, time.perf_counter(), optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = _to_device(images, labels, device, runtime)
        with runtime.autocast(device):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer_step(loss, optimizer, scaler)
        lr = optimizer.param_groups[0]["lr"]  # the LR this batch used, before the schedule moves
        if scheduler is not None:
            scheduler.step()
        # Sums stay on the device: reading them back every batch would stall the GPU.
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "seconds": time.perf_counter() - start, "images": seen, "lr": lr}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             runtime: Runtime = Runtime(), progress: bool = True) -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and accuracy over the loader."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    for images, labels in tqdm(loader, desc="test", leave=False, disable=not progress,
                               dynamic_ncols=True):
        images, labels = _to_device(images, labels, device, runtime)
        with runtime.autocast(device):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "seconds": time.perf_counter() - start, "images": seen}


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to a different run."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state atomically."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with a clear error if it is not one."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{str(path)!r} is not a training checkpoint of this project")
    return state


# ----------------------------------------------------------------------------- fit


@dataclass
class FitResult:
    """What `fit` returns: the per-epoch history and where the checkpoints are."""

    history: list[dict[str, float]]
    best_acc: float
    max_lr: float | None
    checkpoint_dir: str | None
    resumed_from_epoch: int = 0
    wall_seconds: float = 0.0


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, recipe: Recipe,
        device: torch.device, runtime: Runtime = Runtime(), max_lr: float | None = None,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None) -> FitResult:
    """Train for `recipe.epochs` epochs, evaluating after each; checkpoint and resume if asked."""
    model = runtime.prepare(model, device)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, len(train_loader), max_lr)
    scaler = runtime.scaler(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    step_model = torch.compile(model) if runtime.compile else model
    history: list[dict[str, float]] = []
    best_acc, start_epoch = -1.0, 0
    last = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    if last is not None and resume and last.exists():
        state = load_checkpoint(last, map_location=device)
        _check_resumable(state, recipe, max_lr, data_signature(train_loader), last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():  # a disabled scaler saves {}: nothing to load
            scaler.load_state_dict(state["scaler"])
        history, best_acc, start_epoch = state["history"], state["best_acc"], state["epoch"]
    began = time.perf_counter()
    epochs = tqdm(range(start_epoch, recipe.epochs), desc=recipe.name, disable=not progress,
                  initial=start_epoch, total=recipe.epochs, dynamic_ncols=True)
    for epoch in epochs:
        for holder in (train_loader.sampler, train_loader.dataset):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        train = train_one_epoch(step_model, train_loader, optimizer, criterion, device, runtime,
                                scheduler if steps_per_batch(scheduler) else None, scaler,
                                progress, desc=f"epoch {epoch + 1}")
        test = evaluate(step_model, test_loader, device, runtime, progress)
        if not steps_per_batch(scheduler):
            scheduler.step(test["acc"])
        row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
               "train_acc": train["acc"], "test_loss": test["loss"], "test_acc": test["acc"],
               "train_seconds": train["seconds"], "test_seconds": test["seconds"],
               "train_images": train["images"], "test_images": test["images"]}
        history.append(row)
        epochs.set_postfix(train_acc=f"{train['acc']:.3f}", test_acc=f"{test['acc']:.4f}")
        improved = test["acc"] > best_acc
        best_acc = max(best_acc, test["acc"])
        if last is not None:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "history": history, "best_acc": best_acc,
                     "max_lr": max_lr, "recipe": dataclasses.asdict(recipe),
                     "data": data_signature(train_loader)}
            save_checkpoint(last, state)
            if improved:
                save_checkpoint(last.with_name("best.pt"), state)
        if on_epoch_end is not None:
            on_epoch_end(row)
    return FitResult(history, best_acc, max_lr, str(checkpoint_dir) if checkpoint_dir else None,
                     start_epoch, time.perf_counter() - began)


def data_signature(train_loader: DataLoader) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint, data-wise."""
    return {"train_size": len(train_loader.dataset), "steps_per_epoch": len(train_loader),
            "seed": getattr(train_loader.sampler, "seed", None)}


def checkpoint_max_lr(checkpoint_dir: str | os.PathLike) -> float | None:
    """The max LR the run in `checkpoint_dir` started with; None without a checkpoint.

    A resumed run keeps it: on a GPU the LR range test is not bit-exact, and fit() refuses to
    resume with another LR.
    """
    last = Path(checkpoint_dir) / "last.pt"
    return load_checkpoint(last)["max_lr"] if last.exists() else None


def _check_resumable(state: dict, recipe: Recipe, max_lr: float | None, data: dict[str, Any],
                     path: Path) -> None:
    """Refuse to resume a checkpoint written by a different recipe, LR, data size or seed."""
    saved = state.get("recipe", {})
    mismatched = [k for k, v in dataclasses.asdict(recipe).items() if saved.get(k) != v]
    if state.get("max_lr") != max_lr:
        mismatched.append("max_lr")
    mismatched += [k for k, v in data.items() if state.get("data", {}).get(k) != v]
    if mismatched:
        raise CheckpointError(
            f"{str(path)!r} was written with different settings ({', '.join(mismatched)}); "
            "resume with the same settings, pass resume=False (CLI: --no-resume), "
            "or choose another output folder"
        )


# ----------------------------------------------------------------------------- LR range test


@dataclass
class LRRangeResult:
    """An LR sweep: the LRs tried, raw and smoothed losses, and the suggested max LR."""

    lrs: list[float]
    losses: list[float]  # exponentially smoothed (bias-corrected)
    raw_losses: list[float]
    suggested_lr: float
    min_loss_lr: float
    steepest_lr: float
    rule: str


def lr_range_test(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                  criterion: nn.Module, device: torch.device, start_lr: float = 1e-6,
                  end_lr: float = 1.0, num_iter: int = 100, smooth: float = 0.05,
                  diverge: float = 5.0, runtime: Runtime = Runtime(),
                  progress: bool = True) -> LRRangeResult:
    """Exponential LR sweep (Smith 2015); model and optimizer are restored afterwards.

    Suggestion rule: a tenth of the LR at the smoothed loss's minimum. At the minimum the loss
    is about to blow up; a tenth of it is the largest LR still well inside the stable region.
    """
    if num_iter < 2 or not 0 < start_lr < end_lr:
        raise ValueError(f"need num_iter >= 2 and 0 < start_lr < end_lr, got {num_iter}, "
                         f"{start_lr}, {end_lr}")
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    model.train()
    factor = (end_lr / start_lr) ** (1 / (num_iter - 1))
    scaler = runtime.scaler(device)  # fp16 (T4) needs loss scaling here as much as in training
    lrs, raw, smoothed, average, best = [], [], [], 0.0, math.inf
    batches = _cycle(loader)
    try:
        for i in tqdm(range(num_iter), desc="LR range test", leave=False, disable=not progress):
            lr = start_lr * factor**i
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = _to_device(*next(batches), device, runtime)
            with runtime.autocast(device):
                loss = criterion(model(images), labels)
            optimizer_step(loss, optimizer, scaler)
            value = loss.item()  # the sweep needs every loss on the host anyway
            average = smooth * value + (1 - smooth) * average
            current = average / (1 - (1 - smooth) ** (i + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(current)
            best = min(best, current)
            if not math.isfinite(current) or current > diverge * best:
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return _suggest(lrs, smoothed, raw)


def _suggest(lrs: list[float], smoothed: list[float], raw: list[float]) -> LRRangeResult:
    """Pick the suggested LR from a finished sweep."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 2:
        raise RuntimeError("LR range test diverged at once; lower start_lr")
    i_min = min(finite, key=lambda i: smoothed[i])
    log_lr = np.log10(np.asarray(lrs)[finite])
    slopes = np.gradient(np.asarray(smoothed)[finite], log_lr)
    steepest = lrs[finite[int(np.argmin(slopes[: max(finite.index(i_min), 1)]))]]
    return LRRangeResult(lrs, smoothed, raw, lrs[i_min] / 10, lrs[i_min], steepest,
                         "a tenth of the LR at the minimum of the smoothed loss")


def _cycle(loader: DataLoader):
    """Endless iteration over a loader."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Model outputs on a loader in its order: softmax probabilities, predictions, labels."""

    probs: np.ndarray
    preds: np.ndarray
    labels: np.ndarray

    @property
    def accuracy(self) -> float:
        """Fraction predicted correctly."""
        return float((self.preds == self.labels).mean())


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            runtime: Runtime = Runtime(), progress: bool = True) -> Predictions:
    """Predictions on an unshuffled loader, in dataset order."""
    if not isinstance(loader.sampler, torch.utils.data.SequentialSampler):
        raise ValueError("predict needs an unshuffled loader (SequentialSampler) so that row i "
                         f"is dataset item i; got {type(loader.sampler).__name__}")
    model.eval()
    probs, labels = [], []
    for images, target in tqdm(loader, desc="predict", leave=False, disable=not progress):
        images, target = _to_device(images, target, device, runtime)
        with runtime.autocast(device):
            logits = model(images)
        probs.append(logits.float().softmax(1).cpu())
        labels.append(target.cpu())
    p = torch.cat(probs).numpy()
    return Predictions(p, p.argmax(1), torch.cat(labels).numpy())


def select_misclassified(predictions: Predictions, n: int = 20) -> np.ndarray:
    """Dataset indices of the n misclassified images the model was most confident about.

    Rule: among images whose prediction is wrong, sort by the probability given to the wrong
    class (highest first), ties broken by the lower index. Deterministic for given predictions.
    """
    wrong = np.flatnonzero(predictions.preds != predictions.labels)
    confidence = predictions.probs[wrong, predictions.preds[wrong]]
    order = np.lexsort((wrong, -confidence))
    return wrong[order][:n]


# ----------------------------------------------------------------------------- run metadata


def run_metadata(device: torch.device) -> dict[str, Any]:
    """Device, library versions and time, saved with every run."""
    import albumentations
    import torchvision

    meta = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "albumentations": albumentations.__version__,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        meta.update(device_name=torch.cuda.get_device_name(device),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return meta


def find_max_lr(model: nn.Module, train_loader: DataLoader, recipe: Recipe, device: torch.device,
                runtime: Runtime = Runtime(), num_iter: int | None = None,
                progress: bool = True) -> LRRangeResult:
    """Run the recipe's LR range test with its optimizer and loss; the model is left untouched."""
    model = runtime.prepare(model, device)
    settings = recipe.lr_finder
    optimizer = build_optimizer(model, recipe, settings.start_lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    return lr_range_test(model, train_loader, optimizer, criterion, device, settings.start_lr,
                         settings.end_lr, num_iter or settings.num_iter, settings.smooth,
                         settings.diverge, runtime, progress)
