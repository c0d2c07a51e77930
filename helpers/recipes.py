"""The assignments as data: every value a recipe sets lives here, read by notebook, CLI and tests.

A run is the assignment's exactly when its recipe equals the assignment's; `override` makes a
tuning or smoke variant from "key=value" text (the CLI's flags and the notebooks' CIFAR_OVERRIDES).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
import types
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Anneal = Literal["linear", "cos"]  # One Cycle's shapes, as torch's OneCycleLR names them


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation; the test pipeline only normalizes."""

    crop_padding: int = 4  # torchvision RandomCrop(32, padding=4): zero-pad 4, crop 32x32
    hflip_p: float = 0.0
    rotate_limit: float = 0.0  # degrees, uniform in [-limit, +limit]
    # Shift-scale-rotate in one affine warp when either is set (albumentations 2.x `Affine`, the
    # replacement of the deprecated ShiftScaleRotate), else `rotate_limit` alone is a plain Rotate.
    shift_limit: float = 0.0  # fraction of the side, uniform in [-limit, +limit] on each axis
    scale_limit: float = 0.0  # zoom uniform in [1 - limit, 1 + limit]
    affine_p: float = 1.0  # how often the shift-scale-rotate warp is applied
    cutout_size: int = 0  # side of the single square hole, filled with the dataset mean
    cutout_p: float = 1.0


@dataclass(frozen=True)
class OneCycle:
    """Two-phase One Cycle, stepped every batch: linear (the course's) or cosine-shaped phases."""

    peak_epoch: int = 5  # the LR peaks at the end of this epoch
    div_factor: float = 10.0  # start LR = max_lr / div_factor
    final_div_factor: float = 1.0  # 1.0: no annihilation, the last LR equals the start LR
    short_run_pct: float = 5 / 24  # runs too short to reach peak_epoch (smoke tests) peak here
    max_lr: float | None = None  # a fixed peak; None: the LR range test chooses it
    anneal: Anneal = "linear"  # the shape of both phases; "cos" stays near the peak longer

    def pct_start(self, epochs: int) -> float:
        """Fraction of all steps spent rising: peak_epoch / epochs when the run is long enough."""
        return self.peak_epoch / epochs if self.peak_epoch < epochs else self.short_run_pct


@dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau, stepped once per epoch on the test accuracy (mode 'max')."""

    factor: float = 0.2
    patience: int = 2
    threshold: float = 0.001  # absolute, in accuracy (0.001 = 0.1 percentage point)
    min_lr: float = 1e-4


@dataclass(frozen=True)
class LRFinder:
    """Exponential LR range test settings."""

    start_lr: float = 1e-6
    end_lr: float = 1.0
    num_iter: int = 100
    smooth: float = 0.05  # weight of the newest loss in the exponential moving average
    diverge: float = 5.0  # stop when the smoothed loss exceeds this multiple of its minimum
    fraction: float = 0.1  # suggested max LR = this fraction of the LR at the smoothed-loss minimum


@dataclass(frozen=True)
class Recipe:
    """One assignment: model, data pipeline, optimizer, schedule and analysis settings."""

    name: str
    model: str
    model_kwargs: dict[str, Any]
    epochs: int
    batch_size: int
    optimizer: Optimizer
    weight_decay: float
    scheduler: Literal["onecycle", "plateau"]
    augment: Augment
    gradcam_layer: str  # dotted module name, chosen for a map of at least 8x8
    lr: float | None = None  # ReduceLROnPlateau's starting LR; One Cycle sets every step's LR itself
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.0
    onecycle: OneCycle = field(default_factory=OneCycle)
    plateau: Plateau = field(default_factory=Plateau)
    lr_finder: LRFinder = field(default_factory=LRFinder)
    num_misclassified: int = 20
    train_subset: int | None = None  # a seeded subset of the training images (smoke and proxy runs)
    test_subset: int | None = None


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


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name, with a clear error for unknown names."""
    try:
        return RECIPES[name.lower()]
    except KeyError:
        raise OverrideError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}") from None


class OverrideError(ValueError):
    """A recipe value that cannot be: an unknown key, a wrong type or a value out of range."""


def override(recipe: Recipe, assignments: str | list[str]) -> Recipe:
    """A copy of `recipe` with "key=value" assignments applied: "epochs=2 augment.cutout_p=0.5".

    Values are read as their field's type; tuples and dicts as Python literals, and a dict is
    merged into the recipe's: model_kwargs="{'strides': (1, 2, 2, 1)}" keeps S8's norm.
    """
    if isinstance(assignments, str):  # split before each "key=", so a value may hold spaces
        assignments = re.split(r"\s+(?=[A-Za-z_][\w.]*=)", assignments.strip()) if assignments.strip() else []
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise OverrideError(f"{assignment!r}: expected KEY=VALUE, such as epochs=2")
        recipe = _set(recipe, key.strip().split("."), text.strip(), key.strip())
    check(recipe)
    return recipe


def _set(settings: Any, path: list[str], text: str, key: str) -> Any:
    """`settings` (a recipe or one of its parts) with the field at `path` set from `text`."""
    names = [f.name for f in dataclasses.fields(settings)]
    if isinstance(settings, Recipe) and path[0] in ("name", "model", "scheduler"):
        raise OverrideError(f"{key}: a recipe's {path[0]} is what makes it that recipe; choose another")
    if path[0] not in names:
        raise OverrideError(f"{key}: no such recipe value; expected one of {', '.join(names)}")
    current = getattr(settings, path[0])
    if len(path) > 1:
        value = _set(current, path[1:], text, key) if dataclasses.is_dataclass(current) else None
        if value is None:
            raise OverrideError(f"{key}: {path[0]} has no parts; set it whole")
    else:
        value = _parse(text, get_type_hints(type(settings))[path[0]], key)
        if isinstance(current, dict):
            value = current | value
    return replace(settings, **{path[0]: value})


def _parse(text: str, kind: Any, key: str) -> Any:
    """`text` as a value of the type `kind`, or a one-line OverrideError that says what was expected."""
    options = get_args(kind)
    if get_origin(kind) in (Union, types.UnionType):  # "X | None"
        if text.lower() == "none":
            return None
        kind = next(option for option in options if option is not type(None))
        options = get_args(kind)
    if get_origin(kind) is Literal:
        if text not in options:
            raise OverrideError(f"{key}={text}: expected one of {', '.join(options)}")
        return text
    try:
        if kind is bool:
            return {"true": True, "false": False, "1": True, "0": False}[text.lower()]
        if kind in (int, float, str):
            return kind(text)
        value = ast.literal_eval(text)
        if not isinstance(value, get_origin(kind) or kind):
            raise ValueError
        return value
    except (KeyError, ValueError, SyntaxError):
        name = getattr(get_origin(kind) or kind, "__name__", str(kind))
        raise OverrideError(f"{key}={text}: expected {name}") from None


def check(recipe: Recipe) -> None:
    """Refuse values no run can use, with one line that names the key and the allowed range."""
    def within(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Any:
        def ok(x: float | None) -> bool:
            if x is None:
                return True
            above = low < x if low_open else low <= x
            return math.isfinite(x) and above and (x < high if high_open else x <= high)
        return ok

    probability = within(0, 1)
    rules = {
        "epochs": within(1), "batch_size": within(1), "train_subset": within(1), "test_subset": within(1),
        "num_misclassified": within(0), "lr": within(0, low_open=True), "weight_decay": within(0),
        "momentum": within(0, 1, high_open=True), "label_smoothing": within(0, 1, high_open=True),
        "augment.crop_padding": within(0, 16), "augment.hflip_p": probability,
        "augment.rotate_limit": within(0, 180), "augment.shift_limit": within(0, 0.5),
        "augment.scale_limit": within(0, 1, high_open=True), "augment.affine_p": probability,
        "augment.cutout_size": within(0, 32), "augment.cutout_p": probability,
        "onecycle.peak_epoch": within(1), "onecycle.div_factor": within(1, low_open=True),
        "onecycle.final_div_factor": within(1), "onecycle.short_run_pct": within(0, 1, True, True),
        "onecycle.max_lr": within(0, low_open=True), "plateau.factor": within(0, 1, True, True),
        "plateau.patience": within(0), "plateau.threshold": within(0), "plateau.min_lr": within(0),
        "lr_finder.start_lr": within(0, low_open=True), "lr_finder.end_lr": within(recipe.lr_finder.start_lr,
                                                                                   low_open=True),
        "lr_finder.num_iter": within(2), "lr_finder.smooth": within(0, 1, low_open=True),
        "lr_finder.diverge": within(1, low_open=True), "lr_finder.fraction": within(0, low_open=True),
    }
    for key, ok in rules.items():
        value = value_at(recipe, key)
        if not ok(value):
            raise OverrideError(f"{key}={value} is out of range; see the recipe's own value with --help")
    if recipe.nesterov and recipe.optimizer == "sgd" and recipe.momentum == 0:
        raise OverrideError("nesterov needs momentum > 0; set momentum or nesterov=false")
    # the schedule a recipe does not use must stay as it is: a change there would do nothing
    unused = ("onecycle", OneCycle()) if recipe.scheduler == "plateau" else ("plateau", Plateau())
    if getattr(recipe, unused[0]) != unused[1] or (recipe.scheduler == "plateau") != (recipe.lr is not None):
        raise OverrideError(f"{recipe.name} uses {recipe.scheduler}: set lr and plateau.* for "
                            "ReduceLROnPlateau, onecycle.* for One Cycle")
    # the assignment's LR was chosen for its optimizer: another optimizer must bring its own
    assignment = get_recipe(recipe.name)
    fixed = assignment.lr or assignment.onecycle.max_lr
    if (recipe.optimizer != assignment.optimizer and fixed is not None
            and (recipe.lr, recipe.onecycle.max_lr) == (assignment.lr, assignment.onecycle.max_lr)):
        key = "lr" if recipe.scheduler == "plateau" else "onecycle.max_lr"
        raise OverrideError(f"optimizer={recipe.optimizer} replaces {assignment.optimizer}, whose {key} "
                            f"{fixed:g} was chosen for it: set {key} too")


def keys(settings: Any = None, prefix: str = "") -> list[str]:
    """Every value a recipe holds, as dotted keys ("epochs", "augment.cutout_p"), from the dataclasses;
    not the name, model and scheduler, which make a recipe that recipe."""
    settings = S10 if settings is None else settings  # every recipe has the same keys
    found = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            found += keys(value, f"{prefix}{f.name}.")
        elif prefix or f.name not in ("name", "model", "scheduler"):
            found.append(prefix + f.name)
    return found


def value_at(recipe: Recipe, key: str) -> Any:
    """A recipe's value at a dotted key."""
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def differences(recipe: Recipe) -> dict[str, Any]:
    """The values where `recipe` differs from the assignment of its name, as dotted keys."""
    assignment = get_recipe(recipe.name)
    return {key: value_at(recipe, key) for key in keys()
            if value_at(recipe, key) != value_at(assignment, key)}
