"""Every plot of the course. Each function returns its Figure and never calls plt.show()."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .recipes import variant
from .runtime import atomic_write


def _grid(n: int, cols: int, cell: float = 1.6, extra_height: float = 0.0) -> tuple[Figure, np.ndarray]:
    """A Figure with a grid of axes [rows, cols] for n images, axis ticks off."""
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(cols * cell, rows * (cell + extra_height)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> str:
    """Save a figure as PNG atomically (temporary file, then rename); returns the path."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return str(path)


def plot_samples(images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 per_class: int = 8, seed: int = 0) -> Figure:
    """A labelled grid: `per_class` random images of each class, one class per row."""
    rng = np.random.default_rng(seed)
    fig, axes = _grid(len(classes) * per_class, per_class, cell=1.1)
    for label, (row, name) in enumerate(zip(axes, classes)):
        members = np.flatnonzero(labels == label)
        for ax, index in zip(row, rng.choice(members, size=min(per_class, len(members)), replace=False)):
            ax.imshow(images[index])
        row[0].text(-0.1, 0.5, name, ha="right", va="center", transform=row[0].transAxes)
    fig.suptitle("Samples per class")
    return fig


def plot_class_distribution(train_counts, test_counts, classes: Sequence[str]) -> Figure:
    """Side-by-side bars of images per class in train and test."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(classes))
    for offset, counts, name in ((-0.2, train_counts, "train"), (0.2, test_counts, "test")):
        ax.bar_label(ax.bar(x + offset, counts, width=0.4, label=name), fontsize=7)
    ax.set_xticks(x, classes, rotation=30)
    ax.set(ylabel="images", title="Class distribution")
    ax.legend()
    return fig


def plot_augmented(images: np.ndarray, transform, mean, std, n_images: int = 4,
                   n_versions: int = 6, seed: int = 0) -> Figure:
    """Each row: an original image, then `n_versions` draws of the train transform."""
    from .dataset import augment_stream, denormalize, seed_transform

    fig, axes = _grid(n_images * (n_versions + 1), n_versions + 1, cell=1.3)
    # Random rows rather than the first ones: an ImageFolder copy is sorted by class.
    chosen = np.random.default_rng(seed).choice(len(images), n_images, replace=False)
    for row, index in zip(axes, chosen):
        row[0].imshow(images[index])
        row[0].set_title(f"original #{index}", fontsize=8)
        for col, ax in enumerate(row[1:], start=1):
            seed_transform(transform, augment_stream(seed, col, int(index)))  # draw `col` of this image
            ax.imshow(denormalize(transform(image=images[index])["image"], mean, std)[0])
    fig.suptitle("Train augmentations")
    return fig


def plot_lr_finder(result) -> Figure:
    """Smoothed loss against LR (log scale) with the suggested max LR marked."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(result.lrs, result.raw_losses, color="0.8", lw=1, label="loss per batch")
    ax.plot(result.lrs, result.losses, lw=2, label="smoothed loss")
    ax.axvline(result.min_loss_lr, color="0.5", ls=":", label=f"minimum {result.min_loss_lr:.2e}")
    ax.axvline(result.suggested_lr, color="C3", ls="--", label=f"suggested max LR {result.suggested_lr:.2e}")
    finite = [v for v in result.losses if np.isfinite(v)]
    ax.set(xscale="log", ylim=(min(finite) * 0.9, min(max(finite), 3 * min(finite))),
           xlabel="learning rate", ylabel="training loss", title="LR range test")
    ax.legend()
    return fig


def plot_history(history: list[dict], label_smoothing: float = 0.0) -> Figure:
    """Loss and accuracy (train vs test) and the LR, per epoch; the title names the train loss's smoothing."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for split in ("train", "test"):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
        acc_ax.plot(epochs, [100 * r[f"{split}_acc"] for r in history], marker=".", label=split)
    loss_ax.set_title(f"loss (train: label smoothing {label_smoothing:g})" if label_smoothing
                      else "loss (cross-entropy)")
    acc_ax.set(title=f"accuracy, final test {100 * history[-1]['test_acc']:.2f}%", ylabel="%")
    lr_ax.plot(epochs, [r["lr"] for r in history], marker=".", color="C2")
    lr_ax.set_title("learning rate at the end of each epoch")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set(xlabel="epoch", xlim=(min(epochs) - 0.5, max(epochs) + 0.5))  # whole epochs, even just one
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    return fig


def plot_runs(folders: Sequence[str | os.PathLike]) -> Figure:
    """Test accuracy and LR per epoch of several runs (each folder's metrics.json), one line per run,
    labelled by what the run changed from its assignment's ("assignment" for the assignment itself)."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    acc_ax, lr_ax = fig.subplots(1, 2)
    for folder in folders:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        changed = variant(metrics["recipe"], metrics.get("changed", {}), metrics["settings"]["seed"])
        label = ", ".join(f"{key}={value}" for key, value in changed.items()) or "assignment"
        epochs = [row["epoch"] for row in metrics["history"]]
        acc_ax.plot(epochs, [100 * row["test_acc"] for row in metrics["history"]], marker=".",
                    label=f"{label}: {100 * metrics['final_test_acc']:.2f}%")
        lr_ax.plot(epochs, [row["lr"] for row in metrics["history"]], marker=".", label=label)
    acc_ax.set(title="test accuracy (final in the legend)", ylabel="%")
    lr_ax.set(title="learning rate at the end of each epoch", yscale="log")
    for ax in (acc_ax, lr_ax):
        ax.set(xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_misclassified(images: np.ndarray, indices: Sequence[int], predictions,
                       classes: Sequence[str], cols: int = 5) -> Figure:
    """Misclassified test images with true label, predicted label and confidence."""
    fig, axes = _grid(len(indices), cols, cell=2.0, extra_height=0.35)
    for ax, index in zip(axes.flat, indices):
        pred = predictions.preds[index]
        ax.imshow(images[index])
        ax.set_title(f"#{index} true: {classes[predictions.labels[index]]}\n"
                     f"pred: {classes[pred]} ({100 * predictions.probs[index, pred]:.0f}%)", fontsize=8)
    fig.suptitle("Misclassified test images (most confident first)")
    return fig


def plot_gradcam(images: np.ndarray, cams, indices: Sequence[int], predictions,
                 classes: Sequence[str], cols: int = 5, explained: str = "predicted") -> Figure:
    """GradCAM overlays of the same images as `plot_misclassified`, in the same order."""
    fig, axes = _grid(len(indices), cols, cell=2.0, extra_height=0.35)
    for ax, cam, index in zip(axes.flat, cams, indices):
        ax.imshow(overlay(images[index], cam))
        ax.set_title(f"#{index} true: {classes[predictions.labels[index]]}\n"
                     f"pred: {classes[predictions.preds[index]]}", fontsize=8)
    fig.suptitle(f"GradCAM for the {explained} class")
    return fig


def overlay(image: np.ndarray, cam, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped CAM over an HWC image (uint8 or floats in [0, 1]) -> floats in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    image = image / 255.0 if image.max() > 1.0 else image
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    if cam.shape != image.shape[:2]:
        raise ValueError(f"CAM shape {cam.shape} does not match image shape {image.shape[:2]}")
    heat = colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)
