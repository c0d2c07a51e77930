"""Render benchmarks/results.md from the whole results.json, one section per recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helpers.recipes import get_recipe

TARGET_DEVICES = ("H100", "H200")
FULL_DATA = (50_000, 10_000)  # CIFAR-10 train and test sizes


@dataclass(frozen=True)
class Target:
    """A recipe's goal: final test accuracy and fit wall time on one H100/H200, full data."""

    min_acc: float
    max_seconds: float


TARGETS: dict[str, Target] = {"s10": Target(0.930, 45.0), "s8": Target(0.915, 150.0)}


def not_applicable_reasons(name: str, provenance: dict[str, Any]) -> list[str]:
    """Why a run cannot be checked against the recipe's target (empty when it can)."""
    meta, data = provenance["metadata"], provenance["data"]
    reasons = []
    if (data["train"], data["test"]) != FULL_DATA or data["copy"] == "synthetic":
        reasons.append("subset" if data["copy"] != "synthetic" else "synthetic data")
    recipe = get_recipe(name)
    if provenance["epochs"] != recipe.epochs:
        reasons.append(f"{_plural(provenance['epochs'], 'epoch')} instead of {recipe.epochs}")
    if provenance.get("batch_size", recipe.batch_size) != recipe.batch_size:
        reasons.append(f"batch {provenance['batch_size']} instead of {recipe.batch_size}")
    if not meta["device"].startswith("cuda"):
        reasons.append(f"{meta['device'].split(':')[0].upper()} run")
    elif not any(gpu in meta["device_name"] for gpu in TARGET_DEVICES):
        reasons.append(f"{meta['device_name']} is not an H100/H200")
    return reasons


def target_verdict(name: str, training: dict[str, Any]) -> dict[str, Any]:
    """PASS/FAIL of the fast variant's seed means against the target, or why it does not apply."""
    target = TARGETS.get(name)
    fast = training["summary"].get("fast")
    if target is None or fast is None:
        return {"status": "not applicable (no target)" if target is None
                else "not applicable (no fast-variant runs)"}
    reasons = not_applicable_reasons(name, training["provenance"])
    acc_ok = fast["acc_mean"] >= target.min_acc
    time_ok = fast["wall_mean"] <= target.max_seconds
    status = ("PASS" if acc_ok and time_ok else "FAIL") if not reasons else (
        f"not applicable ({', '.join(reasons)})")
    return {"status": status, "accuracy_ok": acc_ok, "time_ok": time_ok,
            "min_acc": target.min_acc, "max_seconds": target.max_seconds}


def _mean_std(mean: float, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std', with a dash for the spread of a single seed."""
    spread = "–" if std is None else f"{scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {spread}"


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    """'1 epoch', '2 epochs'; irregular plurals given."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _rate(value: float | None) -> str:
    """Images per second, rounded to whole images."""
    return "–" if value is None else f"{value:,.0f}"


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Where, when and on what data a section was measured, as a bullet list."""
    meta, data = provenance["metadata"], provenance["data"]
    cut = data["train_subset"] or data["test_subset"]
    subsets = (f"train {data['train']:,} / test {data['test']:,} images"
               + (" (seeded subsets, seed 0)" if cut else ""))
    batch = f"batch size {provenance.get('batch_size', 'as the recipe')}"
    runs = (f"throughput only, no training runs; {batch}" if provenance.get("throughput_only") else
            f"epochs: {provenance['epochs']}; {batch}; seeds: "
            f"{', '.join(map(str, provenance['seeds']))}")
    return [
        f"- measured: {meta['time_utc']} (UTC)",
        f"- device: `{meta['device']}` ({meta['device_name']}); CPU "
        f"{meta.get('cpu_model') or 'unknown'}, {meta['cpu_count']} cores, "
        f"{meta['torch_threads']} torch threads",
        f"- versions: python {meta['python']}, torch {meta['torch']}, torchvision "
        f"{meta['torchvision']}, albumentations {meta['albumentations']}"
        + (f", CUDA {meta['cuda']}, cuDNN {meta['cudnn']}" if "cuda" in meta else ""),
        f"- data copy: {data['copy_label']} (`{data['source']}`)",
        f"- data: {subsets}",
        f"- {runs}",
        f"- command: `{provenance['command']}`",
    ]


def training_lines(name: str, training: dict[str, Any]) -> list[str]:
    """Provenance, the per-variant table, the speed-up and the target verdict."""
    lines = ["### Accuracy and wall time", "", *provenance_lines(training["provenance"])]
    lines.append(f"- max LR: {training['max_lr_note']}")
    lines += ["", "| variant | seeds | epochs | final test acc (%) | fit wall (s) | train img/s "
              "| eval img/s |", "|---|---|---|---|---|---|---|"]
    for variant, row in training["summary"].items():
        lines.append(
            f"| {variant} | {', '.join(map(str, row['seeds']))} | {row.get('epochs', '')} | "
            f"{_mean_std(row['acc_mean'], row['acc_std'], 100)} | "
            f"{_mean_std(row['wall_mean'], row['wall_std'], digits=1)} | "
            f"{_rate(row['train_ips_mean'])} | {_rate(row['eval_ips_mean'])} |")
    lines += ["", "Mean ± sample standard deviation over seeds. Fit wall time is `fit()` for all "
              "epochs including the per-epoch evaluation; not data loading, not the LR range test. "
              "img/s are whole-run averages from the epoch history (first epoch included)."]
    if training.get("speedup") is not None:
        lines += ["", f"**Speed-up (plain / fast fit time per epoch): {training['speedup']:.2f}x** "
                  "(above 1: the fast variant is faster; a plain variant run for fewer epochs "
                  "with --plain-epochs has a shorter schedule, so only its speed compares)"]
    lines += ["", target_line(name, training)]
    return lines


def target_line(name: str, training: dict[str, Any]) -> str:
    """The target and whether the fast variant met it."""
    target, verdict = TARGETS.get(name), target_verdict(name, training)  # fresh: targets may move
    if target is None:
        return f"Target: {verdict['status']}"
    return (f"**Target** (fast variant, mean over seeds; one H100/H200, full data, full epochs): "
            f"final test accuracy >= {100 * target.min_acc:.1f}% and fit wall time <= "
            f"{target.max_seconds:.0f} s: **{verdict['status']}**")


def throughput_lines(throughput: dict[str, Any], same_provenance: bool) -> list[str]:
    """The model-bound vs loader-bound table and which one limits."""
    lines = ["### Where the time goes", ""]
    if not same_provenance:
        lines += [*provenance_lines(throughput["provenance"]), ""]
    lines += ["| variant | model-bound train img/s | model-bound eval img/s | loader-bound train "
              "img/s | loader settings | limit |", "|---|---|---|---|---|---|"]
    for variant, row in throughput["variants"].items():
        loader, model = row["loader"], row["model"]
        settings = (f"{_plural(loader['num_workers'], 'worker')}, pin {loader['pin_memory']}, "
                    f"prefetch {loader['prefetch_factor'] or 'n/a'}, persistent "
                    f"{loader['persistent_workers']}")
        ratio = row["loader_images_per_second"] / model["train_images_per_second"]
        limit = (f"**{row['limit']}** (loader/model = {ratio:.2f})")
        lines.append(f"| {variant} | {_rate(model['train_images_per_second'])} | "
                     f"{_rate(model['eval_images_per_second'])} | "
                     f"{_rate(row['loader_images_per_second'])} | {settings} | {limit} |")
    n, batch = throughput["batches"], throughput["batch_size"]
    steps = _plural(n, "train step")
    passes = _plural(n, "forward pass", "forward passes")
    warmup = _plural(throughput["warmup"], "warm-up batch", "warm-up batches")
    loads = _plural(n, "train-loader batch", "train-loader batches")
    lines += ["", f"Model-bound: {steps} (forward, backward, optimizer) at batch {batch} and "
              f"{passes} at batch {2 * batch}, on one random batch already on the device, under "
              "the variant's runtime (variants with the same runtime share one measurement), "
              f"after {warmup}. Loader-bound: {loads} after the first, no model (images are "
              "decoded up front, so this is augmentation and collation; crossing an epoch "
              "boundary pays the worker restart, as training does). The limit is the smaller of "
              "the model-bound train rate and the loader rate."]
    if not throughput["provenance"]["metadata"]["device"].startswith("cuda"):
        lines += ["", "CPU run: the loader workers and the model share the same cores, so a real "
                  "epoch is slower than either rate alone. The model-bound rates say nothing about "
                  "a GPU; the loader rates are this CPU's, and a GPU host's loader scales with its "
                  "own cores and worker count."]
    return lines


def recipe_lines(name: str, section: dict[str, Any]) -> list[str]:
    """One recipe's section: training results (if any) and the throughput breakdown (if any)."""
    recipe = get_recipe(name)
    kwargs = "".join(f", {k}={v}" for k, v in recipe.model_kwargs.items())
    lines = [f"## {name.upper()}: {recipe.model}{kwargs}, {recipe.optimizer} + "
             f"{recipe.scheduler}", ""]
    training, throughput = section.get("training"), section.get("throughput")
    if training:
        lines += [*training_lines(name, training), ""]
    else:
        lines += ["No accuracy/wall-time runs recorded yet (only `--throughput-only`).", ""]
    if throughput:
        same = bool(training) and training["provenance"] == throughput["provenance"]
        lines += [*throughput_lines(throughput, same), ""]
    return lines


def render(results: dict[str, Any]) -> str:
    """The whole results.md."""
    lines = ["# Benchmarks", "",
             "Written by `python -m benchmarks.run` from `results.json` (raw runs and metadata). "
             "Variants: **fast** = `Runtime.for_device(device)` (bf16/fp16 autocast and "
             "channels_last on CUDA, fp32 elsewhere) with helpers' default loader settings; "
             "**plain** = fp32, NCHW, `num_workers=0` and DataLoader defaults, as the seed repos "
             "train. Each recipe's section states where and on what data it was measured; "
             "sections from separate runs are kept side by side.", ""]
    for name in sorted(results["recipes"], key=lambda n: (n != "s10", n)):  # the course order
        lines += recipe_lines(name, results["recipes"][name])
    return "\n".join(lines).rstrip() + "\n"
