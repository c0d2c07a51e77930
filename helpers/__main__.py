"""Headless runs: `python -m helpers train --recipe s10 --data-dir DIR [...]`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .recipes import RECIPES, Recipe, get_recipe, keys, override, value_at

if TYPE_CHECKING:
    from .pipeline import RunOptions


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors ("error: ... (see --help)", status 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog if self.prog.endswith("train") else f"{self.prog} train"  # where the flags are
        self.exit(2, f"error: {message} (see {command} --help)\n")


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per recipe value (--epochs, --augment.cutout-p, ...); any of them makes a tuning run."""
    group = parser.add_argument_group(
        "recipe values", "each flag replaces one value of the recipe, which makes the run a tuning or "
        "smoke run, not the assignment's; the help shows each recipe's own value")
    for key in keys():
        section = key.partition(".")[0]  # each recipe shows only the schedule it uses
        shown = [r for r in RECIPES.values() if section not in ("onecycle", "plateau", "lr")
                 or (r.scheduler == "plateau") == (section in ("plateau", "lr"))]
        values = ", ".join(f"{r.name}: {_short(value_at(r, key))}" for r in shown)
        group.add_argument("--" + key.replace("_", "-"), dest=key, metavar=_kind(key), help=values)


def _kind(key: str) -> str:
    """What a recipe key takes, for the help: INT, FLOAT, BOOL, DICT or the choices of a Literal."""
    parent, _, name = key.rpartition(".")
    settings = value_at(RECIPES["s10"], parent) if parent else RECIPES["s10"]
    hint = typing.get_type_hints(type(settings))[name]
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(typing.get_args(hint)) + "}"
    options = [a for a in typing.get_args(hint) if a is not type(None)]  # "int | None": int
    kind = options[0] if options and typing.get_origin(hint) is not dict else hint
    return getattr(typing.get_origin(kind) or kind, "__name__", "VALUE").upper()


def _short(value: object) -> str:
    """A value for the help: floats in few digits (0.2083 rather than 0.20833333333333334)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The chosen recipe with the values its flags replace."""
    changes = [f"{key}={getattr(args, key)}" for key in keys() if getattr(args, key) is not None]
    return override(get_recipe(args.recipe), changes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: one `train` command with the recipe, where the run reads and writes, and
    any recipe value replaced."""
    parser = OneLineParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe end to end and write metrics and figures",
                       usage="python -m helpers train --recipe {s8,s9,s10} [options] [--KEY VALUE ...]")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--data-dir", default="data",
                   help="ImageFolder copy, torchvision folder, or a folder holding cifar-10-python.tar.gz")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR-10 from md5-verified mirrors ($CIFAR10_URLS) if --data-dir lacks it")
    p.add_argument("--synthetic", action="store_true", help="synthetic images (smoke runs)")
    p.add_argument("--out", default=None, help="run folder (default runs/<recipe>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: auto)")
    p.add_argument("--plain", action="store_true", help="fp32, NCHW, default loaders, for comparison")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks instead of one-line errors (also: HELPERS_DEBUG=1)")
    add_recipe_flags(p)
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Where the run reads and writes, and what it runs on, from parsed flags."""
    from .pipeline import RunOptions

    return RunOptions(data_dir=args.data_dir, download=args.download, synthetic=args.synthetic,
                      out=args.out, seed=args.seed, device=args.device, workers=args.workers,
                      plain=args.plain, resume=not args.no_resume, progress=not args.no_progress)


def _interrupted_message(out: str | os.PathLike | None, resume: bool) -> str:
    """Where an interrupted run stands and how to go on ("interrupted" alone when no run had started)."""
    from .train import read_resume_state

    if out is None:
        return "interrupted"
    try:
        state = read_resume_state(out)
    except Exception:  # a message, not a second error
        state = None
    saved = f"epoch {state['epoch']} is saved in {out}/last.pt" if state else "no epoch was saved yet"
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
    from .recipes import OverrideError
    from .runtime import DeviceError
    from .train import CheckpointError

    finished = False
    try:
        work()
        finished = True
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"\n{_interrupted_message(current_out(), resume)}", file=sys.stderr)
        return 128 + signal.SIGINT  # the shell's convention for a stop by Ctrl-C
    except (SettingsError, OverrideError, DataError, DownloadError, DeviceError, CheckpointError,
            RangeTestError, OSError, torch.cuda.OutOfMemoryError) as err:
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

    started: list[Path] = []  # the run folder once the settings are valid: the interrupted message names it

    def work() -> None:
        recipe, options = recipe_from_args(args), options_from_args(args)
        started.append(options.out_dir(recipe))
        run_recipe(recipe, options)

    debug = args.debug or os.environ.get("HELPERS_DEBUG") == "1"
    return run_guarded(work, lambda: started[-1] if started else None, not args.no_resume, debug)


if __name__ == "__main__":
    sys.exit(main())
