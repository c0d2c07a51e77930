"""Training: optimizer, loss and schedule from a recipe, the epoch loops, checkpoints with resume,
and `fit`, which ties them together."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import signal
import threading
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .dataset import EpochShuffleSampler
from .recipes import OPTIMIZERS, Recipe
from .runtime import FP32_CPU, Runtime, atomic_write, device_name, peak_memory_gib

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
    """The recipe's optimizer (Adam, AdamW or SGD+Nesterov) at `lr`, by default the recipe's starting
    LR; a One Cycle recipe has none (its scheduler sets every step's LR), so pass its peak."""
    groups = parameter_groups(model, recipe.weight_decay)
    lr = recipe.lr if lr is None else lr
    if lr is None or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if recipe.optimizer == "adamw":
        # Decay decoupled from the gradient (w -= lr * wd * w), not Adam's L2 term that the second
        # moment rescales per weight: the usual fix for normalized nets, so its wd is ~100x larger.
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
            optimizer,
            max_lr=max_lr,
            epochs=recipe.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=cycle.pct_start(recipe.epochs),  # peak at the end of epoch `peak_epoch`
            anneal_strategy=cycle.anneal,
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


def is_per_batch(scheduler) -> bool:
    """True for schedules stepped every batch (One Cycle), False for per-epoch ones (Plateau)."""
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


# ----------------------------------------------------------------------------- epoch loops


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> bool:
    """Backward and update through the loss scaler (a pass-through when it is disabled).

    Returns False when the scaler skipped the update: fp16 gradients with an inf or NaN, which
    it answers by halving its scale (the first few steps of a run usually do).
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stepped: list[bool] = []  # a hook, not a read of the scale: no extra wait for the GPU
    hook = optimizer.register_step_post_hook(lambda *args: stepped.append(True))
    scaler.step(optimizer)  # calls optimizer.step only when the gradients are finite
    hook.remove()
    scaler.update()
    return bool(stepped)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    runtime: Runtime = FP32_CPU, scheduler=None,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True,
                    desc: str = "train", partial: dict[str, float] | None = None,
                    save_partial: Callable[[dict[str, float]], None] | None = None,
                    save_every_s: float = math.inf,
                    stop_signals: list[int] | None = None) -> dict[str, float]:
    """One pass over the loader; returns mean loss, accuracy, seconds, images and the last LR.

    `partial` is the progress an earlier execution made in this epoch (the loader then holds only
    the images it had not seen); `save_partial` receives the progress every `save_every_s` seconds,
    and once more before `TrainingStopped` when a signal lands in `stop_signals`.
    """
    model.train()
    scaler = scaler or runtime.scaler()
    partial = partial or {"loss_sum": 0.0, "correct": 0, "images": 0, "seconds": 0.0,
                          "lr": optimizer.param_groups[0]["lr"]}
    loss_sum = torch.tensor(float(partial["loss_sum"]), device=runtime.device)
    correct = torch.tensor(int(partial["correct"]), device=runtime.device, dtype=torch.long)
    seen, lr = int(partial["images"]), partial["lr"]
    start = last_save = time.perf_counter()
    start -= partial["seconds"]

    def progress_so_far() -> dict[str, float]:
        return {"loss_sum": loss_sum.item(), "correct": int(correct.item()), "images": seen,
                "seconds": time.perf_counter() - start, "lr": lr}

    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = runtime.to_device(images, labels)
        with runtime.autocast():
            logits = model(images)
            loss = criterion(logits, labels)
        stepped = optimizer_step(loss, optimizer, scaler)
        lr = optimizer.param_groups[0]["lr"]  # the LR this batch used, before the schedule moves
        if scheduler is not None and stepped:  # a skipped update does not use up a scheduled LR
            scheduler.step()
        # Sums stay on the device: reading them back every batch would stall the GPU.
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if save_partial is not None and time.perf_counter() - last_save >= save_every_s:
            save_partial(progress_so_far())
            last_save = time.perf_counter()
        if stop_signals and save_partial is not None:  # checked before fetching the next batch
            save_partial(progress_so_far())
            raise TrainingStopped(stop_signals[0])
    done = progress_so_far()
    return {"loss": done["loss_sum"] / max(seen, 1), "acc": done["correct"] / max(seen, 1),
            "seconds": done["seconds"], "images": seen, "lr": lr}


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime = FP32_CPU,
             progress: bool = True) -> dict[str, float]:
    """Mean cross-entropy WITHOUT label smoothing, and accuracy, over the loader."""
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen, start = 0, time.perf_counter()
    for images, labels in tqdm(loader, desc="test", leave=False, disable=not progress,
                               dynamic_ncols=True):
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
    """Save a training state atomically; a failed write says why and how to continue."""
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        folder = Path(path).parent
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        cause = ("the disk is full" if free < 256 * 2**20 else
                 "the folder is not writable" if not os.access(folder, os.W_OK) else str(err))
        raise CheckpointError(
            f"could not write checkpoint {str(path)!r}: {cause} ({free / 2**30:.1f} GiB free); "
            f"free space or fix the folder, then run the same command to resume from the end of epoch "
            f"{state['epoch'] - (0 if state.get('partial') else 1)} or a later save") from err


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


def read_resume_state(checkpoint_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The state in `checkpoint_dir/last.pt`, or None when there is none."""
    if checkpoint_dir is None:
        return None
    last = Path(checkpoint_dir) / "last.pt"
    return load_checkpoint(last) if last.exists() else None


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _field_defaults(cls, prefix: str = "") -> dict[str, Any]:
    """The default of every (nested) dataclass field that has one, as dotted keys."""
    hints = typing.get_type_hints(cls)
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints.get(f.name)):  # nested settings: their fields' defaults
            defaults.update(_field_defaults(hints[f.name], f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            defaults[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[prefix + f.name] = f.default_factory()
    return defaults


# Analysis settings do not change what training does. The range test's do (it picks the max LR).
NOT_TRAINING = ("recipe.num_misclassified", "recipe.gradcam_layer")


def recipe_signature(recipe: Recipe) -> dict[str, Any]:
    """The recipe's fields that training depends on, as dotted keys."""
    flat = _flatten({"recipe": dataclasses.asdict(recipe)})
    return {k: v for k, v in flat.items() if not k.startswith(NOT_TRAINING)}


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


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The architecture as a short hash of every parameter and buffer name with its shape."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return {"model.shapes": digest.hexdigest()}


def training_signature(recipe: Recipe, max_lr: float | None, model: nn.Module, train_loader: DataLoader,
                       test_loader: DataLoader) -> dict[str, Any]:
    """Everything a resumed run must share with the run that wrote the checkpoint."""
    return (recipe_signature(recipe) | {"max_lr": max_lr} | model_signature(model)
            | data_signature(train_loader, test_loader))


def check_resumable(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose signature differs from `expected` on any key either one holds.

    A key the checkpoint lacks (a recipe field added later) matches when `expected` holds that
    field's default, which is by construction the behaviour the older run had. A recipe key only the
    checkpoint holds (a model argument such as strides, set for that run alone) is a difference;
    other keys may be left out of `expected` to check a checkpoint before the data is loaded.
    """
    saved = state.get("signature", {})
    defaults = _flatten({"recipe": _field_defaults(Recipe)})
    differences = []
    for key in [*expected, *(k for k in saved if k.startswith("recipe.") and k not in expected)]:
        old, value = saved.get(key, defaults.get(key, "<missing>")), expected.get(key, "<unset>")
        if old != value:
            name = key.removeprefix("recipe.")
            short = len(repr(old)) + len(repr(value)) < 100  # a long value (the transform) is named only
            differences.append(f"{name} {old!r} -> {value!r}" if short else f"{name} changed")
    if differences:
        raise CheckpointError(
            f"{str(path)!r} was written by a run with other settings ({'; '.join(differences)}); "
            "resume with the same settings, pass --no-resume (notebook: resume=False or CIFAR_RESUME=0) "
            "to start over, or choose another output folder")


# ----------------------------------------------------------------------------- fit

# A CPU epoch takes 3-45 minutes (S9 to S8 on 2 cores); a killed run loses at most this much.
SAVE_EVERY_S = 600.0


class TrainingStopped(KeyboardInterrupt):
    """A stop asked for by SIGINT or SIGTERM, raised once the progress so far is saved."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def save_then_stop_on_signals(enabled: bool = True) -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM are appended to the yielded list instead of stopping at once.

    The training loop saves and raises `TrainingStopped` when it sees one; a second signal stops at
    once (KeyboardInterrupt). A signal the process ignores stays ignored (SIGINT in a background
    job). Off the main thread, where handlers cannot be set, or when not enabled, nothing changes.
    """
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def ask_to_stop(signum: int, frame) -> None:
        if received:  # asked twice: the user does not want to wait for the save
            raise KeyboardInterrupt
        received.append(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, ask_to_stop)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python, which getsignal cannot return; the default is closest
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@dataclass
class FitResult:
    """What `fit` returns: the per-epoch history, the best accuracy and how the run went."""

    history: list[dict[str, Any]]
    best_acc: float
    resumed_from_epoch: int = 0
    wall_seconds: float = 0.0  # this call only
    sessions: list[dict[str, Any]] = field(default_factory=list)  # one per start or resume
    setup: dict[str, str] = field(default_factory=dict)  # the optimizer, schedule and loss fit built


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, recipe: Recipe,
        runtime: Runtime = FP32_CPU, max_lr: float | None = None,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        progress: bool = True, on_epoch_end: Callable[[dict], None] | None = None,
        lr_finder: dict[str, Any] | None = None, session: dict[str, Any] | None = None,
        save_every_s: float = SAVE_EVERY_S) -> FitResult:
    """Train for `recipe.epochs` epochs, evaluating after each; checkpoint and resume if asked.

    With a checkpoint folder, `last.pt` is also written every `save_every_s` seconds inside an
    epoch, and a resumed run continues that epoch where it stopped. `session` is stored with this
    execution's entry in `sessions` (e.g. whether it was a full run).
    """
    midway_sampler = isinstance(train_loader.sampler, EpochShuffleSampler)  # can resume inside an epoch
    if midway_sampler:  # whole, even after an epoch stopped in an earlier call
        train_loader.sampler.set_epoch(train_loader.sampler.epoch)
    steps_per_epoch = len(train_loader)
    model = runtime.prepare(model)
    optimizer = build_optimizer(model, recipe, max_lr if recipe.scheduler == "onecycle" else None)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch, max_lr)
    scaler = runtime.scaler()
    criterion = build_criterion(recipe)
    step_model = runtime.stepper(model)
    signature = training_signature(recipe, max_lr, model, train_loader, test_loader)
    history: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    best_acc, start_epoch, partial = -1.0, 0, None
    last = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    state = read_resume_state(checkpoint_dir) if resume else None
    if state is not None:
        check_resumable(state, signature, last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():  # a disabled scaler saves {}: nothing to load
            scaler.load_state_dict(state["scaler"])
        history, best_acc, start_epoch = state["history"], state["best_acc"], state["epoch"]
        sessions, lr_finder = state.get("sessions", []), state.get("lr_finder", lr_finder)
        partial = state.get("partial")  # an epoch stopped midway: continue it, do not redo it
        if partial is not None and not midway_sampler:
            raise CheckpointError(f"{str(last)!r} stopped inside an epoch, which only a loader with "
                                  "EpochShuffleSampler can continue; build the loaders with build_loaders")
    if start_epoch < recipe.epochs:
        sessions = sessions + [{"from_epoch": start_epoch, "runtime": runtime.describe(),
                                "machine": device_name(runtime.device),
                                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                               | (session or {})]
    if runtime.device.type == "cuda":  # each session's own peak, not the range test's or an earlier fit's
        torch.cuda.reset_peak_memory_stats(runtime.device)
    began = time.perf_counter()
    epochs = tqdm(range(start_epoch, recipe.epochs), desc=recipe.name, disable=not progress,
                  initial=start_epoch, total=recipe.epochs, dynamic_ncols=True)

    def state_after(epochs_done: int, partial: dict[str, float] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; `partial` is the progress inside epoch epochs_done + 1."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epochs_done, "history": history, "best_acc": best_acc,
                "max_lr": max_lr, "signature": signature, "lr_finder": lr_finder,
                "sessions": sessions, "partial": partial}

    can_save_midway = last is not None and midway_sampler
    with save_then_stop_on_signals(enabled=can_save_midway) as stop_signals:
        for epoch in epochs:
            for holder in (train_loader.sampler, train_loader.dataset):
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(epoch)
            if partial is not None:  # skip the images the stopped execution trained on, in order
                train_loader.sampler.set_epoch(epoch, start=int(partial["images"]))
            try:
                train = train_one_epoch(step_model, train_loader, optimizer, criterion, runtime,
                                        scheduler if is_per_batch(scheduler) else None, scaler,
                                        progress, desc=f"epoch {epoch + 1}", partial=partial,
                                        save_partial=(lambda done, epoch=epoch: save_checkpoint(
                                            last, state_after(epoch, done))) if can_save_midway else None,
                                        save_every_s=save_every_s, stop_signals=stop_signals)
            finally:
                if partial is not None:  # the loader whole again, even if this epoch was stopped too
                    train_loader.sampler.set_epoch(epoch)
            partial = None
            test = evaluate(step_model, test_loader, runtime, progress)
            if not is_per_batch(scheduler):
                scheduler.step(test["acc"])
            row = {"epoch": epoch + 1, "lr": train["lr"], "train_loss": train["loss"],
                   "train_acc": train["acc"], "test_loss": test["loss"], "test_acc": test["acc"],
                   "train_seconds": train["seconds"], "test_seconds": test["seconds"],
                   "train_images": train["images"], "test_images": test["images"],
                   "session": len(sessions) - 1}
            history = history + [row]
            sessions[-1]["peak_memory_gib"] = peak_memory_gib(runtime.device)
            epochs.set_postfix(train_acc=f"{train['acc']:.3f}", test_acc=f"{test['acc']:.4f}")
            improved = test["acc"] > best_acc
            best_acc = max(best_acc, test["acc"])
            if last is not None:
                state = state_after(epoch + 1)
                # best before last: a kill between the two leaves last.pt behind, and the resumed
                # run redoes that epoch and rewrites best.pt with the same weights.
                if improved:
                    save_checkpoint(last.with_name("best.pt"), state)
                save_checkpoint(last, state)
            if on_epoch_end is not None:
                on_epoch_end(row)
            if stop_signals and epoch + 1 < recipe.epochs:  # asked during the evaluation: saved above
                raise TrainingStopped(stop_signals[0])
    return FitResult(history, best_acc, start_epoch, time.perf_counter() - began, sessions,
                     describe_setup(optimizer, scheduler, criterion, steps_per_epoch))


def _anneal_strategy(scheduler: torch.optim.lr_scheduler.OneCycleLR) -> str:
    """'cos' or 'linear', as the scheduler holds it (torch >= 2.2 by name, 2.1 as the bound method)."""
    name = getattr(scheduler, "_anneal_func_type", None)
    return name or scheduler.anneal_func.__name__.removeprefix("_annealing_")


def describe_setup(optimizer: torch.optim.Optimizer, scheduler, criterion: nn.Module,
                   steps_per_epoch: int) -> dict[str, str]:
    """What fit trained with, in words: the optimizer, the schedule's settings and the loss."""
    group = optimizer.param_groups[0]
    optim = (f"{type(optimizer).__name__}(" + ", ".join(
        f"{k}={group[k]}" for k in ("momentum", "nesterov", "betas", "eps") if k in group)
        + f"; weight decay {group['weight_decay']:g} on {len(group['params'])} conv/linear weights, "
        f"0 on the {len(optimizer.param_groups[1]['params'])} norm and bias tensors)")
    if is_per_batch(scheduler):
        schedule = (f"OneCycleLR stepped every batch ({scheduler.total_steps} steps, "
                    f"{steps_per_epoch} per epoch): {group['initial_lr']:.3e} -> peak "
                    f"{group['max_lr']:.3e} at step {round(scheduler._schedule_phases[0]['end_step']) + 1} "
                    f"(end of epoch {(scheduler._schedule_phases[0]['end_step'] + 1) / steps_per_epoch:g}) "
                    f"-> {group['min_lr']:.3e}, {_anneal_strategy(scheduler)}, "
                    f"{len(scheduler._schedule_phases)} phases")
    else:
        schedule = (f"ReduceLROnPlateau on test accuracy, stepped every epoch: factor {scheduler.factor:g},"
                    f" patience {scheduler.patience}, threshold {scheduler.threshold:g} (abs), "
                    f"min LR {scheduler.min_lrs[0]:g}")
    loss = f"{type(criterion).__name__}(label_smoothing={getattr(criterion, 'label_smoothing', 0.0)})"
    return {"optimizer": optim, "schedule": schedule, "loss": loss}
