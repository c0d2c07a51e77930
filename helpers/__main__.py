"""Headless runs: `python -m helpers train --recipe s10 --data-dir DIR [...]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from .recipes import ANNEALS, OPTIMIZERS, RECIPES, Recipe

if TYPE_CHECKING:
    from .pipeline import RunSettings


def recipe_values(value: Callable[[Recipe], object], scheduler: str | None = None) -> str:
    """'s10: x, s8: y, ...': a recipe field for the help texts, read from the recipes themselves."""
    named = [(r.name, value(r)) for r in RECIPES.values() if scheduler in (None, r.scheduler)]
    return ", ".join(f"{name}: {v:g}" if isinstance(v, float) else f"{name}: {v}" for name, v in named)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: ... (see --help)", status 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# the RunSettings fields `add_tuning_flags` sets
TUNING_FLAGS = ("max_lr", "optimizer", "lr", "weight_decay", "label_smoothing", "div_factor",
                "final_div_factor", "anneal", "patience", "cutout_p", "strides")


def add_tuning_flags(p: argparse.ArgumentParser) -> None:
    """The flags that change a recipe's training (the CLI's and the benchmarks' train commands)."""
    p.add_argument("--max-lr", type=float, help="One Cycle max LR; skips the LR range test")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="replace the recipe's optimizer (tuning runs; "
                        f"{recipe_values(lambda r: r.optimizer)})")
    p.add_argument("--lr", type=float,
                   help="ReduceLROnPlateau: the starting LR (tuning runs; "
                        f"{recipe_values(lambda r: r.lr, 'plateau')})")
    p.add_argument("--weight-decay", type=float, help="override the recipe's weight decay (tuning runs)")
    p.add_argument("--label-smoothing", type=float,
                   help="override the recipe's label smoothing (tuning runs)")
    p.add_argument("--div-factor", type=float,
                   help="One Cycle: start LR = max LR / this (tuning runs; "
                        f"{recipe_values(lambda r: r.onecycle.div_factor, 'onecycle')})")
    p.add_argument("--final-div-factor", type=float,
                   help="One Cycle: end LR = start LR / this; above 1 anneals below LRMIN (tuning runs; "
                        f"{recipe_values(lambda r: r.onecycle.final_div_factor, 'onecycle')})")
    p.add_argument("--anneal", choices=ANNEALS,
                   help="One Cycle: the shape of its rise and fall (tuning runs; "
                        f"{recipe_values(lambda r: r.onecycle.anneal, 'onecycle')})")
    p.add_argument("--patience", type=int,
                   help="ReduceLROnPlateau: epochs without improvement before a cut (tuning runs; "
                        f"{recipe_values(lambda r: r.plateau.patience, 'plateau')})")
    p.add_argument("--cutout-p", type=float,
                   help="how often the cutout hole is applied (tuning runs; "
                        f"{recipe_values(lambda r: r.augment.cutout_p)})")
    p.add_argument("--strides", metavar="S1,S2,S3,S4",
                   help="ResNets: the first stride of each stage, 1 or 2 (tuning runs; default 1,2,2,2; "
                        "1,2,2,1 keeps the last stage at 8x8)")


def tuning_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The tuning flags as RunSettings keyword arguments."""
    return {name: getattr(args, name) for name in TUNING_FLAGS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one `train` command with the recipe and its overrides."""
    parser = OneLineParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe end to end and write metrics and figures")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--data-dir", default="data",
                   help="ImageFolder copy, torchvision folder, or a folder holding cifar-10-python.tar.gz")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 from md5-verified mirrors if --data-dir lacks it")
    p.add_argument("--mirrors", help="archive URLs to try, in order (spaces or commas); "
                                     "default: $CIFAR10_URLS, else the built-in mirrors")
    p.add_argument("--synthetic", action="store_true", help="synthetic images (smoke runs)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    add_tuning_flags(p)
    p.add_argument("--lr-finder-iters", type=int, help="iterations of the LR range test")
    p.add_argument("--train-subset", type=int, help="train on a seeded subset of N images")
    p.add_argument("--test-subset", type=int, help="evaluate on a seeded subset of N images")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: auto)")
    p.add_argument("--plain", action="store_true",
                   help="fp32, NCHW, default loader settings (the seed repos' way), for comparison")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks instead of one-line errors (also: HELPERS_DEBUG=1)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace):
    """The pipeline's RunSettings from parsed flags."""
    from .pipeline import RunSettings

    return RunSettings(
        recipe=args.recipe, data_dir=args.data_dir, download=args.download, mirrors=args.mirrors,
        synthetic=args.synthetic, epochs=args.epochs, batch_size=args.batch_size,
        lr_finder_iters=args.lr_finder_iters, **tuning_overrides(args), train_subset=args.train_subset,
        test_subset=args.test_subset, out=args.out, seed=args.seed, device=args.device,
        workers=args.workers, plain=args.plain, compile=args.compile, resume=not args.no_resume,
        progress=not args.no_progress)


def _interrupted_message(out: str | os.PathLike | None, resume: bool) -> str:
    """Where an interrupted run stands and how to go on ("interrupted" alone when no run had started)."""
    from .pipeline import saved_midway
    from .train import read_resume_state

    if out is None:
        return "interrupted"
    try:
        state = read_resume_state(out)
    except Exception:  # a message, not a second error
        state = None
    saved = (f"epoch {state['epoch']}{saved_midway(state)} is saved in {out}/last.pt" if state
             else "no epoch was saved yet")
    how = "run the same command to resume" if resume else "run it without --no-resume to resume"
    return f"interrupted; {saved}; {how}"


def run_guarded(work: Callable[[], None], current_out: Callable[[], str | os.PathLike | None], resume: bool,
                debug: bool) -> int:
    """Run `work`: an expected failure is one line on stderr and status 2; a stop is 128 + signal.

    Either way a run folder that got nothing but its lock is removed, not left empty behind.
    """
    import torch

    from .dataset import DataError
    from .download import DownloadError
    from .lr_finder import RangeTestError
    from .pipeline import SettingsError, release_unused_run_folder
    from .runtime import DeviceError
    from .train import CheckpointError

    finished = False
    try:
        work()
        finished = True
    except KeyboardInterrupt as stop:
        if debug:
            traceback.print_exc()
        print(f"\n{_interrupted_message(current_out(), resume)}", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)  # the shell's convention: 130, or 143 for SIGTERM
    except (SettingsError, DataError, DownloadError, DeviceError, CheckpointError, RangeTestError,
            OSError, torch.cuda.OutOfMemoryError) as err:
        if debug:
            traceback.print_exc()
        text = str(err).replace("\n", " ")
        if isinstance(err, OSError) and not isinstance(err, DataError):
            text = f"{err.strerror or err}: {err.filename!r}" if err.filename else str(err)
        if isinstance(err, torch.cuda.OutOfMemoryError):
            first_line = str(err).partition("\n")[0]
            text = (f"the GPU ran out of memory ({first_line}); close what else uses it "
                    "(another notebook or process) and run the same command to resume from the last "
                    "save, or start over in another folder with a smaller --batch-size")
        print(f"error: {text}", file=sys.stderr)
        return 2
    finally:
        out = None if finished else current_out()
        if out is not None:
            release_unused_run_folder(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the flags, then train through `run_guarded`."""
    args = parse_args(argv)
    # Imports after parsing: `--help` and flag errors answer at once, without loading torch.
    from .pipeline import run_recipe

    started: list[RunSettings] = []  # settings once valid: the interrupted message names their folder

    def work() -> None:
        started.append(settings_from_args(args))
        run_recipe(started[-1])

    debug = args.debug or os.environ.get("HELPERS_DEBUG") == "1"
    return run_guarded(work, lambda: started[-1].out_dir if started else args.out, not args.no_resume, debug)


if __name__ == "__main__":
    sys.exit(main())
