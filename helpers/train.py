"""Training: optimizer, loss and schedule from a recipe, the epoch loops, checkpoints with resume,
and `fit`, which ties them together."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .recipes import OPTIMIZERS, Recipe
from .runtime import FP32_CPU, Runtime, atomic_write, device_name, git_commit, peak_memory_gib, utc_now

# ----------------------------------------------------------------------------- optimizer and schedule


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: not on norm scales/shifts nor biases."""
    params = [param for param in model.parameters() if param.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer at `lr`, by default the recipe's LR; One Cycle has none, so pass its peak."""
    groups = parameter_groups(model, recipe.weight_decay)
    lr = recipe.lr if lr is None else lr
    if lr is None or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if recipe.optimizer == "adamw":
        # decay decoupled from the gradient (w -= lr * wd * w), not an L2 term that Adam's second
        # moment rescales per weight: the usual fix for normalized nets, so its wd is ~100x larger
        return torch.optim.AdamW(groups, lr=lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; expected one of {OPTIMIZERS}")


def build_criterion(recipe: Recipe) -> nn.Module:
    """The training loss: cross-entropy with the recipe's label smoothing."""
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int,
                    max_lr: float | None = None):
    """One Cycle (stepped per batch, peak `max_lr`) or ReduceLROnPlateau (per epoch, on test accuracy)."""
    if recipe.scheduler == "onecycle":
        if max_lr is None or not (math.isfinite(max_lr) and max_lr > 0):
            raise ValueError(f"One Cycle needs a positive finite max_lr, got {max_lr}")
        cycle = recipe.onecycle
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=cycle.pct_start(recipe.epochs),  # peak at the end of epoch `peak_epoch`
            anneal_strategy=cycle.anneal, three_phase=False, div_factor=cycle.div_factor,
            final_div_factor=cycle.final_div_factor, cycle_momentum=False)
    if recipe.scheduler == "plateau":
        plateau = recipe.plateau
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=plateau.factor, patience=plateau.patience,
            threshold=plateau.threshold, threshold_mode="abs", min_lr=plateau.min_lr)
    raise ValueError(f"unknown scheduler {recipe.scheduler!r}; expected 'onecycle' or 'plateau'")


# ----------------------------------------------------------------------------- epoch loops


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    runtime: Runtime = FP32_CPU, scheduler=None,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True,
                    desc: str = "train") -> dict[str, float]:
    """One pass over the loader: mean loss, accuracy, seconds, images, last LR. `scheduler` (One Cycle)
    steps after every update but one the fp16 loss scaler skips (an inf or NaN gradient, common early on)."""
    model.train()
    scaler = scaler or runtime.scaler()
    loss_sum = torch.zeros((), device=runtime.device)  # sums stay on the device: reading them back
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)  # every batch stalls a GPU
    seen, lr, start = 0, optimizer.param_groups[0]["lr"], time.perf_counter()
    stepped: list[bool] = []  # a hook, not a read of the scale: no extra wait for the GPU
    hook = optimizer.register_step_post_hook(lambda *args: stepped.append(True))
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    try:
        for step, (images, labels) in enumerate(bar):
            images, labels = runtime.to_device(images, labels)
            with runtime.autocast():
                logits = model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            stepped.clear()
            scaler.step(optimizer)  # calls optimizer.step only when the gradients are finite
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]  # the LR this batch used, before the schedule moves
            if scheduler is not None and stepped:
                scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{lr:.2e}")
    finally:
        hook.remove()
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "seconds": time.perf_counter() - start, "images": seen, "lr": lr}


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime = FP32_CPU, progress: bool = True) -> dict:
    """Mean cross-entropy WITHOUT label smoothing, and accuracy, over the loader."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    for images, labels in tqdm(loader, desc="test", leave=False, disable=not progress, dynamic_ncols=True):
        images, labels = runtime.to_device(images, labels)
        with runtime.autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return {"loss": loss_sum.item() / max(seen, 1), "acc": correct.item() / max(seen, 1),
            "seconds": time.perf_counter() - start, "images": seen}


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written, or that belongs to a different run."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state atomically; a failed write (full disk, read-only folder) says how to go on."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        free = shutil.disk_usage(Path(path).parent).free / 2**30
        raise CheckpointError(f"could not write checkpoint {str(path)!r} ({free:.1f} GiB free): {err}; free "
                              "space or fix the folder, then run the same command to resume") from err


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with a clear error if it is not one."""
    try:
        # Tensors, numbers and strings only: a checkpoint from a shared folder cannot run code.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {err}; delete it or pass --no-resume "
                              "(notebook: resume=False or CIFAR_RESUME=0) to start over") from err
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise CheckpointError(f"{str(path)!r} is not a training checkpoint of this project")
    return state


def read_resume_state(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The state in `folder/last.pt`, or None when there is none."""
    return load_checkpoint(Path(folder) / "last.pt") if (Path(folder) / "last.pt").exists() else None


def recipe_signature(recipe: Recipe) -> dict[str, Any]:
    """The recipe's fields that training depends on, as dotted keys ("recipe.augment.cutout_p")."""
    def flatten(values: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
        for key, value in values.items():
            if isinstance(value, dict) and value:
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    # analysis settings do not change what training does; the range test's do (it picks the max LR)
    analysis = ("recipe.num_misclassified", "recipe.gradcam_layer")
    return {key: value for key, value in flatten(asdict(recipe), "recipe.") if not key.startswith(analysis)}


def data_signature(train_loader: DataLoader, test_loader: DataLoader) -> dict[str, Any]:
    """What the data contributes: content fingerprints, sizes, steps, seed, and the augmentations as
    they are implemented (the transform's full repr and the albumentations version that runs it)."""
    import albumentations

    train_set, test_set = train_loader.dataset, test_loader.dataset
    transform = getattr(train_set, "transform", None)
    return {"data.train_size": len(train_set), "data.test_size": len(test_set),
            "data.steps_per_epoch": len(train_loader),
            "data.train_fingerprint": getattr(train_set, "fingerprint", None),
            "data.test_fingerprint": getattr(test_set, "fingerprint", None),
            "data.augment_streams": getattr(train_set, "STREAMS", None),
            "data.augment": " ".join(f"albumentations {albumentations.__version__}: {transform!r}".split()),
            "seed": getattr(train_set, "seed", getattr(train_loader.sampler, "seed", None))}


def training_signature(recipe: Recipe, max_lr: float | None, model: nn.Module, train_loader: DataLoader,
                       test_loader: DataLoader) -> dict[str, Any]:
    """Everything a resumed run must share with the run that wrote the checkpoint; the architecture as
    a short hash of every parameter and buffer name with its shape."""
    shapes = "".join(f"{name}:{tuple(tensor.shape)};" for name, tensor in model.state_dict().items())
    return (recipe_signature(recipe) | {"max_lr": max_lr}
            | {"model.shapes": hashlib.blake2b(shapes.encode(), digest_size=8).hexdigest()}
            | data_signature(train_loader, test_loader))


def check_resumable(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose signature differs from `expected` on a key of `expected`, or on any
    recipe key it holds (a checkpoint of other code, with a field added or renamed since, is refused)."""
    saved = state.get("signature", {})
    differences = []
    for key in [*expected, *(k for k in saved if k.startswith("recipe.") and k not in expected)]:
        old, value = saved.get(key, "<missing>"), expected.get(key, "<unset>")
        if old != value:
            name = key.removeprefix("recipe.")
            short = len(repr(old)) + len(repr(value)) < 100  # a long value (the transform) is named only
            differences.append(f"{name} {old!r} -> {value!r}" if short else f"{name} changed")
    if differences:
        raise CheckpointError(
            f"{str(path)!r} was written by a run with other settings ({'; '.join(differences)}); "
            "resume with the same settings, pass --no-resume (notebook: resume=False or CIFAR_RESUME=0) "
            "to start over, or choose another output folder")


class Checkpoint:
    """A run folder's last.pt: resume from it (refusing one written with other settings), and save
    into it after every epoch, atomically. It also keeps the executions ("sessions") of the run."""

    def __init__(self, folder: str | os.PathLike, resume: bool = True, keep: dict | None = None) -> None:
        self.path, self.resume = Path(folder) / "last.pt", resume
        self.keep = keep or {}  # saved as is (e.g. the range test that chose max_lr)
        self.sessions: list[dict[str, Any]] = []

    def load(self, signature: dict[str, Any], model: nn.Module, optimizer, scheduler,
             scaler: torch.amp.GradScaler) -> tuple[list[dict[str, Any]], int]:
        """Load model, optimizer, scheduler and scaler from last.pt; return the history and epoch."""
        state = read_resume_state(self.path.parent) if self.resume else None
        if state is None:
            return [], 0
        check_resumable(state, signature, self.path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():  # a disabled scaler saves {}: nothing to load
            scaler.load_state_dict(state["scaler"])
        self.sessions = state.get("sessions", [])
        return state["history"], state["epoch"]

    def start_session(self, runtime: Runtime, epoch: int) -> None:
        """Record this execution: where it started, on what, from which commit, when."""
        self.sessions = self.sessions + [{"from_epoch": epoch, "runtime": runtime.describe(),
                                          "machine": device_name(runtime.device), "time_utc": utc_now(),
                                          "git_commit": git_commit()}]

    def save(self, signature: dict[str, Any], epoch: int, history: list[dict[str, Any]], model: nn.Module,
             optimizer, scheduler, scaler) -> None:
        """Write everything a resumed run needs, after `epoch` epochs."""
        # torch < 2.4 keeps One Cycle's annealing function in its state; torch.load(weights_only=True)
        # refuses functions, and the scheduler rebuilds it from its own settings anyway.
        schedule = {k: v for k, v in scheduler.state_dict().items() if not callable(v)}
        save_checkpoint(self.path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "scheduler": schedule, "scaler": scaler.state_dict(),
                                    "epoch": epoch, "history": history, "signature": signature,
                                    "sessions": self.sessions} | self.keep)


# ----------------------------------------------------------------------------- fit


@contextmanager
def stop_between_batches() -> Iterator[list[int]]:
    """While inside, Ctrl-C asks the loops to stop before their next batch (see `Stoppable`): a DataLoader
    interrupted inside its own bookkeeping fails at its next use (its persistent workers), so a notebook
    cell run again would fail too. A second Ctrl-C stops at once; an ignored SIGINT stays ignored."""
    asked: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield asked
        return

    def ask(signum: int, frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


class Stoppable:
    """A loader whose iteration raises KeyboardInterrupt between two batches once a stop was asked."""

    def __init__(self, loader: DataLoader, asked: list[int]) -> None:
        self.loader, self.asked = loader, asked

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            yield batch
            if self.asked:
                raise KeyboardInterrupt


@dataclass
class FitResult:
    """What `fit` returns: the per-epoch history, the best accuracy and how the run went."""

    history: list[dict[str, Any]]
    best_acc: float
    resumed_from_epoch: int = 0
    sessions: list[dict[str, Any]] = field(default_factory=list)  # one per start or resume


def print_epoch(row: dict[str, Any]) -> None:
    """One line per epoch, so that a headless log shows progress even without bars."""
    seconds = row["train_seconds"] + row["test_seconds"]
    print(f"epoch {row['epoch']:>3}  lr {row['lr']:.2e}  train loss {row['train_loss']:.3f} "
          f"acc {100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.3f} "
          f"acc {100 * row['test_acc']:.2f}%  ({seconds:.1f} s)", flush=True)


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, recipe: Recipe,
        runtime: Runtime = FP32_CPU, max_lr: float | None = None, checkpoint: Checkpoint | None = None,
        progress: bool = True, on_epoch_end: Callable[[dict], None] | None = print_epoch) -> FitResult:
    """Train for `recipe.epochs` epochs, evaluating after each; with a checkpoint, resume and save. `max_lr`
    is One Cycle's peak (Plateau starts at the recipe's `lr`); `on_epoch_end` gets each history row."""
    model = runtime.prepare(model)
    per_batch = recipe.scheduler == "onecycle"  # One Cycle steps every batch, Plateau once an epoch
    optimizer = build_optimizer(model, recipe, max_lr if per_batch else None)
    scheduler = build_scheduler(optimizer, recipe, len(train_loader), max_lr)
    scaler, criterion = runtime.scaler(), build_criterion(recipe)
    signature = training_signature(recipe, max_lr, model, train_loader, test_loader)
    parts = (model, optimizer, scheduler, scaler)
    history, start = checkpoint.load(signature, *parts) if checkpoint else ([], 0)
    if checkpoint and start < recipe.epochs:
        checkpoint.start_session(runtime, start)
    if runtime.device.type == "cuda":  # each session's own peak, not the range test's or an earlier fit's
        torch.cuda.reset_peak_memory_stats(runtime.device)
    with stop_between_batches() as asked:
        for epoch in tqdm(range(start, recipe.epochs), desc=recipe.name, disable=not progress,
                          initial=start, total=recipe.epochs, dynamic_ncols=True):
            for holder in (train_loader.sampler, train_loader.dataset):  # this epoch's order and draws
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(epoch)
            train = train_one_epoch(model, Stoppable(train_loader, asked), optimizer, criterion, runtime,
                                    scheduler if per_batch else None, scaler, progress, f"epoch {epoch + 1}")
            test = evaluate(model, Stoppable(test_loader, asked), runtime, progress)
            if not per_batch:
                scheduler.step(test["acc"])
            history = history + [{
                "epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"], "train_acc": train["acc"],
                "test_loss": test["loss"], "test_acc": test["acc"], "train_seconds": train["seconds"],
                "test_seconds": test["seconds"], "train_images": train["images"],
                "test_images": test["images"], "session": len(checkpoint.sessions) - 1 if checkpoint else 0}]
            if checkpoint:
                checkpoint.sessions[-1]["peak_memory_gib"] = peak_memory_gib(runtime.device)
                checkpoint.save(signature, epoch + 1, history, *parts)
            if on_epoch_end is not None:
                on_epoch_end(history[-1])
    return FitResult(history, max((r["test_acc"] for r in history), default=-1.0), start,
                     checkpoint.sessions if checkpoint else [])
