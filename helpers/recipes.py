"""The assignments as data: every value a recipe sets lives here, read by notebook, CLI and tests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

Optimizer = Literal["adam", "adamw", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)  # the names the CLI and the settings accept
Anneal = Literal["linear", "cos"]
ANNEALS: tuple[str, ...] = get_args(Anneal)  # One Cycle's shapes, as torch's OneCycleLR names them


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
    lr: float  # plateau: the starting LR; One Cycle: unused (OneCycleLR sets every step's LR)
    weight_decay: float
    scheduler: Literal["onecycle", "plateau"]
    augment: Augment
    gradcam_layer: str  # dotted module name, chosen for a map of at least 8x8
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.0
    onecycle: OneCycle = field(default_factory=OneCycle)
    plateau: Plateau = field(default_factory=Plateau)
    lr_finder: LRFinder = field(default_factory=LRFinder)
    num_misclassified: int = 20

    @property
    def has_range_test(self) -> bool:
        """True when the LR range test chooses One Cycle's peak (no fixed max LR)."""
        return self.scheduler == "onecycle" and self.onecycle.max_lr is None

    def with_overrides(self, **changes: Any) -> Recipe:
        """Return a copy with some fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


S10 = Recipe(
    name="s10",
    model="custom_resnet",
    model_kwargs={},
    epochs=24,
    batch_size=512,
    optimizer="adam",
    lr=1e-2,
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
    lr=0.1,  # unused: One Cycle sets every step's LR from max_lr below
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
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}") from None
