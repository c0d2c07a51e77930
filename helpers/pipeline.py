"""The run as a few plain functions, walked by the CLI, the notebooks and the benchmarks alike:

    recipe, options -> start_run -> load_run_data -> build_run_loaders -> build_run_model
                    -> resolve_max_lr -> train_run -> analyse -> finish_run

`run_recipe(recipe, options)` walks all of them headless and writes metrics.json and the figures.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader

from . import visualize
from .analysis import Predictions, predict, select_misclassified
from .dataset import CifarArrays, DataSummary, build_loaders, check_data_dir, load_data, summarize
from .download import CACHE_ENV
from .gradcam import explain_items, find_layer
from .lr_finder import LRRangeResult, lr_range_test
from .models import count_parameters, create_model
from .recipes import Recipe, check, differences
from .runtime import (
    Runtime,
    atomic_write,
    git_commit,
    pick_device,
    remove_stale_temporaries,
    run_metadata,
    seed_everything,
)
from .train import (
    Checkpoint,
    CheckpointError,
    FitResult,
    check_resumable,
    data_signature,
    fit,
    model_signature,
    read_resume_state,
    recipe_signature,
)


class SettingsError(ValueError):
    """A run setting that cannot work; the message says what was expected and what to do."""


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads and writes, and what it runs on: everything a run needs besides its recipe.

    The notebooks read them from CIFAR_<NAME> variables (`from_env`), the CLI from its flags.
    """

    data_dir: str | None = "data"  # an ImageFolder copy, torchvision's files, or where to download
    download: bool = False
    synthetic: bool = False  # made-up images for smoke runs: no data folder needed
    out: str | None = None  # the run folder; "{recipe}" is replaced; default runs/<recipe>
    images_dir: str | None = None  # also save the figures there, as <recipe>_<figure>.png
    seed: int = 0
    device: str | None = None  # cuda, mps or cpu; None: the best this machine has
    workers: int | None = None  # loader worker processes; None: chosen for the device
    plain: bool = False  # fp32, NCHW and default loaders, for speed comparisons
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        """Reject impossible values at once, with one line that says what to pass instead."""
        if not 0 <= self.seed < 2**32:
            raise SettingsError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.workers is not None and self.workers < 0:
            raise SettingsError(f"workers must be 0 or more, got {self.workers}")
        if not self.synthetic and not self.data_dir:
            raise SettingsError("no data folder given; pass data_dir (or synthetic for a smoke run)")
        try:
            (self.out or "").format(recipe="s10")
        except (KeyError, IndexError, ValueError, AttributeError):  # {x}, {0}, {, {recipe.x}
            raise SettingsError(f"out {self.out!r}: the only placeholder allowed is {{recipe}}") from None

    def out_dir(self, recipe: Recipe) -> Path:
        """The run folder: checkpoints, metrics.json and figures."""
        return Path((self.out or "runs/{recipe}").format(recipe=recipe.name))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **defaults: Any) -> RunOptions:
        """Options for a notebook: `defaults`, overridden by CIFAR_<NAME> variables (CIFAR_DATA_DIR, ...)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(defaults)
        known = {f"CIFAR_{f.name.upper()}" for f in fields(cls)} | {"CIFAR_OVERRIDES", CACHE_ENV}
        for name in sorted(set(env) - known):
            if name.startswith("CIFAR_"):  # e.g. CIFAR_EPOCHS, from before recipe values moved
                raise SettingsError(f"{name} is not a run option; recipe values go in CIFAR_OVERRIDES "
                                    f"(\"epochs=2 augment.cutout_p=0.5\"), options are "
                                    f"{', '.join(sorted(known))}")
        for f in fields(cls):
            raw = env.get(f"CIFAR_{f.name.upper()}", "").strip()
            if raw:
                values[f.name] = _parse(f.name, raw, f.type)
        return cls(**values)


def is_full_run(recipe: Recipe, options: RunOptions) -> bool:
    """The assignment's run: its recipe exactly, on real data (a resumed run's checkpoint matched it)."""
    return not options.synthetic and not differences(recipe)


def _parse(name: str, raw: str, kind: str) -> Any:
    """A CIFAR_* variable's text as the field's type, with a one-line error for bad text."""
    try:
        if kind.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind.startswith("int"):
            return int(raw)
        return raw
    except ValueError:
        expected = kind.split(" ")[0]
        raise SettingsError(f"CIFAR_{name.upper()}={raw!r} is not a valid {expected}") from None


# ----------------------------------------------------------------------------- the steps


@dataclass
class Run:
    """A started run: its recipe, options, runtime, folder and the checkpoint it resumes (if any)."""

    recipe: Recipe
    options: RunOptions
    runtime: Runtime
    out: Path
    resume_state: dict[str, Any] | None
    started: float = field(default_factory=time.perf_counter)

    def say(self, message: str) -> None:
        """One line of progress for the reader (stdout, flushed: headless logs show it at once)."""
        print(message, flush=True)


def start_run(recipe: Recipe, options: RunOptions) -> Run:
    """Check the recipe, the environment and the folders, pick the runtime and find a checkpoint to
    resume, before any real work."""
    try:
        check(recipe)
        with torch.device("meta"):  # the model's arguments and layer, checked without real weights
            find_layer(create_model(recipe.model, **recipe.model_kwargs), recipe.gradcam_layer)
    except (ValueError, TypeError) as err:
        raise SettingsError(str(err)) from None
    if not options.synthetic:
        check_data_dir(options.data_dir, options.download)
    runtime = Runtime.for_device(pick_device(options.device), fast=not options.plain)
    out = options.out_dir(recipe)
    _check_writable(out)
    if options.images_dir:
        _check_writable(Path(options.images_dir))
    state = read_resume_state(out) if options.resume else None
    if state is not None:
        # What can be checked without the data is checked now, before minutes of loading (a fixed
        # One Cycle peak is a recipe value; a range test's is the checkpoint's own).
        check_resumable(state, recipe_signature(recipe) | {"seed": options.seed}, out / "last.pt")
    lock_run_folder(out)
    removed = remove_stale_temporaries(out)  # safe under the lock: no other run writes here
    seed_everything(options.seed)
    run = Run(recipe, options, runtime, out, state)
    if removed:
        run.say(f"removed {len(removed)} temporary file(s) a killed run left in {out}/")
    run.say(f"run: {recipe.name}, {runtime.describe()}, seed {options.seed}, folder {out}/")
    if state is None:
        run.say(f"starting from epoch 0 of {recipe.epochs}")
    elif state["epoch"] >= recipe.epochs:
        run.say(f"run already finished ({state['epoch']} of {recipe.epochs} epochs in {out}/last.pt):"
                " nothing to train; loading its weights for the analysis")
    else:
        run.say(f"resuming from epoch {state['epoch']} of {recipe.epochs} ({out}/last.pt)")
    return run


def run_info(run: Run) -> dict[str, str]:
    """What a reader of the outputs must know: machine, versions, data, recipe, full or shortened, resumed."""
    o, meta = run.options, run_metadata(run.runtime)
    state = run.resume_state
    if state is None:
        trained = "starts from scratch in this execution"
    else:
        earlier = ", ".join(f"from epoch {x['from_epoch']} on {x['runtime']} ({x.get('machine', '?')}, "
                            f"{x['time_utc']})" for x in state.get("sessions", []))
        seconds = sum(r["train_seconds"] + r["test_seconds"] for r in state["history"])
        trained = (f"RESUMED: {state['epoch']} of {run.recipe.epochs} epochs were "
                   f"trained in earlier executions ({earlier}; {seconds / 60:.0f} min of training)")
    return {
        "time (UTC)": meta["time_utc"], "device": f"{meta['device_name']} ({run.runtime.describe()})",
        "cpu": f"{meta['cpu']}, {meta['cpu_count']} cores, {meta['torch_threads']} torch threads",
        "versions": f"python {meta['python']}, torch {meta['torch']}, torchvision {meta['torchvision']}, "
                    f"albumentations {meta['albumentations']}",
        "git commit": str(meta["git_commit"]),
        "data": "synthetic images" if o.synthetic else f"{o.data_dir} (download={o.download}), train "
                f"subset {run.recipe.train_subset or 'all'}, test subset {run.recipe.test_subset or 'all'}",
        "recipe": f"{run.recipe.name}: {run.recipe.model} {run.recipe.model_kwargs}, {run.recipe.epochs} "
                  f"epochs, batch {run.recipe.batch_size}, seed {o.seed}",
        "run": "full assignment run" if is_full_run(run.recipe, o) else
               "NOT THE ASSIGNMENT RUN (" + ", ".join([f"{k}={v}" for k, v in differences(run.recipe).items()]
                                                     + ["synthetic data"] * o.synthetic)
               + "): its numbers are not the results",
        "training": trained,
        "outputs": f"checkpoints and metrics in {run.out}/"
                   + (f", figures in {o.images_dir}/" if o.images_dir else ""),
    }


def _check_writable(out: Path) -> None:
    """The run folder can be written (or created) there, or a one-line error now; nothing is created."""
    if out.exists() and not out.is_dir():
        raise SettingsError(f"output folder {str(out)!r} is a file; pass another folder (--out)")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise SettingsError(f"cannot create output folder {str(out)!r}: {str(existing)!r} is a file")
    try:  # a real write: os.access says yes on a read-only filesystem mounted for root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise SettingsError(f"cannot write into {str(existing)!r} for output folder {str(out)!r}: "
                            f"{err.strerror or err}; pass a writable folder (--out)") from None


# folder -> (open descriptor holding its lock, the folders this process created for it, deepest first)
_LOCKED_FOLDERS: dict[Path, tuple[int, tuple[Path, ...]]] = {}


def lock_run_folder(out: Path) -> None:
    """Hold an exclusive lock on out/.lock until this process ends, or a one-line error if another has it.

    Two runs in one folder would interleave their checkpoints. flock is released by the OS when the
    process dies (no stale locks after a kill), and taking it again in the same process (a notebook
    executed twice in one kernel) is a no-op. Without fcntl (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        return
    key = out.resolve()
    if key in _LOCKED_FOLDERS:
        return
    created = tuple(p for p in (key, *key.parents) if not p.exists())
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SettingsError(f"output folder {str(out)!r} is in use by another run (pid {holder}); "
                            "wait for it to finish, stop it, or pass another folder (--out)") from None
    except OSError as err:  # a filesystem where flock fails (some network and FUSE mounts): run unlocked
        print(f"warning: cannot lock {out}/ ({err.strerror or err}); the run goes on, but nothing "
              "stops a second run from writing into the same folder", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKED_FOLDERS[key] = (fd, created)


def release_unused_run_folder(out: str | os.PathLike) -> bool:
    """Unlock a run folder that holds nothing but its lock, and remove what of it this process made.

    Called when a run fails before writing anything (data missing, download refused), so that a
    failed command leaves no empty folder behind. A folder with any other file is left as it is.
    """
    key = Path(out).resolve()
    if key not in _LOCKED_FOLDERS or not key.is_dir() or [p.name for p in key.iterdir()] != [".lock"]:
        return False
    (key / ".lock").unlink()  # while still locked: no other run can have taken this folder meanwhile
    fd, created = _LOCKED_FOLDERS.pop(key)
    os.close(fd)
    try:
        for folder in created:  # the run folder, then parents such as runs/ made for it
            folder.rmdir()
    except OSError:  # a parent another run or the user has filled since: it stays
        pass
    return True


def load_run_data(run: Run) -> tuple[CifarArrays, DataSummary]:
    """The dataset (or its seeded subsets) and its summary; mean and std come from the train set."""
    o, recipe = run.options, run.recipe
    data = load_data(o.data_dir, o.download, recipe.train_subset, recipe.test_subset, o.seed, o.synthetic,
                     progress=o.progress)
    summary = summarize(data)
    skipped = ", ".join(f"{n} {suffix}" for suffix, n in data.skipped.items())
    run.say(f"data: {data.source}, {len(data.train_labels):,} train / {len(data.test_labels):,} test"
            + (f"; skipped files that are not images: {skipped}" if skipped else ""))
    return data, summary


def build_run_loaders(run: Run, data: CifarArrays, summary: DataSummary) -> tuple[DataLoader, DataLoader]:
    """Train (augmented, seeded shuffle) and test (in order) loaders for the run."""
    o = run.options
    workers = 0 if o.plain and o.workers is None else o.workers
    return build_loaders(data, run.recipe, summary.mean, summary.std, run.runtime.device, o.seed,
                         num_workers=workers, fast=not o.plain)


def build_run_model(run: Run) -> nn.Module:
    """The recipe's model, initialised from the run's seed (the same weights whenever it is built)."""
    seed_everything(run.options.seed)
    model = create_model(run.recipe.model, **run.recipe.model_kwargs)
    run.say(f"model: {run.recipe.model} {run.recipe.model_kwargs}, {count_parameters(model):,} parameters")
    return model


@dataclass
class MaxLR:
    """The One Cycle peak and where it came from: the range test, the checkpoint or the recipe."""

    value: float | None
    # "range test", "saved range test", "checkpoint", "recipe", "recipe (no One Cycle)"
    source: str
    finder: LRRangeResult | None = None

    def __str__(self) -> str:
        return f"max LR {self.value:.3e} (from the {self.source})" if self.value else \
            "no max LR: the recipe's optimizer starts at its own LR (no One Cycle)"


def resolve_max_lr(run: Run, model: nn.Module, train_loader: DataLoader) -> MaxLR:
    """The run's max LR: a resumed run keeps its own; else the recipe's fixed peak; else the LR range
    test, saved in the run folder for an execution stopped before its first epoch."""
    if run.recipe.scheduler != "onecycle":
        return MaxLR(None, "recipe (no One Cycle)")
    state = run.resume_state
    if state is not None:
        finder = state.get("lr_finder")
        result = MaxLR(state["max_lr"], "checkpoint", LRRangeResult(**finder) if finder else None)
        run.say(f"max LR {result.value:.3e} from the checkpoint (no new range test)")
        return result
    if run.recipe.onecycle.max_lr is not None:
        return MaxLR(run.recipe.onecycle.max_lr, "recipe")
    saved_path, signature = run.out / RANGE_TEST_FILE, range_test_signature(run, model, train_loader)
    saved = read_saved_range_test(saved_path, signature) if run.options.resume else None
    if saved is not None:
        run.say(f"max LR {saved.suggested_lr:.3e} from the range test saved in {saved_path} "
                "(no new range test)")
        return MaxLR(saved.suggested_lr, "saved range test", saved)
    finder = lr_range_test(model, train_loader, run.recipe, run.runtime, progress=run.options.progress)
    run.say(f"LR range test: {len(finder.lrs)} steps, minimum at {finder.min_loss_lr:.3e}, "
            f"max LR {finder.suggested_lr:.3e} ({finder.rule})")
    # kept at once: on a CPU the test takes minutes and the first checkpoint comes an epoch later
    saved = {"signature": signature, "finder": finder.as_dict()}
    try:
        atomic_write(saved_path, lambda tmp: torch.save(saved, tmp))
    except (OSError, RuntimeError) as err:  # only a shortcut for a later execution: go on without it
        run.say(f"could not keep the range test in {saved_path} ({err}); a run stopped before its "
                "first epoch will test again")
    return MaxLR(finder.suggested_lr, "range test", finder)


RANGE_TEST_FILE = "lr_range_test.pt"


def range_test_signature(run: Run, model: nn.Module, train_loader: DataLoader) -> dict[str, Any]:
    """What a range test's result depends on: the training recipe, its range-test settings, the
    architecture, and the train data with its augmentations and seed (which also fixes the init)."""
    data = {k: v for k, v in data_signature(train_loader, train_loader).items()
            if not k.startswith("data.test_")}
    return recipe_signature(run.recipe) | model_signature(model) | data


def read_saved_range_test(path: Path, signature: dict[str, Any]) -> LRRangeResult | None:
    """The range test saved in `path` by an earlier execution of the same run, or None (no file,
    an unreadable one, or one written for other settings: the test is then run again)."""
    try:
        saved = torch.load(path, weights_only=True)
        return LRRangeResult(**saved["finder"]) if saved["signature"] == signature else None
    except Exception:  # torch raises several types for a missing, torn or foreign file
        return None


def train_run(run: Run, model: nn.Module, train_loader: DataLoader, test_loader: DataLoader,
              max_lr: MaxLR) -> FitResult:
    """`fit` with the run's checkpoints and resume; one printed line per epoch.

    Afterwards the run continues from its own new checkpoint: a notebook cell executed again
    (the range test, training) reuses it instead of testing LRs on trained weights or training twice.
    """
    finder = max_lr.finder.as_dict() if max_lr.finder else None
    checkpoint = Checkpoint(run.out, run.options.resume, keep={"max_lr": max_lr.value, "lr_finder": finder},
                            session={"git_commit": git_commit()})
    result = fit(model, train_loader, test_loader, run.recipe, run.runtime, max_lr.value, checkpoint,
                 run.options.progress, on_epoch_end=lambda row: run.say(format_epoch(row)))
    if run.options.resume:
        run.resume_state = read_resume_state(run.out)
    return result


def format_epoch(row: dict[str, Any]) -> str:
    """One line per epoch, so a headless log shows progress even without bars."""
    return (f"epoch {row['epoch']:>3}  lr {row['lr']:.2e}  train loss {row['train_loss']:.3f} "
            f"acc {100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.3f} "
            f"acc {100 * row['test_acc']:.2f}%  ({row['train_seconds'] + row['test_seconds']:.1f} s)")


@dataclass
class Analysis:
    """Test predictions, the misclassified selection, and GradCAM on the same images."""

    predictions: Predictions
    indices: np.ndarray  # dataset indices of the misclassified images shown, most confident first
    cams: torch.Tensor  # GradCAM for the predicted class, [n, 32, 32], same order as `indices`
    cams_true: torch.Tensor  # GradCAM for the true class, same images


def analyse(model: nn.Module, test_loader: DataLoader, recipe: Recipe, runtime: Runtime,
            progress: bool = True) -> Analysis:
    """Predict the test set, pick the most confident mistakes, explain them (predicted and true class)."""
    predictions = predict(model, test_loader, runtime, progress)
    indices = select_misclassified(predictions, recipe.num_misclassified)
    explain = {"channels_last": runtime.channels_last}
    # The classes the figures name: GradCAM runs in fp32, whose argmax can differ on a near-tie.
    predicted = torch.as_tensor(predictions.preds[indices])
    cams = explain_items(model, recipe.gradcam_layer, test_loader.dataset, indices, predicted, **explain)
    targets = torch.as_tensor(predictions.labels[indices])
    cams_true = explain_items(model, recipe.gradcam_layer, test_loader.dataset, indices, targets, **explain)
    return Analysis(predictions, indices, cams, cams_true)


# ----------------------------------------------------------------------------- figures and record


def data_figures(data: CifarArrays, summary: DataSummary, train_loader: DataLoader) -> dict[str, Figure]:
    """Samples per class, class distribution and augmentation preview."""
    return {"samples": visualize.plot_samples(data.train_images, data.train_labels, data.classes),
            "class_distribution": visualize.plot_class_distribution(
                summary.train_counts, summary.test_counts, data.classes),
            "augmentations": visualize.plot_augmented(
                data.train_images, train_loader.dataset.transform, summary.mean, summary.std)}


def result_figures(data: CifarArrays, result: FitResult, analysis: Analysis,
                   max_lr: MaxLR, recipe: Recipe) -> dict[str, Figure]:
    """LR range test (when there was one), history, misclassified images and both GradCAM grids."""
    figures = {}
    if max_lr.finder is not None:
        figures["lr_finder"] = visualize.plot_lr_finder(max_lr.finder)
    if result.history:
        figures["history"] = visualize.plot_history(result.history, recipe.label_smoothing)
    if len(analysis.indices):
        p, i = analysis.predictions, analysis.indices
        figures["misclassified"] = visualize.plot_misclassified(data.test_images, i, p, data.classes)
        figures["gradcam"] = visualize.plot_gradcam(data.test_images, analysis.cams, i, p, data.classes)
        figures["gradcam_true"] = visualize.plot_gradcam(data.test_images, analysis.cams_true, i, p,
                                                         data.classes, explained="true")
    return figures


def data_copy(source: str) -> str:
    """Which copy of CIFAR-10 a data source is: 'jpeg-copy', 'image-folder', 'original' or 'synthetic'."""
    kind, _, where = source.partition(":")
    if kind == "image-folder":
        return "jpeg-copy" if next(Path(where).glob("train/*/*.jp*g"), None) else "image-folder"
    return {"torchvision": "original"}.get(kind, "synthetic")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_record(run: Run, data: CifarArrays, result: FitResult, analysis: Analysis,
               max_lr: MaxLR) -> dict[str, Any]:
    """Everything a reader needs to trust the numbers: results, speed, device, versions, settings."""
    history = result.history
    train_images = sum(r["train_images"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    test_images = sum(r["test_images"] for r in history)
    test_seconds = sum(r["test_seconds"] for r in history)
    return _finite({
        "recipe": run.recipe.name,
        "full_run": is_full_run(run.recipe, run.options),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "best_test_acc": result.best_acc if history else None,
        "epochs": len(history),
        "resumed_from_epoch": result.resumed_from_epoch,
        "resumes": max(len(result.sessions) - 1, 0),
        "sessions": result.sessions,
        "max_lr": max_lr.value,
        "max_lr_source": max_lr.source,
        "lr_finder": None if max_lr.finder is None else {
            k: v for k, v in max_lr.finder.as_dict().items() if k not in ("lrs", "losses", "raw_losses")
        } | {"iterations": len(max_lr.finder.lrs)},
        "training_seconds": train_seconds + test_seconds,  # summed over every session
        "train_images_per_second": train_images / train_seconds if train_seconds else None,
        "eval_images_per_second": test_images / test_seconds if test_seconds else None,
        "wall_seconds": time.perf_counter() - run.started,  # this execution only
        "misclassified_indices": [int(i) for i in analysis.indices],
        "predict_acc": analysis.predictions.accuracy,
        "data": {"source": data.source, "copy": data_copy(data.source),
                 "train": int(len(data.train_labels)), "test": int(len(data.test_labels))},
        "runtime": run.runtime.as_dict(),
        "metadata": run_metadata(run.runtime),
        "settings": asdict(run.options),
        "changed": differences(run.recipe),  # the recipe's values that are not the assignment's
        "command": " ".join(["python -m helpers"] + sys.argv[1:]) if "helpers" in sys.argv[0] else None,
        "history": history,
    })


def save_json(path: str | os.PathLike, value: Any) -> None:
    """Write JSON atomically (never NaN: non-finite numbers become null)."""
    text = json.dumps(_finite(value), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def finish_run(run: Run, data: CifarArrays, result: FitResult, analysis: Analysis, max_lr: MaxLR,
               figures: dict[str, Figure]) -> dict[str, Any]:
    """Write metrics.json, then every figure, into the run folder (and images_dir); return the record."""
    record = run_record(run, data, result, analysis, max_lr)
    save_json(run.out / "metrics.json", record)
    for name, fig in figures.items():
        visualize.save_figure(fig, run.out / f"{name}.png")
        if run.options.images_dir:
            visualize.save_figure(fig, Path(run.options.images_dir) / f"{run.recipe.name}_{name}.png")
    if record["final_test_acc"] is not None:
        run.say(f"final test accuracy {100 * record['final_test_acc']:.2f}% (best "
                f"{100 * record['best_test_acc']:.2f}%); wrote {run.out}/metrics.json and "
                f"{len(figures)} figures")
    return record


def run_recipe(recipe: Recipe, options: RunOptions) -> dict[str, Any]:
    """The whole run headless: every step above, then metrics.json and the figures in the run folder."""
    run = start_run(recipe, options)
    data, summary = load_run_data(run)
    train_loader, test_loader = build_run_loaders(run, data, summary)
    model = build_run_model(run)
    figures = data_figures(data, summary, train_loader)
    max_lr = resolve_max_lr(run, model, train_loader)
    result = train_run(run, model, train_loader, test_loader, max_lr)
    analysis = analyse(model, test_loader, run.recipe, run.runtime, options.progress)
    figures |= result_figures(data, result, analysis, max_lr, run.recipe)
    return finish_run(run, data, result, analysis, max_lr, figures)


__all__ = [
    "Analysis", "CheckpointError", "MaxLR", "Run", "RunOptions", "SettingsError", "analyse",
    "build_run_loaders", "build_run_model", "run_info", "data_copy", "data_figures", "finish_run",
    "format_epoch", "load_run_data", "lock_run_folder", "release_unused_run_folder", "resolve_max_lr",
    "is_full_run", "result_figures", "run_record", "run_recipe", "save_json", "start_run",
    "train_run",
]
