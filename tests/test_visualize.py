"""Plots: each returns a Figure with the expected panels, saving is atomic PNG, GradCAM overlays blend."""

import json

import numpy as np
import pytest
import torch

from helpers import visualize
from helpers.analysis import Predictions
from helpers.dataset import channel_mean_std, get_transforms, make_synthetic_cifar
from helpers.lr_finder import LRRangeResult
from helpers.recipes import S10


def shown(fig) -> list:
    """The axes that display an image."""
    return [ax for ax in fig.axes if ax.images]


def test_data_plots():
    data = make_synthetic_cifar(100, 20)
    mean, std = channel_mean_std(data.train_images)
    counts = [np.bincount(labels, minlength=10) for labels in (data.train_labels, data.test_labels)]
    assert len(shown(visualize.plot_samples(data.train_images, data.train_labels, data.classes,
                                            per_class=3))) == 30
    bars = visualize.plot_class_distribution(*counts, data.classes)
    assert len(bars.axes[0].patches) == 20
    transform = get_transforms(S10, True, mean, std)
    fig = visualize.plot_augmented(data.train_images, transform, mean, std,
                                   n_images=2, n_versions=3)
    assert len(shown(fig)) == 8


def test_training_plots():
    result = LRRangeResult([1e-4, 1e-3, 1e-2], [2.3, 2.0, 2.5], [2.3, 1.9, 2.6], 1e-4, 1e-3,
                           1e-4, "rule")
    lines = visualize.plot_lr_finder(result).axes[0].get_lines()
    assert list(lines[1].get_xdata()) == result.lrs and list(lines[1].get_ydata()) == result.losses
    assert [line.get_xdata()[0] for line in lines[2:]] == [1e-3, 1e-4]  # minimum, then suggestion
    history = [{"epoch": e, "lr": 0.1 / e, "train_loss": 1 / e, "test_loss": 1.2 / e,
                "train_acc": 0.5 + e / 10, "test_acc": 0.45 + e / 10} for e in (1, 2, 3)]
    fig = visualize.plot_history(history)
    assert len(fig.axes) == 3 and "75.00%" in fig.axes[1].get_title()
    train_losses = fig.axes[0].get_lines()[0].get_ydata()
    assert list(train_losses) == [r["train_loss"] for r in history]
    assert "smoothing" not in fig.axes[0].get_title()  # plain cross-entropy unless the recipe smooths
    assert "smoothing 0.1" in visualize.plot_history(history, 0.1).axes[0].get_title()


def test_misclassified_and_gradcam_grids_share_order(tmp_path):
    images = np.zeros((10, 32, 32, 3), np.uint8)
    probs = np.full((10, 10), 0.05)
    probs[:, 1] = 0.55
    predictions = Predictions(probs, probs.argmax(1), np.zeros(10, np.int64))
    indices = [7, 2, 5]
    classes = [str(i) for i in range(10)]
    grid = visualize.plot_misclassified(images, indices, predictions, classes)
    cams = visualize.plot_gradcam(images, torch.rand(3, 32, 32), indices, predictions, classes)
    titles = [ax.get_title() for ax in shown(grid)]
    assert [t.split("\n")[0] for t in titles] == [
        ax.get_title().split("\n")[0] for ax in shown(cams)]
    assert titles[0].startswith("#7 true: 0") and "pred: 1 (55%)" in titles[0]
    path = visualize.save_figure(grid, tmp_path / "grid.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and len(list(tmp_path.iterdir())) == 1


def test_overlay_blends_into_unit_range():
    image = np.full((32, 32, 3), 255, np.uint8)
    cam = np.zeros((32, 32))
    cam[0, 0] = 1.0
    out = visualize.overlay(image, cam, alpha=0.5)
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out[0, 0], out[5, 5]), "hot and cold pixels get different colours"
    with pytest.raises(ValueError):
        visualize.overlay(image, np.zeros((8, 8)))


def test_plot_runs_draws_one_line_per_run_labelled_by_what_it_changed(tmp_path):
    bn = {"model_kwargs": {"norm": "bn", "zero_init_residual": True}}  # metrics.json's `changed`
    runs = {"s8": ({}, 0, [0.5, 0.7]), "s8-norm=bn": (bn, 0, [0.6, 0.8]), "s8-seed=1": ({}, 1, [0.55, 0.72])}
    for name, (changed, seed, accs) in runs.items():
        history = [{"epoch": i + 1, "test_acc": acc, "lr": 1e-3 / (i + 1)} for i, acc in enumerate(accs)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"recipe": "s8", "changed": changed, "settings": {"seed": seed}, "history": history,
             "final_test_acc": accs[-1]}))
    fig = visualize.plot_runs([tmp_path / name for name in runs])
    acc_ax, lr_ax = fig.axes
    assert [line.get_label() for line in lr_ax.get_lines()] == ["assignment", "norm=bn", "seed=1"]
    assert [line.get_label() for line in acc_ax.get_lines()] == ["assignment: 70.00%", "norm=bn: 80.00%",
                                                                 "seed=1: 72.00%"]
    np.testing.assert_allclose(acc_ax.get_lines()[1].get_ydata(), [60, 80])
    np.testing.assert_allclose(lr_ax.get_lines()[0].get_xdata(), [1, 2])
