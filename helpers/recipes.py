"""The assignments as data: every value a recipe sets lives here, read by notebook, CLI and tests.

A run is the assignment's exactly when its recipe equals the assignment's; `override` makes a
tuning or smoke variant from "key=value" text (the CLI's flags and the notebooks' CIFAR_OVERRIDES).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Anneal = Literal["linear", "cos"]  # One Cycle's shapes, as torch's OneCycleLR names them
# A number carries the values a run may give it, in interval notation: "[" and "]" include the
# bound, "(" and ")" do not. `check` refuses the rest.
Count = Annotated[int, "[1, inf)"]
Positive = Annotated[float, "(0, inf)"]
NonNegative = Annotated[float, "[0, inf)"]
Probability = Annotated[float, "[0, 1]"]
Fraction = Annotated[float, "[0, 1)"]


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation; the test pipeline only normalizes."""

    crop_padding: Annotated[int, "[0, 16]"] = 4  # torchvision RandomCrop(32, padding=4): pad, crop 32x32
    hflip_p: Probability = 0.0
    rotate_limit: Annotated[float, "[0, 180]"] = 0.0  # degrees, uniform in [-limit, +limit]
    # Shift-scale-rotate in one affine warp when either is set (albumentations 2.x `Affine`, the
    # replacement of the deprecated ShiftScaleRotate), else `rotate_limit` alone is a plain Rotate.
    shift_limit: Annotated[float, "[0, 0.5]"] = 0.0  # of the side, uniform in [-limit, +limit] per axis
    scale_limit: Fraction = 0.0  # zoom uniform in [1 - limit, 1 + limit]
    affine_p: Probability = 1.0  # how often the shift-scale-rotate warp is applied
    cutout_size: Annotated[int, "[0, 32]"] = 0  # side of the single square hole, filled with the dataset mean
    cutout_p: Probability = 1.0


@dataclass(frozen=True)
class OneCycle:
    """Two-phase One Cycle, stepped every batch: linear (the course's) or cosine-shaped phases."""

    peak_epoch: Count = 5  # the LR peaks at the end of this epoch
    div_factor: Annotated[float, "(1, inf)"] = 10.0  # start LR = max_lr / div_factor
    final_div_factor: Annotated[float, "[1, inf)"] = 1.0  # 1.0: no annihilation, the last LR = the start LR
    short_run_pct: Annotated[float, "(0, 1)"] = 5 / 24  # where runs too short for peak_epoch peak
    max_lr: Positive | None = None  # a fixed peak; None: the LR range test chooses it
    anneal: Anneal = "linear"  # the shape of both phases; "cos" stays near the peak longer

    def pct_start(self, epochs: int) -> float:
        """Fraction of all steps spent rising: peak_epoch / epochs when the run is long enough."""
        return self.peak_epoch / epochs if self.peak_epoch < epochs else self.short_run_pct


@dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau, stepped once per epoch on the test accuracy (mode 'max')."""

    factor: Annotated[float, "(0, 1)"] = 0.2
    patience: Annotated[int, "[0, inf)"] = 2
    threshold: NonNegative = 0.001  # absolute, in accuracy (0.001 = 0.1 percentage point)
    min_lr: NonNegative = 1e-4


@dataclass(frozen=True)
class LRFinder:
    """Exponential LR range test settings."""

    start_lr: Positive = 1e-6
    end_lr: Positive = 1.0
    num_iter: Annotated[int, "[2, inf)"] = 100
    smooth: Annotated[float, "(0, 1]"] = 0.05  # weight of the newest loss in the exponential moving average
    diverge: Annotated[float, "(1, inf)"] = 5.0  # stop at this multiple of the smoothed minimum
    fraction: Positive = 0.1  # suggested max LR = this fraction of the LR at the smoothed-loss minimum


@dataclass(frozen=True)
class Recipe:
    """One assignment: model, data pipeline, optimizer, schedule and analysis settings."""

    name: str
    model: str
    model_kwargs: dict[str, Any]
    epochs: Count
    batch_size: Count
    optimizer: Optimizer
    weight_decay: NonNegative
    scheduler: Literal["onecycle", "plateau"]
    augment: Augment
    gradcam_layer: str  # dotted module name, chosen for a map of at least 8x8
    lr: Positive | None = None  # ReduceLROnPlateau's starting LR; One Cycle sets every step's LR itself
    momentum: Fraction = 0.9
    nesterov: bool = True
    label_smoothing: Fraction = 0.0
    onecycle: OneCycle = field(default_factory=OneCycle)
    plateau: Plateau = field(default_factory=Plateau)
    lr_finder: LRFinder = field(default_factory=LRFinder)
    num_misclassified: Count = 20
    train_subset: Count | None = None  # a seeded subset of the training images (smoke and proxy runs)
    test_subset: Count | None = None


S10 = Recipe(
    name="s10",
    model="custom_resnet",
    model_kwargs={},
    epochs=24,
    batch_size=512,
    optimizer="adam",
    weight_decay=1e-4,  # decoupled from the norm and bias parameters (see train.parameter_groups)
    scheduler="onecycle",
    augment=Augment(crop_padding=4, hflip_p=0.5, cutout_size=8),
    gradcam_layer="layer2",  # 256x8x8; layer3 is 4x4, too coarse to show where the model looks
    label_smoothing=0.1,
    # LRMAX = the range test's smoothed-loss minimum, LRMIN = LRMAX / 100, where the schedule also
    # ends (no annihilation): the pair that won the proxy runs and the full ones (EXPERIMENTS.md).
    onecycle=OneCycle(peak_epoch=5, div_factor=100.0, final_div_factor=1.0),
    lr_finder=LRFinder(start_lr=1e-5, end_lr=1.0, num_iter=100, fraction=1.0),
)

# AdamW: its decay, decoupled from Adam's per-weight scaling, keeps this LayerNorm net learning
# (85.20% against Adam + L2's 80.93% in full); batch 128 gives the slow learner twice the steps.
# Both, and the probes behind them, in EXPERIMENTS.md.
S8 = Recipe(
    name="s8",
    model="resnet18",
    model_kwargs={"norm": "ln", "zero_init_residual": True},
    epochs=40,
    batch_size=128,
    optimizer="adamw",
    lr=2e-3,
    weight_decay=0.05,  # decoupled: each step shrinks conv and linear weights by the fraction lr * 0.05
    scheduler="plateau",
    augment=Augment(crop_padding=4, rotate_limit=5.0, cutout_size=16, cutout_p=0.5),
    gradcam_layer="layer3",  # 256x8x8; layer4 is 4x4
    label_smoothing=0.1,
    plateau=Plateau(factor=0.2, patience=2, threshold=0.001, min_lr=1e-5),
)

# No range test: a fixed SGD peak that suits BatchNorm nets of this size; One Cycle ends near zero,
# since S9 sets no rule against annihilation. The warp on half the images: on every image the
# network underfit (EXPERIMENTS.md).
S9 = Recipe(
    name="s9",
    model="dilated_dwsep_net",
    model_kwargs={},
    epochs=30,
    batch_size=256,
    optimizer="sgd",
    weight_decay=5e-4,
    scheduler="onecycle",
    # flip, shift-scale-rotate (as one Affine), one 16x16 hole of the mean, each half of the time
    augment=Augment(crop_padding=0, hflip_p=0.5, shift_limit=0.0625, scale_limit=0.1,
                    rotate_limit=10.0, affine_p=0.5, cutout_size=16, cutout_p=0.5),
    gradcam_layer="c4",  # 144x8x8, the last map
    label_smoothing=0.0,  # the network underfits rather than overfits: no extra regularizer
    onecycle=OneCycle(peak_epoch=6, div_factor=20.0, final_div_factor=200.0, max_lr=0.2),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (S8, S9, S10)}
FIXED = ("name", "scheduler", "gradcam_layer")  # the notebooks build and hook these by name
RESNETS = ("resnet18", "resnet34")  # S8's notebook builds either by name; S9 and S10 build one network


class OverrideError(ValueError):
    """A recipe value that cannot be: an unknown key, a wrong type or a value out of range."""


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name, with a clear error for unknown names."""
    if name.lower() not in RECIPES:
        raise OverrideError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name.lower()]


def keys(settings: Any = S10, prefix: str = "", extras: bool = False) -> dict[str, Any]:
    """Every value a recipe holds but the FIXED ones, the same in every recipe: dotted key and type
    (with `extras`, a number's type keeps its interval: Annotated[int, "[1, inf)"])."""
    found = {}
    for name, hint in get_type_hints(type(settings), include_extras=extras).items():
        if dataclasses.is_dataclass(part := getattr(settings, name)):
            found |= keys(part, f"{prefix}{name}.", extras)
        elif prefix or name not in FIXED:
            found[prefix + name] = hint
    return found


def interval(hint: Any) -> str | None:
    """The interval a number's type carries (of X in "X | None"), or None for other types."""
    if type(None) in get_args(hint):
        hint = get_args(hint)[0]
    return get_args(hint)[1] if get_origin(hint) is Annotated else None


RANGES = {key: bounds for key, hint in keys(extras=True).items() if (bounds := interval(hint))}  # for `check`


def value_at(recipe: Any, key: str) -> Any:
    """A recipe's value at a dotted key."""
    return functools.reduce(getattr, key.split("."), recipe)


def metavar(hint: Any) -> str:
    """How a value of this type is written: INT, FLOAT, BOOL, DICT or a Literal's {choices}."""
    if type(None) in get_args(hint):  # "X | None": X
        return metavar(get_args(hint)[0])
    return "{" + ",".join(get_args(hint)) + "}" if get_origin(hint) is Literal else hint.__name__.upper()


def override(recipe: Recipe, assignments: str | list[str]) -> Recipe:
    """A copy of `recipe` with "key=value" assignments applied: "epochs=2 augment.cutout_p=0.5".

    Values are read as their field's type, a dict as a Python literal that is merged into the
    recipe's: model_kwargs="{'zero_init_residual': False}" keeps S8's norm.
    """
    if isinstance(assignments, str):  # split before each "key=", so a value may hold spaces
        assignments = [a for a in re.split(r"\s+(?=[\w.]+=)", assignments.strip()) if a]
    known = keys()
    for assignment in assignments:
        key, sep, text = (part.strip() for part in assignment.partition("="))
        if not sep:
            raise OverrideError(f"{assignment!r}: expected KEY=VALUE, such as epochs=2")
        if key in FIXED:
            raise OverrideError(f"{key}: fixed by the recipe, whose notebook builds and hooks it by name")
        if key not in known:
            raise OverrideError(f"{key}: no such recipe value; expected one of {', '.join(known)}")
        value, current = parse_value(text, known[key], key), value_at(recipe, key)
        value = current | value if isinstance(current, dict) else value
        section, _, name = key.rpartition(".")  # keys are at most one level deep
        if section:
            value = replace(getattr(recipe, section), **{name: value})
        recipe = replace(recipe, **{section or name: value})
    check(recipe)
    return recipe


def parse_value(text: str, hint: Any, key: str) -> Any:
    """`text` as a value of the type `hint`, or a one-line OverrideError that says what was expected."""
    if type(None) in get_args(hint):  # "X | None"
        return None if text.lower() == "none" else parse_value(text, get_args(hint)[0], key)
    try:
        if hint is bool and text.lower() in ("true", "false", "yes", "no", "1", "0"):
            return text.lower() in ("true", "yes", "1")
        if hint in (int, float, str):
            return hint(text)
        if get_origin(hint) is Literal and text in get_args(hint):
            return text
        if get_origin(hint) is dict and isinstance(value := ast.literal_eval(text), dict):
            return value
    except (ValueError, SyntaxError):
        pass
    raise OverrideError(f"{key}={text}: expected {metavar(hint)}")


def check(recipe: Recipe) -> None:
    """Refuse values no run can use, with one line that names the key and what it allows."""
    for key, interval in RANGES.items():
        value, (low, high) = value_at(recipe, key), map(float, interval[1:-1].split(","))
        if value is not None and not (math.isfinite(value)  # at a bound only where "[" or "]" allows it
                                      and (low < value or low == value and interval[0] == "[")
                                      and (value < high or value == high and interval[-1] == "]")):
            raise OverrideError(f"{key}={value} is out of range: expected a value in {interval}")
    if recipe.lr_finder.end_lr <= recipe.lr_finder.start_lr:
        raise OverrideError("the range test needs lr_finder.end_lr above lr_finder.start_lr")
    if recipe.nesterov and recipe.optimizer == "sgd" and recipe.momentum == 0:
        raise OverrideError("nesterov needs momentum > 0; set momentum or nesterov=false")
    # the schedule a recipe does not use must stay as it is: a change there would do nothing
    plateau = recipe.scheduler == "plateau"
    unused, default = ("onecycle", OneCycle()) if plateau else ("plateau", Plateau())
    if getattr(recipe, unused) != default or plateau != (recipe.lr is not None):
        raise OverrideError(f"{recipe.name} uses {recipe.scheduler}: set lr and plateau.* for "
                            "ReduceLROnPlateau, onecycle.* for One Cycle")
    assignment, key = get_recipe(recipe.name), "lr" if plateau else "onecycle.max_lr"
    if recipe.model != assignment.model and {recipe.model, assignment.model} - set(RESNETS):
        raise OverrideError(f"model={recipe.model}: {recipe.name}'s notebook builds {assignment.model}; "
                            f"only S8 swaps its ResNet ({', '.join(RESNETS)})")
    # the assignment's LR was chosen for its optimizer: another optimizer must bring its own
    fixed = value_at(assignment, key)
    if not plateau and fixed is not None and recipe.onecycle.max_lr is None:  # no range test in its notebook
        raise OverrideError(f"{recipe.name} fixes its One Cycle peak: set onecycle.max_lr to a number")
    if recipe.optimizer != assignment.optimizer and fixed is not None and value_at(recipe, key) == fixed:
        raise OverrideError(f"optimizer={recipe.optimizer} replaces {assignment.optimizer}, whose {key} "
                            f"{fixed:g} was chosen for it: set {key} too")


def differences(recipe: Recipe) -> dict[str, Any]:
    """The values where `recipe` differs from the assignment of its name, as dotted keys."""
    assignment = get_recipe(recipe.name)
    return {k: value_at(recipe, k) for k in keys() if value_at(recipe, k) != value_at(assignment, k)}


def variant(name: str, changed: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """What sets a run of recipe `name` apart from the assignment's run, flat: the `changed` values
    (`differences`), a model argument under its own name ("norm"), and a seed other than 0."""
    changed, base = dict(changed), get_recipe(name).model_kwargs
    kwargs = {k: v for k, v in changed.pop("model_kwargs", {}).items() if k not in base or base[k] != v}
    return changed | kwargs | ({"seed": seed} if seed else {})
