"""The plumbing around the lesson: run options, checks before any work, the run's record.

The notebooks build the model, loaders, range test, `fit` and GradCAM in their own cells and call
this module only for what is not the lesson. `run_recipe` is the same cells as one function, for
the command line (`python -m helpers train`) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
from matplotlib.figure import Figure

from . import visualize
from .analysis import Predictions, predict, select_misclassified
from .dataset import CifarArrays, build_loaders, channel_mean_std, check_data_dir, load_data
from .download import CACHE_ENV
from .gradcam import GradCAM, find_layer
from .lr_finder import LRRangeResult, lr_range_test
from .models import create_model
from .recipes import OverrideError, Recipe, check, differences, parse_value, variant
from .runtime import Runtime, atomic_write, pick_device, run_metadata, seed_everything
from .train import Checkpoint, FitResult, check_resumable, fit, read_resume_state, recipe_signature


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
    out: str | None = None  # the run folder; "{recipe}" becomes `variant_folder`; default runs/{recipe}
    images_dir: str | None = None  # also save the figures there, as <variant folder>_<figure>.png
    seed: int = 0
    device: str | None = None  # cuda, mps or cpu; None: the best this machine has
    workers: int | None = None  # loader worker processes; None: chosen for the device
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
        """The run folder: checkpoints, metrics.json and figures; each variant has its own."""
        return Path((self.out or "runs/{recipe}").format(recipe=variant_folder(recipe, self.seed)))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **defaults: Any) -> RunOptions:
        """Options for a notebook: `defaults`, overridden by CIFAR_<NAME> variables (CIFAR_DATA_DIR, ...)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(defaults)
        known = {f"CIFAR_{f.name.upper()}" for f in fields(cls)} | {"CIFAR_OVERRIDES", CACHE_ENV}
        for name in sorted(set(env) - known):
            if name.startswith("CIFAR_"):  # e.g. CIFAR_EPOCHS: recipe values go in CIFAR_OVERRIDES
                raise SettingsError(f"{name} is not a run option; recipe values go in CIFAR_OVERRIDES "
                                    f"(\"epochs=2 augment.cutout_p=0.5\"), options are "
                                    f"{', '.join(sorted(known))}")
        hints = get_type_hints(cls)
        for f in fields(cls):
            if raw := env.get(f"CIFAR_{f.name.upper()}", "").strip():
                try:
                    values[f.name] = parse_value(raw, hints[f.name], f"CIFAR_{f.name.upper()}")
                except OverrideError as err:
                    raise SettingsError(str(err)) from None
        return cls(**values)


def variant_folder(recipe: Recipe, seed: int = 0) -> str:
    """The folder name of a run: the recipe's name for the assignment's run, else with what differs
    ("s8-norm=bn", "s10-seed=1"), or a short hash of it where that is long or no plain folder name."""
    changed = variant(recipe.name, differences(recipe), seed)
    name = "-".join([recipe.name, *(f"{key}={value}" for key, value in changed.items())])
    if len(name) > 50 or not re.fullmatch(r"[\w.,=+-]+", name, re.ASCII):
        name = f"{recipe.name}-{hashlib.blake2b(repr(changed).encode(), digest_size=4).hexdigest()}"
    return name


def variant_folders(run: Run) -> list[Path]:
    """The finished run folders of the run's recipe beside its own (the assignment's and its variants)."""
    name = run.recipe.name
    return sorted(path.parent for path in run.out.parent.glob(f"{name}*/metrics.json")
                  if path.parent.name == name or path.parent.name.startswith(f"{name}-"))


def is_full_run(recipe: Recipe, options: RunOptions) -> bool:
    """The assignment's run: its recipe exactly, on real data (a resumed run's checkpoint matched it)."""
    return not options.synthetic and not differences(recipe)


@dataclass
class Run:
    """A started run: its recipe, options, runtime, folder and the checkpoint it resumes (if any)."""

    recipe: Recipe
    options: RunOptions
    runtime: Runtime
    out: Path
    resume_state: dict[str, Any] | None
    started: float = field(default_factory=time.perf_counter)


def start_run(recipe: Recipe, options: RunOptions) -> Run:
    """Check the recipe, the data and run folders and the device, and find a checkpoint to resume,
    before any real work; nothing is created yet."""
    try:
        check(recipe)
        with torch.device("meta"):  # the model's arguments and layer, checked without real weights
            find_layer(create_model(recipe.model, **recipe.model_kwargs), recipe.gradcam_layer)
    except (ValueError, TypeError) as err:
        raise SettingsError(str(err)) from None
    if not options.synthetic:
        check_data_dir(options.data_dir, options.download)
    runtime = Runtime.for_device(pick_device(options.device))
    out = options.out_dir(recipe)
    for folder in (out, Path(options.images_dir)) if options.images_dir else (out,):
        _check_writable(folder)
    state = read_resume_state(out) if options.resume else None
    if state is not None:  # what can be checked before minutes of loading data is checked now
        check_resumable(state, recipe_signature(recipe) | {"seed": options.seed}, out / "last.pt")
    print(f"run: {recipe.name}, {runtime.describe()}, seed {options.seed}, folder {out}/")
    if state is None:
        print(f"starting from epoch 0 of {recipe.epochs}")
    elif state["epoch"] >= recipe.epochs:
        print(f"the run in {out}/last.pt is finished ({state['epoch']} epochs): nothing to train")
    else:
        print(f"resuming after epoch {state['epoch']} of {recipe.epochs} ({out}/last.pt)")
    return Run(recipe, options, runtime, out, state)


def _check_writable(out: Path) -> None:
    """The folder can be written (or created) there, or a one-line error now; nothing is created."""
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise SettingsError(f"cannot use folder {str(out)!r}: {str(existing)!r} is a file; pass another")
    try:  # a real write: os.access says yes on a read-only filesystem mounted for root
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise SettingsError(f"cannot write into {str(existing)!r} for folder {str(out)!r}: "
                            f"{err.strerror or err}; pass a writable folder") from None


def run_info(run: Run) -> dict[str, str]:
    """What a reader of the outputs must know: machine, versions, data, recipe, full or not, resumed."""
    o, meta, state = run.options, run_metadata(run.runtime), run.resume_state
    trained = "starts from scratch in this execution"
    if state is not None:
        earlier = ", ".join(f"from epoch {s['from_epoch']} on {s['runtime']} ({s.get('machine', '?')}, "
                            f"{s['time_utc']})" for s in state.get("sessions", []))
        minutes = sum(r["train_seconds"] + r["test_seconds"] for r in state["history"]) / 60
        trained = (f"RESUMED: {state['epoch']} of {run.recipe.epochs} epochs were trained in earlier "
                   f"executions ({earlier}; {minutes:.0f} min of training)")
    changed = [f"{k}={v}" for k, v in differences(run.recipe).items()] + ["synthetic data"] * o.synthetic
    return {
        "time (UTC)": meta["time_utc"], "device": f"{meta['device_name']} ({run.runtime.describe()})",
        "cpu": f"{meta['cpu']}, {meta['cpu_count']} cores, {meta['torch_threads']} torch threads",
        "versions": f"python {meta['python']}, torch {meta['torch']}, torchvision {meta['torchvision']}, "
                    f"albumentations {meta['albumentations']}",
        "git commit": str(meta["git_commit"]),
        "data": "synthetic images" if o.synthetic else f"{o.data_dir} (download={o.download})",
        "run": "full assignment run" if not changed else
               f"NOT THE ASSIGNMENT RUN ({', '.join(changed)}): its numbers are not the results",
        "training": trained,
    }


def load_run_data(run: Run) -> CifarArrays:
    """The dataset of the run's options (or its seeded subsets, or synthetic images)."""
    o, recipe = run.options, run.recipe
    data = load_data(o.data_dir, o.download, recipe.train_subset, recipe.test_subset, o.seed, o.synthetic,
                     progress=o.progress)
    print(f"data: {data.source}, {len(data.train_labels):,} train / {len(data.test_labels):,} test images")
    return data


def saved_range_test(run: Run) -> LRRangeResult | None:
    """The range test in the run's checkpoint: a resumed run keeps the max LR it started with (a test
    on its trained weights would suggest another). None when there is no checkpoint to resume."""
    state = read_resume_state(run.out) if run.options.resume else None
    finder = state.get("lr_finder") if state else None
    return LRRangeResult(**finder) if finder else None


# ----------------------------------------------------------------------------- the record


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


def save_json(path: str | os.PathLike, value: Any) -> None:
    """Write JSON atomically (never NaN: non-finite numbers become null)."""
    text = json.dumps(_finite(value), indent=2, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run_record(run: Run, data: CifarArrays, result: FitResult, predictions: Predictions,
               mistakes: np.ndarray, max_lr: float | None, finder: LRRangeResult | None,
               flip_tta_acc: float | None = None) -> dict[str, Any]:
    """Everything a reader needs to trust the numbers: results, speed, device, versions, settings."""
    history = result.history
    train_seconds, test_seconds = (sum(r[f"{k}_seconds"] for r in history) for k in ("train", "test"))
    return _finite({
        "recipe": run.recipe.name,
        "full_run": is_full_run(run.recipe, run.options),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "best_test_acc": result.best_acc if history else None,
        "epochs": len(history),
        "resumed_from_epoch": result.resumed_from_epoch,
        "resumes": max(len(result.sessions) - 1, 0),
        "sessions": result.sessions,
        "max_lr": max_lr,
        "lr_finder": None if finder is None else {
            k: v for k, v in finder.as_dict().items() if k not in ("lrs", "losses", "raw_losses")
        } | {"iterations": len(finder.lrs)},
        "training_seconds": train_seconds + test_seconds,  # summed over every session
        "train_images_per_second": sum(r["train_images"] for r in history) / train_seconds if history
        else None,
        "eval_images_per_second": sum(r["test_images"] for r in history) / test_seconds if history else None,
        "wall_seconds": time.perf_counter() - run.started,  # this execution only
        "misclassified_indices": [int(i) for i in mistakes],
        "predict_acc": predictions.accuracy,
        "flip_tta_acc": flip_tta_acc,  # beside the plain accuracy, never instead of it
        "data": {"source": data.source, "copy": data_copy(data.source),
                 "train": int(len(data.train_labels)), "test": int(len(data.test_labels))},
        "runtime": run.runtime.as_dict(),
        "metadata": run_metadata(run.runtime),
        "settings": asdict(run.options),
        "changed": differences(run.recipe),  # the recipe's values that are not the assignment's
        "command": " ".join(["python -m helpers"] + sys.argv[1:]) if "helpers" in sys.argv[0] else None,
        "history": history,
    })


def finish_run(run: Run, record: dict[str, Any], figures: dict[str, Figure]) -> None:
    """Write metrics.json, then every figure, into the run folder (and images_dir, named after the
    run's variant: s8_history.png for the assignment, s8-norm=bn_history.png for a variant)."""
    save_json(run.out / "metrics.json", record)
    for name, fig in figures.items():
        visualize.save_figure(fig, run.out / f"{name}.png")
        if run.options.images_dir:
            variant = variant_folder(run.recipe, run.options.seed)  # never over the assignment's figures
            visualize.save_figure(fig, Path(run.options.images_dir) / f"{variant}_{name}.png")
    if record["final_test_acc"] is not None:
        print(f"final test accuracy {100 * record['final_test_acc']:.2f}% (best "
              f"{100 * record['best_test_acc']:.2f}%); wrote {run.out}/metrics.json and the figures")


def run_recipe(recipe: Recipe, options: RunOptions) -> dict[str, Any]:
    """The notebooks' cells as one function: train, analyse, write metrics.json and the figures."""
    run = start_run(recipe, options)
    data = load_run_data(run)
    mean, std = channel_mean_std(data.train_images)
    train_loader, test_loader = build_loaders(data, recipe, mean, std, run.runtime.device, options.seed,
                                              num_workers=options.workers)
    seed_everything(options.seed)
    model = create_model(recipe.model, **recipe.model_kwargs)
    finder, max_lr = None, recipe.onecycle.max_lr if recipe.scheduler == "onecycle" else None
    if recipe.scheduler == "onecycle" and max_lr is None:
        finder = saved_range_test(run) or lr_range_test(model, train_loader, recipe, run.runtime,
                                                        progress=options.progress)
        max_lr = finder.suggested_lr
        print(finder.summary())
    checkpoint = Checkpoint(run.out, options.resume, keep={"lr_finder": finder and finder.as_dict()})
    result = fit(model, train_loader, test_loader, recipe, run.runtime, max_lr, checkpoint, options.progress)
    predictions = predict(model, test_loader, run.runtime, options.progress)
    flipped = predict(model, test_loader, run.runtime, options.progress, flip=True)
    print(f"test accuracy {100 * predictions.accuracy:.2f}%, with flip TTA {100 * flipped.accuracy:.2f}%")
    mistakes = select_misclassified(predictions, recipe.num_misclassified)
    figures = {"augmentations": visualize.plot_augmented(data.train_images, train_loader.dataset.transform,
                                                         mean, std)}
    if finder is not None:
        figures["lr_finder"] = visualize.plot_lr_finder(finder)
    if result.history:
        figures["history"] = visualize.plot_history(result.history, recipe.label_smoothing)
    if len(mistakes):
        images = torch.stack([test_loader.dataset[i][0] for i in mistakes]).to(run.runtime.device)
        with GradCAM(model, find_layer(model, recipe.gradcam_layer)) as cam:
            maps = {"predicted": cam(images, predictions.preds[mistakes]),
                    "true": cam(images, predictions.labels[mistakes])}
        figures["misclassified"] = visualize.plot_misclassified(data.test_images, mistakes, predictions,
                                                                data.classes)
        for explained, name in (("predicted", "gradcam"), ("true", "gradcam_true")):
            figures[name] = visualize.plot_gradcam(data.test_images, maps[explained], mistakes, predictions,
                                                   data.classes, explained=explained)
    record = run_record(run, data, result, predictions, mistakes, max_lr, finder, flipped.accuracy)
    finish_run(run, record, figures)
    return record

