"""Headless runs: `python -m helpers train --recipe s10 --data-dir DIR [...]`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import dataset, gradcam, train, visualize
from .models import count_parameters, create_model
from .recipes import RECIPES, get_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one `train` command with the recipe and its overrides."""
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe end to end and write metrics and figures")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--data-dir", default="data", help="ImageFolder copy or torchvision folder")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10")
    p.add_argument("--synthetic", action="store_true", help="synthetic images (smoke runs)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--max-lr", type=float, help="One Cycle max LR; skips the LR range test")
    p.add_argument("--lr-finder-iters", type=int, help="iterations of the LR range test")
    p.add_argument("--train-subset", type=int, help="train on a seeded subset of N images")
    p.add_argument("--test-subset", type=int, help="evaluate on a seeded subset of N images")
    p.add_argument("--out", default=None, help="output folder (default runs/<recipe>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: auto)")
    p.add_argument("--plain", action="store_true",
                   help="fp32, NCHW, default loader settings (the seed repos' way), for comparison")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "train_subset", "test_subset", "lr_finder_iters"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.max_lr is not None and get_recipe(args.recipe).scheduler != "onecycle":
        parser.error(f"--max-lr applies to One Cycle recipes only; {args.recipe} uses its own LR")
    return args


def run(args: argparse.Namespace) -> dict:
    """Data -> model -> (LR range test) -> fit -> predictions -> misclassified + GradCAM -> files."""
    started = time.perf_counter()
    recipe = get_recipe(args.recipe).with_overrides(epochs=args.epochs, batch_size=args.batch_size)
    out = Path(args.out or f"runs/{recipe.name}")
    device = train.pick_device(args.device)
    train.seed_everything(args.seed)
    runtime = train.Runtime.for_device(device, fast=not args.plain, compile=args.compile)
    show = not args.no_progress

    data = dataset.load_data(args.data_dir, args.download, args.train_subset, args.test_subset,
                             args.seed, args.synthetic)
    summary = dataset.summarize(data)
    print(f"data: {data.source}, {len(data.train_labels)} train / {len(data.test_labels)} test, "
          f"mean {np.round(summary.mean, 4)}, std {np.round(summary.std, 4)}")
    workers = 0 if args.plain and args.workers is None else args.workers
    train_loader, test_loader = dataset.build_loaders(
        data, recipe, summary.mean, summary.std, device, args.seed, num_workers=workers,
        fast=not args.plain)
    model = create_model(recipe.model, **recipe.model_kwargs)
    print(f"model: {recipe.model} {recipe.model_kwargs}, {count_parameters(model):,} parameters; "
          f"device {device}, {runtime}")

    figures = {"samples": visualize.plot_samples(data.train_images, data.train_labels, data.classes),
               "class_distribution": visualize.plot_class_distribution(
                   summary.train_counts, summary.test_counts, data.classes),
               "augmentations": visualize.plot_augmented(
                   data.train_images, train_loader.dataset.transform, summary.mean, summary.std)}
    max_lr, finder = args.max_lr, None
    if recipe.scheduler == "onecycle" and max_lr is None and not args.no_resume:
        max_lr = train.checkpoint_max_lr(out)
        if max_lr is not None:
            print(f"resuming {out}: max LR {max_lr:.3g} from the checkpoint, no LR range test")
    if recipe.scheduler == "onecycle" and max_lr is None:
        finder = train.find_max_lr(model, train_loader, recipe, device, runtime,
                                   args.lr_finder_iters, show)
        max_lr = finder.suggested_lr
        figures["lr_finder"] = visualize.plot_lr_finder(finder)
        print(f"LR range test: minimum at {finder.min_loss_lr:.3g}, max LR {max_lr:.3g}")

    result = train.fit(model, train_loader, test_loader, recipe, device, runtime, max_lr,
                       checkpoint_dir=out, resume=not args.no_resume, progress=show,
                       on_epoch_end=_print_epoch)
    figures["history"] = visualize.plot_history(result.history)
    analysis = analyse(model, test_loader, data, recipe, device, runtime, show)
    figures.update(analysis.pop("figures"))
    for name, fig in figures.items():
        visualize.save_figure(fig, out / f"{name}.png")

    metrics = build_metrics(args, recipe, data, result, finder, analysis, device, runtime, started)
    train.atomic_write(out / "metrics.json",
                       lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    print(f"final test accuracy {100 * metrics['final_test_acc']:.2f}% (best "
          f"{100 * metrics['best_test_acc']:.2f}%), {metrics['wall_seconds']:.0f} s; wrote {out}/")
    return metrics


def _print_epoch(row: dict) -> None:
    """One line per epoch, so a headless log shows progress even without bars."""
    print(f"epoch {row['epoch']:>3}  lr {row['lr']:.2e}  train loss {row['train_loss']:.3f} "
          f"acc {100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.3f} "
          f"acc {100 * row['test_acc']:.2f}%  ({row['train_seconds'] + row['test_seconds']:.1f} s)",
          flush=True)


def analyse(model, test_loader, data, recipe, device, runtime, progress: bool) -> dict:
    """Predictions, the misclassified selection and GradCAM (predicted class) on the same images."""
    predictions = train.predict(model, test_loader, device, runtime, progress)
    indices = train.select_misclassified(predictions, recipe.num_misclassified)
    cams = gradcam.explain_items(model, recipe.gradcam_layer, test_loader.dataset, indices,
                                 channels_last=runtime.channels_last)
    figures = {}
    if len(indices):
        figures["misclassified"] = visualize.plot_misclassified(
            data.test_images, indices, predictions, data.classes)
        figures["gradcam"] = visualize.plot_gradcam(
            data.test_images, cams, indices, predictions, data.classes)
    return {"predict_acc": predictions.accuracy, "misclassified": [int(i) for i in indices],
            "figures": figures}


def build_metrics(args, recipe, data, result, finder, analysis, device, runtime, started) -> dict:
    """Everything a reader needs to trust the numbers: results, speed, device, versions, args."""
    history = result.history
    train_images = sum(r["train_images"] for r in history)
    train_seconds = sum(r["train_seconds"] for r in history)
    test_images = sum(r["test_images"] for r in history)
    test_seconds = sum(r["test_seconds"] for r in history)
    return {
        "recipe": recipe.name,
        "final_test_acc": history[-1]["test_acc"],
        "best_test_acc": result.best_acc,
        "epochs": len(history),
        "resumed_from_epoch": result.resumed_from_epoch,
        "max_lr": result.max_lr,
        "lr_finder": None if finder is None else {
            "suggested_lr": finder.suggested_lr, "min_loss_lr": finder.min_loss_lr,
            "steepest_lr": finder.steepest_lr, "rule": finder.rule, "iterations": len(finder.lrs)},
        "wall_seconds": time.perf_counter() - started,
        "fit_seconds": result.wall_seconds,
        "train_images_per_second": train_images / train_seconds if train_seconds else None,
        "eval_images_per_second": test_images / test_seconds if test_seconds else None,
        "misclassified_indices": analysis["misclassified"],
        "data": {"source": data.source, "train": int(len(data.train_labels)),
                 "test": int(len(data.test_labels))},
        "runtime": {"amp_dtype": str(runtime.amp_dtype), "channels_last": runtime.channels_last,
                    "compile": runtime.compile},
        "metadata": train.run_metadata(device),
        "args": vars(args),
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; data problems exit with a one-line message instead of a traceback."""
    args = parse_args(argv)
    try:
        run(args)
    except (dataset.DataError, train.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
