"""Benchmarks: run recipes through the pipeline, record runs, measure where the time goes.

    python -m benchmarks.run train --recipe s9 --data-dir DIR --seeds 0 1 2   # full runs, one record each
    python -m benchmarks.run record runs/s10                                  # a finished CLI run's metrics
    python -m benchmarks.run throughput --recipe s10 --data-dir DIR [--side-by-side] [--compile]
    python -m benchmarks.run report                                           # rewrite results.md
    python -m benchmarks.run notebook S10_Assignment.ipynb --data-dir DIR     # execute it on its run

Every record is one JSON line appended to benchmarks/runs.jsonl (git commit, command, device,
versions, data copy, history, accuracy, times, images/s); results.md is generated from that log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.__main__ import OneLineParser, add_recipe_flags, recipe_from_args, run_guarded
from helpers.dataset import build_loaders, channel_mean_std
from helpers.pipeline import RunOptions, SettingsError, load_run_data, run_recipe, start_run
from helpers.recipes import RECIPES, get_recipe
from helpers.runtime import atomic_write, run_metadata, utc_now

from . import throughput

HERE = Path(__file__).resolve().parent
LOG, REPORT = HERE / "runs.jsonl", HERE / "results.md"


def append_record(record: dict[str, Any], log: Path = LOG) -> None:
    """Append one JSON line to the results log and regenerate the report beside it.

    A training already in the log is refused: a finished run recorded again would count twice.
    """
    with _log_lock(log):  # two recorders at once would each rewrite the log without the other's line
        kept = log.read_text() if log.exists() else ""  # read once: checked, then rewritten with the new line
        if record["kind"] == "training" and any(same_run(record, r) for r in _parse_records(kept, log)):
            raise SettingsError(f"this {record['recipe']} training (first started "
                                f"{record['sessions'][0]['time_utc']}) is already in {log}; nothing recorded")
        if kept and not kept.endswith("\n"):
            kept += "\n"  # a hand-edited last line keeps its own line
        line = json.dumps(record, allow_nan=False) + "\n"
        # The whole log rewritten and renamed, not appended to: a killed write never leaves a torn line.
        atomic_write(log, lambda tmp: Path(tmp).write_text(kept + line))
        write_report(log, log.with_name(REPORT.name))


@contextlib.contextmanager
def _log_lock(log: Path) -> Iterator[None]:
    """Hold an exclusive lock on a file beside the log (.NAME.lock) while the log is read and rewritten."""
    try:
        import fcntl
    except ImportError:  # Windows: nothing is locked
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_name(f".{log.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # waits for the other recorder; released on close or death
        yield


def read_records(log: Path = LOG) -> list[dict[str, Any]]:
    """Every record of the results log, oldest first; a line that is not JSON is a one-line SettingsError."""
    return _parse_records(log.read_text(), log) if log.exists() else []


def _parse_records(text: str, log: Path) -> list[dict[str, Any]]:
    """The records in the log's text, naming the first line that is not JSON."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise SettingsError(f"{log} line {number} is not a JSON record ({err.msg}); restore the file "
                                f"(git checkout -- {log}) or delete that line") from err
    return records


def training_record(metrics: dict[str, Any], command: str, note: str | None = None) -> dict[str, Any]:
    """A finished run's metrics.json as a results-log record (the history kept, figures not)."""
    return repo_relative(metrics | {"kind": "training", "note": note, "command": command,
                                    "recorded_utc": utc_now()})


def repo_relative(value: Any, root: Path = HERE.parent) -> Any:
    """The record with this checkout's absolute paths (data folder, run folder, command) made relative."""
    if isinstance(value, str):
        return value.replace(f"{root}/", "")
    if isinstance(value, dict):
        return {k: repo_relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [repo_relative(v, root) for v in value]
    return value


def recorded_already(out: Path, log: Path) -> bool:
    """Whether the finished training in `out` (its metrics.json) is already in the results log."""
    path = out / "metrics.json"
    return path.exists() and any(same_run(json.loads(path.read_text()), r) for r in read_records(log))


def train(args: argparse.Namespace, started: list[Path]) -> None:
    """Run the recipe once per seed through `run_recipe`, each into its own folder, and record it.

    A seed whose finished run is already in the log is skipped, so the same command resumes a
    stopped multi-seed benchmark at the seed it stopped in. `started` gets each seed's run folder.
    """
    recipe = recipe_from_args(args)
    # Every seed's options first: a bad one is refused before any seed trains.
    all_options = [RunOptions(data_dir=args.data_dir, synthetic=args.synthetic, seed=seed,
                              out=str(Path(args.out) / "{recipe}"),  # each seed its variant's folder
                              device=args.device, progress=not args.no_progress)
                   for seed in args.seeds]
    for options in all_options:
        out = options.out_dir(recipe)
        if recorded_already(out, args.log):
            print(f"seed {options.seed}: its finished run in {out}/ is already in {args.log}; skipped")
            continue
        started.append(out)
        append_record(training_record(run_recipe(recipe, options), _command(), args.note), args.log)


def record(args: argparse.Namespace) -> None:
    """Record a run the CLI or a notebook finished (its metrics.json), e.g. a long resumed CPU run."""
    metrics_path = Path(args.run_dir) / "metrics.json"
    if not metrics_path.exists():
        raise SettingsError(f"no {metrics_path}; finish the run first (python -m helpers train ...)")
    metrics = json.loads(metrics_path.read_text())
    command = metrics.get("command") or f"python -m helpers train --recipe {metrics['recipe']}"
    append_record(training_record(metrics, command, args.note), args.log)


def same_run(metrics: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a results-log record is the training in this metrics.json: same recipe, same first
    start, same epochs (the CLI and a notebook executed on the finished run write the same training)."""
    def key(m: dict[str, Any]) -> tuple:
        first = (m.get("sessions") or [{}])[0]
        return m.get("recipe"), first.get("time_utc"), len(m.get("history", []))
    return record.get("kind") == "training" and key(record) == key(metrics)


def measure_throughput(args: argparse.Namespace) -> None:
    """Loader-bound and model-bound images/s of a recipe on this machine, one record per runtime.

    With --side-by-side the model is measured in each of `throughput.side_by_side` runtimes, in one
    process on one idle device: the only comparison of runtimes worth reporting.
    """
    options = RunOptions(data_dir=args.data_dir, synthetic=args.synthetic,
                         out=str(Path(args.out) / f"throughput-{args.recipe}"), device=args.device,
                         resume=False, progress=False)
    run = start_run(get_recipe(args.recipe), options)
    data = load_run_data(run)
    mean, std = channel_mean_std(data.train_images)
    train_loader, _ = build_loaders(data, run.recipe, mean, std, run.runtime.device)
    loader = throughput.loader_throughput(train_loader, args.batches)
    runtimes = throughput.side_by_side(run.runtime) if args.side_by_side else [run.runtime]
    for runtime in runtimes:
        model = throughput.model_throughput(run.recipe, runtime, args.batches, args.warmup, args.compile)
        described = runtime.describe() + (", torch.compile" if args.compile else "")
        print(f"{run.recipe.name}, {described}: train {model['train_images_per_second']:,.0f} "
              f"img/s, eval {model['eval_images_per_second']:,.0f} img/s (model-bound); loader "
              f"{loader['images_per_second']:,.0f} img/s", flush=True)
        append_record({"kind": "throughput", "recorded_utc": utc_now(), "command": _command(),
                       "note": args.note, "recipe": run.recipe.name, "batch_size": run.recipe.batch_size,
                       "model": model,
                       "loader": loader | {"workers": train_loader.num_workers},
                       "limit": "model" if model["train_images_per_second"] < loader["images_per_second"]
                       else "loader", "data": {"source": data.source},
                       "runtime": runtime.as_dict() | {"compile": args.compile},
                       "metadata": run_metadata(runtime) | {"runtime": described}}, args.log)


def _short_commit(commit: str | None) -> str:
    """A commit as 8 hex digits, keeping the "+dirty" mark of a run from uncommitted code."""
    return str(commit)[:8] + ("+dirty" if str(commit).endswith("+dirty") else "")


def execute_notebook(args: argparse.Namespace) -> None:
    """Run every cell of a notebook in a fresh kernel and save it with its outputs, in place.

    Executed after its run has finished, the notebook resumes at the last epoch and shows that
    run's real history and analysis. The kernel sees `--data-dir` as CIFAR_DATA_DIR and no
    progress bars; the file is replaced only when every cell has run.
    """
    import nbformat  # the dev extra: only this subcommand needs Jupyter
    from nbclient import NotebookClient

    path = Path(args.notebook)
    if not path.is_file():
        raise SettingsError(f"no notebook {path}; pass one of the *_Assignment.ipynb files")
    notebook = nbformat.read(path, as_version=4)
    env = os.environ | {"CIFAR_PROGRESS": "0"}  # a bar's redraws would be committed as output
    if args.data_dir:
        env["CIFAR_DATA_DIR"] = args.data_dir  # relative to the notebook's folder, where the kernel runs
    NotebookClient(notebook, timeout=None, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent.resolve())}}).execute(env=env)
    atomic_write(path, lambda tmp: nbformat.write(notebook, tmp))


def _command() -> str:
    """This process's command line, for the record."""
    return "python -m benchmarks.run " + shlex.join(sys.argv[1:])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _cell(text: str | None) -> str:
    """A table cell for free text: empty for None, pipes escaped so the row keeps its columns."""
    return (text or "").replace("|", "\\|")


def spread(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per recipe and data copy, the assignment's full runs (nothing `changed`; the latest one of each
    seed): their final accuracies, mean, sample std, range, flip-TTA mean and devices."""
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "training" and r["full_run"] and r.get("changed") == {}:
            latest[r["recipe"], r["data"]["copy"], r["settings"]["seed"]] = r
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (recipe, copy, _), r in sorted(latest.items()):
        groups.setdefault((recipe, copy), []).append(r)
    table = {}
    for key, runs in groups.items():
        accs = [r["final_test_acc"] for r in runs]
        tta = [r["flip_tta_acc"] for r in runs if r.get("flip_tta_acc") is not None]
        table[key] = {"n": len(runs), "seeds": [r["settings"]["seed"] for r in runs], "accs": accs,
                      "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else None,
                      "min": min(accs), "max": max(accs), "tta_mean": statistics.mean(tta) if tta else None,
                      "tta_n": len(tta), "devices": sorted({_device(r) for r in runs})}
    return table


def _device(record: dict[str, Any]) -> str:
    meta = record["metadata"]
    return f"{meta['device_name']}, {meta['runtime']}"


def write_report(log: Path = LOG, report: Path = REPORT) -> str:
    """Regenerate results.md: one table of training runs, one of throughput, newest last."""
    records = read_records(log)
    lines = ["# Benchmark results", "",
             f"Generated by `python -m benchmarks.run` from `{log.name}` (one JSON record per run, with",
             "its command, git commit, versions and per-epoch history). Data copy: `jpeg-copy` is",
             "`../shared/data` unpacked (lossy JPEG, accuracy a little below the original release).", "",
             "## Training runs", "",
             "| recipe | full run | device | runtime | data | seed | epochs | final acc | best acc "
             "| time (training + test passes) | train img/s | resumes | commit | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "training"):
        meta = r["metadata"]
        lines.append(
            f"| {r['recipe']} | {'yes' if r['full_run'] else 'no'} | {meta['device_name']} "
            f"({meta['cpu_count']} cores) | {meta['runtime']} | {r['data']['copy']} | "
            f"{r['settings']['seed']} | {r['epochs']} | {_pct(r['final_test_acc'])} | "
            f"{_pct(r['best_test_acc'])} | {r['training_seconds'] / 60:.1f} min | "
            f"{r['train_images_per_second'] or 0:.0f} | {r['resumes']} | "
            f"{_short_commit(meta['git_commit'])} | "
            f"{_cell(r.get('note'))} |")
    lines += ["", "## Spread over seeds", "",
              "The assignment's full runs (recipe unchanged, the latest run of each seed): mean and sample "
              "standard deviation of the final test accuracy. Flip TTA (each test image averaged with its "
              "mirror) is reported beside it, for the runs that have it.", "",
              "| recipe | data | n | seeds | final acc: each run | mean ± std | lowest | highest "
              "| flip TTA mean (n) | devices |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (recipe, copy), s in spread(records).items():
        std = "" if s["std"] is None else f" ± {100 * s['std']:.2f}"
        lines.append(
            f"| {recipe} | {copy} | {s['n']} | {', '.join(map(str, s['seeds']))} | "
            f"{', '.join(_pct(a) for a in s['accs'])} | {_pct(s['mean'])}{std} | {_pct(s['min'])} | "
            f"{_pct(s['max'])} | {_pct(s['tta_mean'])} ({s['tta_n']}) | {'; '.join(s['devices'])} |")
    lines += ["", "## Where the time goes", "",
              "Model-bound: train steps (forward, backward, update) and evaluation on one batch already on "
              "the device; loader-bound: the train loader alone (augmentation and collation).", "",
              "| recipe | device | runtime | batch | train img/s (model) | eval img/s (model) "
              "| loader img/s | loader workers | limit | measured | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in records if r["kind"] == "throughput"):
        meta, model = r["metadata"], r["model"]
        lines.append(
            f"| {r['recipe']} | {meta['device_name']} ({meta['cpu_count']} cores) | {meta['runtime']} | "
            f"{r['batch_size']} | {model['train_images_per_second']:.0f} | "
            f"{model['eval_images_per_second']:.0f} | {r['loader']['images_per_second']:,.0f} | "
            f"{r['loader']['workers']} | {r['limit']} | {r['recorded_utc'][:10]} | {_cell(r.get('note'))} |")
    text = "\n".join(lines) + "\n"
    atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = OneLineParser(prog="python -m benchmarks.run", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", type=Path, default=LOG, help="results log (JSON lines); results.md beside it")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "throughput"):
        q = sub.add_parser(name)
        q.add_argument("--recipe", required=True, choices=sorted(RECIPES))
        q.add_argument("--data-dir")
        q.add_argument("--synthetic", action="store_true")
        q.add_argument("--device", help="cuda, mps or cpu (default: best available)")
        q.add_argument("--out", default="runs/bench", help="folder for the runs' own files")
        q.add_argument("--note", help="a sentence stored with the record")
    t = sub.choices["train"]
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_recipe_flags(t)
    t.add_argument("--no-progress", action="store_true")
    sub.choices["throughput"].add_argument("--batches", type=int, default=10)
    sub.choices["throughput"].add_argument("--warmup", type=int, default=2)
    sub.choices["throughput"].add_argument("--compile", action="store_true", help="torch.compile the model")
    sub.choices["throughput"].add_argument(
        "--side-by-side", action="store_true",
        help="measure the model in the fast runtime, the same without channels_last, and plain fp32")
    r = sub.add_parser("record")
    r.add_argument("run_dir")
    r.add_argument("--note")
    sub.add_parser("report")
    n = sub.add_parser("notebook", help="execute a notebook in place (after its run has finished)")
    n.add_argument("notebook")
    n.add_argument("--data-dir", help="the run's data folder, given to the notebook as CIFAR_DATA_DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input is one line and status 2, a stopped training names its checkpoint."""
    args = parse_args(argv)
    started: list[Path] = []
    command = {"train": lambda a: train(a, started), "record": record, "throughput": measure_throughput,
               "notebook": execute_notebook,
               "report": lambda a: write_report(a.log, a.log.with_name(REPORT.name))}[args.command]
    return run_guarded(lambda: command(args), lambda: started[-1] if started else None,
                       resume=True, debug=os.environ.get("HELPERS_DEBUG") == "1")


if __name__ == "__main__":
    sys.exit(main())
