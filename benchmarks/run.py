"""Benchmark a recipe over seeds, fast vs plain, and where its time goes.

    python -m benchmarks.run --recipe s10 [--recipe s8] --data-dir DIR --seeds 0 1 2

Writes results.json (every run, with metadata) and results.md (regenerated from the whole JSON,
so recipes benchmarked in separate calls keep their own sections) to --out (default benchmarks/).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helpers.dataset import CifarArrays, DataError, DataSummary, build_loaders, load_data, summarize
from helpers.models import create_model
from helpers.recipes import RECIPES, Recipe, get_recipe
from helpers.train import Runtime, atomic_write, find_max_lr, fit, pick_device, run_metadata, seed_everything

from . import report, throughput

DEFAULT_OUT = Path(__file__).resolve().parent
SCHEMA = 1


class ResultsError(ValueError):
    """An existing results.json that cannot be merged into."""


@dataclass(frozen=True)
class Variant:
    """How a run uses the hardware and the loader."""

    name: str
    fast: bool  # Runtime.for_device(fast=...) and build_loaders(fast=...)
    workers: int | None  # None: helpers' default for the device


VARIANTS: dict[str, Variant] = {
    "fast": Variant("fast", True, None),
    "plain": Variant("plain", False, 0),  # fp32, NCHW, DataLoader defaults: the seed repos' way
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", dest="recipes", action="append", required=True,
                   choices=sorted(RECIPES), help="repeat for several recipes")
    p.add_argument("--data-dir", help="ImageFolder copy or torchvision folder")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    p.add_argument("--synthetic", action="store_true", help="synthetic images (smoke runs only)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--plain-epochs", type=int,
                   help="epochs for the plain variant only (it is several times slower; the "
                        "speed-up compares time per epoch, so a few epochs measure it)")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--train-subset", type=int, help="seeded subset of N train images")
    p.add_argument("--test-subset", type=int, help="seeded subset of N test images")
    p.add_argument("--max-lr", type=float, help="One Cycle max LR; skips the LR range test")
    p.add_argument("--lr-finder-iters", type=int, help="iterations of the LR range test")
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--throughput-only", action="store_true", help="skip the training runs")
    p.add_argument("--throughput-batches", type=int, default=10, help="timed batches per rate")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches before them")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for results.{json,md}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = _validated(p, p.parse_args(argv))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the results
    return args


def _validated(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Reject bad values with argparse's usage error; drop repeats; note ignored options."""
    for name in ("epochs", "plain_epochs", "batch_size", "train_subset", "test_subset", "lr_finder_iters",
                 "throughput_batches"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.max_lr is not None and args.max_lr <= 0:
        p.error(f"--max-lr must be positive, got {args.max_lr}")
    if args.warmup_batches < 0:
        p.error(f"--warmup-batches must be >= 0, got {args.warmup_batches}")
    if args.data_dir is None and not args.synthetic:
        p.error("--data-dir is required (or --synthetic for a smoke run)")
    # Order kept, repeats dropped: `--recipe s10 --recipe s10` is one benchmark, not two.
    args.recipes, args.seeds = list(dict.fromkeys(args.recipes)), list(dict.fromkeys(args.seeds))
    args.variants = list(dict.fromkeys(args.variants))
    for name in args.recipes:
        if args.max_lr is not None and get_recipe(name).scheduler != "onecycle":
            print(f"note: --max-lr does not apply to {name} ({get_recipe(name).scheduler} "
                  "schedule); it trains from its recipe LR", file=sys.stderr)
    return args


def data_copy(data: CifarArrays) -> tuple[str, str]:
    """Which copy of CIFAR-10 this is: a short key and a label for the report."""
    kind, _, where = data.source.partition(":")
    if kind == "image-folder":
        jpeg = next(Path(where).glob("train/*/*.jp*g"), None) is not None
        return ("jpeg-copy", "JPEG ImageFolder copy (lossy, not the original pixels)") if jpeg \
            else ("image-folder", "ImageFolder copy (not JPEG)")
    if kind == "torchvision":
        return "original", "original CIFAR-10 (torchvision's arrays)"
    return "synthetic", "synthetic images (smoke run; accuracies mean nothing)"


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux), since CPU-side numbers depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def provenance(args: argparse.Namespace, recipe: Recipe, data: CifarArrays,
               device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to know about where and how a section was measured."""
    copy, label = data_copy(data)
    meta = run_metadata(device) | {"torch_threads": torch.get_num_threads(),
                                   "cpu_model": cpu_model()}
    return {
        "metadata": meta,
        "data": {"source": data.source, "copy": copy, "copy_label": label,
                 "train": int(len(data.train_labels)), "test": int(len(data.test_labels)),
                 "train_subset": args.train_subset, "test_subset": args.test_subset},
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "seeds": args.seeds,
        "throughput_only": args.throughput_only,
        "command": "python -m benchmarks.run " + shlex.join(args.argv),
    }


def make_loaders(variant: Variant, data: CifarArrays, stats: DataSummary, recipe: Recipe,
                 device: torch.device, seed: int):
    """The variant's train and test loaders."""
    return build_loaders(data, recipe, stats.mean, stats.std, device, seed,
                         num_workers=variant.workers, fast=variant.fast)


def loader_settings(loader) -> dict[str, Any]:
    """The DataLoader options that decide its speed, as they were resolved."""
    return {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
            "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": loader.persistent_workers}


def runtime_settings(runtime: Runtime) -> dict[str, Any]:
    """The Runtime as plain JSON."""
    return {"amp_dtype": str(runtime.amp_dtype), "channels_last": runtime.channels_last,
            "compile": runtime.compile}


def release(device: torch.device) -> None:
    """Free the last run's model, loaders and workers before the next one starts."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resolve_max_lr(args: argparse.Namespace, recipe: Recipe, data: CifarArrays,
                   stats: DataSummary, device: torch.device) -> tuple[float | None, dict[str, Any]]:
    """One max LR for every seed and variant: --max-lr, else one range test (seed 0, fast)."""
    if recipe.scheduler != "onecycle":
        return None, {"note": f"not used: {recipe.scheduler} schedule starts at LR {recipe.lr:g}"}
    if args.max_lr is not None:
        return args.max_lr, {"note": f"{args.max_lr:g} (given with --max-lr)"}
    seed_everything(0)
    runtime = Runtime.for_device(device)
    train_loader, _ = make_loaders(VARIANTS["fast"], data, stats, recipe, device, 0)
    model = create_model(recipe.model, **recipe.model_kwargs)
    start = time.perf_counter()
    found = find_max_lr(model, train_loader, recipe, device, runtime, args.lr_finder_iters,
                        not args.no_progress)
    seconds = time.perf_counter() - start
    del model, train_loader
    release(device)
    print(f"{recipe.name}: LR range test {len(found.lrs)} iterations in {seconds:.1f} s, "
          f"max LR {found.suggested_lr:.3g}", flush=True)
    return found.suggested_lr, {
        "note": f"{found.suggested_lr:.3g} from one LR range test (seed 0, fast variant, "
                f"{len(found.lrs)} iterations, {seconds:.1f} s, not in the fit times)",
        "suggested_lr": found.suggested_lr, "min_loss_lr": found.min_loss_lr,
        "iterations": len(found.lrs), "seconds": seconds}


def one_run(variant: Variant, seed: int, recipe: Recipe, data: CifarArrays, stats: DataSummary,
            device: torch.device, max_lr: float | None, progress: bool) -> dict[str, Any]:
    """Train one seed of one variant from scratch; fit() is the timed part."""
    seed_everything(seed)
    runtime = Runtime.for_device(device, fast=variant.fast)
    train_loader, test_loader = make_loaders(variant, data, stats, recipe, device, seed)
    model = create_model(recipe.model, **recipe.model_kwargs)
    result = fit(model, train_loader, test_loader, recipe, device, runtime, max_lr,
                 checkpoint_dir=None, progress=progress)
    history = result.history
    train_seconds = sum(r["train_seconds"] for r in history)
    test_seconds = sum(r["test_seconds"] for r in history)
    run = {"variant": variant.name, "seed": seed, "epochs": len(history),
           "final_test_acc": history[-1]["test_acc"],
           "best_test_acc": result.best_acc, "wall_seconds": result.wall_seconds,
           "train_images_per_second": sum(r["train_images"] for r in history) / train_seconds,
           "eval_images_per_second": sum(r["test_images"] for r in history) / test_seconds,
           "max_lr": max_lr, "runtime": runtime_settings(runtime),
           "loader": loader_settings(train_loader), "history": history}
    del model, train_loader, test_loader, result
    release(device)
    return run


def _spread(values: list[float]) -> float | None:
    """Sample standard deviation; None for a single value."""
    return statistics.stdev(values) if len(values) > 1 else None


def summarize_runs(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: seeds, mean and spread of accuracy and wall time, mean rates."""
    summary = {}
    for name in variants:
        rows = [r for r in runs if r["variant"] == name]
        accs, walls = [r["final_test_acc"] for r in rows], [r["wall_seconds"] for r in rows]
        summary[name] = {
            "seeds": [r["seed"] for r in rows], "n": len(rows),
            "acc_mean": statistics.fmean(accs), "acc_std": _spread(accs), "acc_min": min(accs),
            "wall_mean": statistics.fmean(walls), "wall_std": _spread(walls),
            "wall_max": max(walls), "epochs": rows[0]["epochs"],
            "epoch_seconds_mean": statistics.fmean(r["wall_seconds"] / r["epochs"] for r in rows),
            "train_ips_mean": statistics.fmean(r["train_images_per_second"] for r in rows),
            "eval_ips_mean": statistics.fmean(r["eval_images_per_second"] for r in rows)}
    return summary


def training_section(args: argparse.Namespace, recipe: Recipe, data: CifarArrays,
                     stats: DataSummary, device: torch.device,
                     where: dict[str, Any]) -> dict[str, Any]:
    """Every seed of every variant, their summary, the speed-up and the target verdict."""
    max_lr, lr_info = resolve_max_lr(args, recipe, data, stats, device)
    runs = []
    for variant in (VARIANTS[name] for name in args.variants):
        shortened = variant.name == "plain" and args.plain_epochs
        variant_recipe = recipe.with_overrides(epochs=args.plain_epochs) if shortened else recipe
        for seed in args.seeds:
            run = one_run(variant, seed, variant_recipe, data, stats, device, max_lr,
                          not args.no_progress)
            runs.append(run)
            print(f"{recipe.name} {variant.name:<5} seed {seed}: final test acc "
                  f"{100 * run['final_test_acc']:.2f}%, fit {run['wall_seconds']:.1f} s, train "
                  f"{run['train_images_per_second']:,.0f} img/s, eval "
                  f"{run['eval_images_per_second']:,.0f} img/s", flush=True)
    summary = summarize_runs(runs, args.variants)
    # Per epoch, so that a plain variant run for fewer epochs (--plain-epochs) still compares.
    speedup = (summary["plain"]["epoch_seconds_mean"] / summary["fast"]["epoch_seconds_mean"]
               if {"fast", "plain"} <= summary.keys() else None)
    section = {"provenance": where, "max_lr": max_lr,
               "max_lr_note": lr_info.pop("note"), "lr_finder": lr_info or None,
               "summary": summary, "speedup": speedup, "runs": runs}
    section["verdict"] = report.target_verdict(recipe.name, section)
    return section


def throughput_section(args: argparse.Namespace, recipe: Recipe, data: CifarArrays,
                       stats: DataSummary, device: torch.device,
                       where: dict[str, Any]) -> dict[str, Any]:
    """Per variant: model-bound and loader-bound images/s, and which one limits."""
    rows: dict[str, dict[str, Any]] = {}
    measured: dict[Runtime, dict[str, float]] = {}  # on CPU both variants run the same fp32 model
    for variant in (VARIANTS[name] for name in args.variants):
        runtime = Runtime.for_device(device, fast=variant.fast)
        if runtime not in measured:
            measured[runtime] = throughput.model_throughput(
                recipe, runtime, device, args.throughput_batches, args.warmup_batches)
        model = measured[runtime]
        train_loader, _ = make_loaders(variant, data, stats, recipe, device, 0)
        loader = throughput.loader_throughput(train_loader, args.throughput_batches)
        slower = loader["images_per_second"] < model["train_images_per_second"]
        limit = "loader" if slower else "model"
        rows[variant.name] = {
            "model": model, "loader_images_per_second": loader["images_per_second"],
            "loader_timing": loader, "loader": loader_settings(train_loader),
            "runtime": runtime_settings(runtime), "limit": limit}
        del train_loader
        release(device)
        print(f"{recipe.name} {variant.name:<5} throughput: model train "
              f"{model['train_images_per_second']:,.0f} img/s, eval "
              f"{model['eval_images_per_second']:,.0f} img/s; loader "
              f"{loader['images_per_second']:,.0f} img/s -> {limit}-bound", flush=True)
    return {"provenance": where, "batches": args.throughput_batches,
            "warmup": args.warmup_batches, "batch_size": recipe.batch_size, "variants": rows}


def load_results(path: Path) -> dict[str, Any]:
    """The results so far (other recipes' sections are kept); a fresh dict when there are none."""
    if not path.exists():
        return {"schema": SCHEMA, "recipes": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResultsError(f"{str(path)!r} is not valid JSON ({err}); move it away") from err
    if results.get("schema") != SCHEMA or not isinstance(results.get("recipes"), dict):
        raise ResultsError(f"{str(path)!r} is not a results file of this version; move it away")
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json, then results.md rendered from it; each written atomically."""
    text = json.dumps(results, indent=2)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    markdown = report.render(results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the data once, benchmark every recipe, merge into the results and write them."""
    device = pick_device(args.device)
    results = load_results(args.out / "results.json")  # fail early, not after hours of training
    start = time.perf_counter()
    data = load_data(args.data_dir, args.download, args.train_subset, args.test_subset, 0,
                     args.synthetic)
    stats = summarize(data)
    print(f"data: {data.source}, {len(data.train_labels):,} train / {len(data.test_labels):,} "
          f"test, loaded in {time.perf_counter() - start:.1f} s; device {device}", flush=True)
    for name in args.recipes:
        recipe = get_recipe(name).with_overrides(epochs=args.epochs, batch_size=args.batch_size)
        # One provenance per call: the report prints it once when both parts share it.
        where = provenance(args, recipe, data, device)
        section = results["recipes"].setdefault(name, {})
        if not args.throughput_only:
            section["training"] = training_section(args, recipe, data, stats, device, where)
        section["throughput"] = throughput_section(args, recipe, data, stats, device, where)
        write_results(args.out, results)  # after each recipe, so a crash keeps the finished ones
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point; data and results-file problems exit with one line instead of a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, ResultsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
