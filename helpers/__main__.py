"""Headless runs: `python -m helpers train --recipe s10 --data-dir DIR [...]`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import fields

from .recipes import RANGES, RECIPES, Recipe, get_recipe, keys, metavar, override, value_at


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: ... (see --help)", status 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog if self.prog.endswith("train") else f"{self.prog} train"  # where the flags are
        self.exit(2, f"error: {message} (see {command} --help)\n")


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per recipe value (--epochs, --augment.cutout-p, ...); any of them makes a tuning run."""
    group = parser.add_argument_group(
        "recipe values", "each flag replaces one value of the recipe, which makes the run a tuning or "
        "smoke run, not the assignment's; the help shows each recipe's own value and the allowed range")
    for key, hint in keys().items():  # each recipe's value, for the schedule it uses only
        schedule = {"lr": "plateau", "plateau": "plateau", "onecycle": "onecycle"}.get(key.partition(".")[0])
        values = [(r.name, value_at(r, key)) for r in RECIPES.values() if schedule in (None, r.scheduler)]
        shown = ", ".join(f"{name}: {format(v, '.4g') if isinstance(v, float) else v}" for name, v in values)
        group.add_argument("--" + key.replace("_", "-"), dest=key, metavar=metavar(hint),
                           help=f"{shown}; in {RANGES[key]}" if key in RANGES else shown)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The chosen recipe with the values its flags replace."""
    changes = [f"{key}={getattr(args, key)}" for key in keys() if getattr(args, key) is not None]
    return override(get_recipe(args.recipe), changes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: `train` with the recipe, where the run reads and writes, and recipe values."""
    parser = OneLineParser(prog="python -m helpers", description=__doc__)
    p = parser.add_subparsers(dest="command", required=True).add_parser(
        "train", help="train a recipe end to end and write metrics and figures",
        usage="python -m helpers train --recipe {s8,s9,s10} [options] [--KEY VALUE ...]")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--data-dir", default="data",
                   help="ImageFolder copy, torchvision folder, or a folder holding cifar-10-python.tar.gz")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 from md5-verified mirrors ($CIFAR10_URLS) if --data-dir lacks it")
    p.add_argument("--synthetic", action="store_true", help="synthetic images (smoke runs)")
    p.add_argument("--out", help="run folder, where {recipe} is the variant's name (default runs/{recipe}: "
                   "runs/s8, runs/s8-norm=bn, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    p.add_argument("--workers", type=int, help="loader workers (default: auto)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore a checkpoint in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks instead of one-line errors (also: HELPERS_DEBUG=1)")
    add_recipe_flags(p)
    return parser.parse_args(argv)


def run_guarded(work: Callable[[], None], current_out: Callable[[], str | os.PathLike | None], resume: bool,
                debug: bool) -> int:
    """Run `work`: an expected failure is one line on stderr and status 2; a stop is 128 + signal."""
    import torch

    from . import dataset, download, lr_finder, pipeline, recipes, runtime, train

    try:
        work()
        return 0
    except (KeyboardInterrupt, pipeline.SettingsError, recipes.OverrideError, dataset.DataError,
            download.DownloadError, runtime.DeviceError, train.CheckpointError, lr_finder.RangeTestError,
            OSError, torch.cuda.OutOfMemoryError) as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):  # where the run stands and how to go on
            out, state = current_out(), None
            with contextlib.suppress(Exception):  # a message, not a second error
                state = train.read_resume_state(out)
            saved = f"epoch {state['epoch']} is saved in {out}/last.pt" if state else "no epoch was saved yet"
            how = "run the same command" if resume else "run it without --no-resume"
            print("\ninterrupted" + (f"; {saved}; {how} to resume" if out else ""), file=sys.stderr)
            return 130  # 128 + SIGINT: the shell's convention for a stop by Ctrl-C
        text = str(err)
        if isinstance(err, OSError) and err.filename:
            text = f"{err.strerror or err}: {err.filename!r}"
        if isinstance(err, torch.cuda.OutOfMemoryError):
            text = ("the GPU ran out of memory (" + text.partition("\n")[0] + "); close what else uses it "
                    "(another notebook or process) and run the same command to resume from the last "
                    "save, or start over in another folder with a smaller --batch-size")
        print(f"error: {text}".replace("\n", " "), file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse the flags, then train through `run_guarded`."""
    args = parse_args(argv)
    # Imports after parsing: `--help` and flag errors answer at once, without loading torch.
    from .pipeline import RunOptions, run_recipe

    started = []  # the run folder once the settings are valid: the interrupted message names it

    def work() -> None:
        recipe = recipe_from_args(args)
        # the run flags are named after RunOptions' fields (images_dir is the notebooks' own)
        options = RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions) if f.name in args})
        started.append(options.out_dir(recipe))
        run_recipe(recipe, options)

    debug = args.debug or os.environ.get("HELPERS_DEBUG") == "1"
    return run_guarded(work, lambda: started[-1] if started else None, args.resume, debug)


if __name__ == "__main__":
    sys.exit(main())
