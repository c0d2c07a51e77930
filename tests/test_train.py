"""Training: it learns, the schedules have the assignments' shapes, checkpoints resume exactly."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from helpers import train
from helpers.dataset import build_loaders, make_synthetic_cifar, summarize
from helpers.recipes import S8, S10


class TinyNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: small enough for CPU tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.norm = nn.GroupNorm(1, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.norm(self.features(x)).mean((2, 3)))


def tiny_setup(recipe, n_train=320, n_test=160, batch=32, seed=0):
    """Loaders over synthetic, learnable data, with no workers (deterministic and fast)."""
    data = make_synthetic_cifar(n_train, n_test, seed=seed)
    stats = summarize(data)
    return build_loaders(data, recipe, stats.mean, stats.std, seed=seed, batch_size=batch,
                         num_workers=0)


def test_fit_learns_a_separable_problem():
    recipe = S10.with_overrides(epochs=6)
    train_loader, test_loader = tiny_setup(recipe)
    torch.manual_seed(0)
    result = train.fit(TinyNet(), train_loader, test_loader, recipe, torch.device("cpu"),
                       max_lr=0.05, progress=False)
    history = result.history
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.9
    assert result.best_acc == max(r["test_acc"] for r in history)


def one_cycle_lrs(epochs=24, steps=10, max_lr=0.1):
    """The LR of every step of the S10 schedule."""
    recipe = S10.with_overrides(epochs=epochs)
    optimizer = train.build_optimizer(nn.Linear(2, 2), recipe)
    scheduler = train.build_scheduler(optimizer, recipe, steps, max_lr)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


def test_one_cycle_peaks_at_the_end_of_epoch_5_of_24_without_annihilation():
    lrs = one_cycle_lrs()
    assert int(np.argmax(lrs)) == 5 * 10 - 1  # the last batch of epoch 5
    assert lrs.max() == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(0.1 / S10.onecycle.div_factor)
    assert lrs[-1] == pytest.approx(lrs[0]), "no annihilation: the last LR is the starting LR"
    rise, fall = np.diff(lrs[:50]), np.diff(lrs[49:])
    assert (rise > 0).all() and (fall < 0).all(), "two phases, monotonic"
    np.testing.assert_allclose(rise, rise[0], rtol=1e-6)  # linear
    np.testing.assert_allclose(fall, fall[0], rtol=1e-6)


def test_short_runs_keep_the_recipe_proportions():
    lrs = one_cycle_lrs(epochs=2, steps=24)
    assert int(np.argmax(lrs)) == round(48 * 5 / 24) - 1


def test_plateau_lowers_the_lr_after_patience_epochs_and_not_before():
    optimizer = train.build_optimizer(nn.Linear(2, 2), S8)
    scheduler = train.build_scheduler(optimizer, S8, steps_per_epoch=10)
    patience, factor = S8.plateau.patience, S8.plateau.factor
    lrs = []
    # improves for 3 epochs, then stalls (a gain below the 0.001 threshold is not an improvement)
    for acc in [0.50, 0.60, 0.70] + [0.7005] * (patience + 2):
        scheduler.step(acc)
        lrs.append(optimizer.param_groups[0]["lr"])
    stall = 3
    assert lrs[: stall + patience] == [S8.lr] * (stall + patience)
    assert lrs[stall + patience] == pytest.approx(S8.lr * factor)


def test_plateau_is_stepped_once_per_epoch(monkeypatch):
    calls = []
    original = torch.optim.lr_scheduler.ReduceLROnPlateau.step
    monkeypatch.setattr(torch.optim.lr_scheduler.ReduceLROnPlateau, "step",
                        lambda self, metric: calls.append(metric) or original(self, metric))
    recipe = S8.with_overrides(epochs=3)
    train_loader, test_loader = tiny_setup(recipe, n_train=64, n_test=32)
    result = train.fit(TinyNet(), train_loader, test_loader, recipe, torch.device("cpu"),
                       progress=False)
    assert calls == [r["test_acc"] for r in result.history]


def test_weight_decay_skips_norm_and_bias_parameters():
    groups = train.parameter_groups(TinyNet(), 5e-4)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert len(groups[1]["params"]) == 4  # conv bias, norm weight and bias, fc bias


def test_checkpoint_round_trip_is_atomic(tmp_path):
    path = tmp_path / "deep" / "ck.pt"
    state = {"model": TinyNet().state_dict(), "epoch": 3, "history": [{"epoch": 1}]}
    train.save_checkpoint(path, state)
    loaded = train.load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [{"epoch": 1}]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"], "no temporary file left"


def test_failed_write_leaves_no_file(tmp_path):
    def explode(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        train.atomic_write(tmp_path / "out.json", explode)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_foreign_file_names_it(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot read checkpoint .*notes.pt"):
        train.load_checkpoint(bad)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    recipe = S10.with_overrides(epochs=3)
    device = torch.device("cpu")

    def run(checkpoint_dir, stop_after=None):
        train_loader, test_loader = tiny_setup(recipe, n_train=96, n_test=32)
        torch.manual_seed(0)
        model = TinyNet()

        def maybe_stop(row):
            if row["epoch"] == stop_after:
                raise Interrupt

        try:
            result = train.fit(model, train_loader, test_loader, recipe, device, max_lr=0.05,
                               checkpoint_dir=checkpoint_dir, progress=False,
                               on_epoch_end=maybe_stop)
        except Interrupt:
            return None, None
        return model, result

    straight_model, straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_after=2) == (None, None)
    assert train.load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    resumed_model, resumed = run(tmp_path / "b")
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    keys = ("epoch", "lr", "train_loss", "test_acc")
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert [got[k] for k in keys] == pytest.approx([want[k] for k in keys])
    assert (tmp_path / "b" / "best.pt").exists()


def test_resume_refuses_other_settings(tmp_path):
    recipe = S10.with_overrides(epochs=1)
    train_loader, test_loader = tiny_setup(recipe, n_train=32, n_test=16)
    device = torch.device("cpu")
    train.fit(TinyNet(), train_loader, test_loader, recipe, device, max_lr=0.05,
              checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different settings.*epochs"):
        train.fit(TinyNet(), train_loader, test_loader, recipe.with_overrides(epochs=2), device,
                  max_lr=0.05, checkpoint_dir=tmp_path, progress=False)


def test_lr_range_test_sweeps_exponentially_and_restores_state():
    recipe = S10
    train_loader, _ = tiny_setup(recipe, n_train=128, batch=16)
    model = TinyNet()
    optimizer = train.build_optimizer(model, recipe, lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train.lr_range_test(model, train_loader, optimizer, nn.CrossEntropyLoss(),
                                 torch.device("cpu"), 1e-4, 10.0, num_iter=60, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), "weights restored"
    assert optimizer.state_dict()["state"] == {} and optimizer.param_groups[0]["lr"] == 1e-3
    assert all(p.grad is None for p in model.parameters())
    ratios = np.diff(np.log(result.lrs))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
    assert result.lrs[0] == pytest.approx(1e-4)
    assert len(result.lrs) < 60, "an LR up to 10 diverges and the sweep stops early"
    assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)
    assert result.min_loss_lr == result.lrs[int(np.argmin(result.losses))]
    assert result.losses[int(np.argmin(result.losses))] < result.losses[0]


def test_select_misclassified_rule():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    predictions = train.Predictions(probs, probs.argmax(1), np.array([0, 0, 0, 1, 0]))
    # wrong: 1 (0.8), 2 (0.6), 3 (0.7), 4 (0.8); most confident first, ties by index
    assert train.select_misclassified(predictions, 3).tolist() == [1, 4, 3]
    assert train.select_misclassified(predictions, 20).tolist() == [1, 4, 3, 2]
    assert predictions.accuracy == pytest.approx(0.2)


def test_predict_keeps_dataset_order_and_refuses_shuffled_loaders():
    train_loader, test_loader = tiny_setup(S10, n_train=32, n_test=40, batch=8)
    predictions = train.predict(TinyNet(), test_loader, torch.device("cpu"), progress=False)
    np.testing.assert_array_equal(predictions.labels, test_loader.dataset.labels)
    np.testing.assert_allclose(predictions.probs.sum(1), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="unshuffled"):
        train.predict(TinyNet(), train_loader, torch.device("cpu"), progress=False)


def test_pick_device_and_runtime_on_cpu():
    assert train.pick_device("cpu").type == "cpu"
    runtime = train.Runtime.for_device(torch.device("cpu"))
    assert runtime == train.Runtime() and not runtime.scaler(torch.device("cpu")).is_enabled()
    meta = train.run_metadata(torch.device("cpu"))
    assert {"torch", "device", "time_utc", "albumentations"} <= meta.keys()


def test_recipes_hold_the_assignment_values():
    assert (S10.model, S10.optimizer, S10.batch_size, S10.epochs) == ("custom_resnet", "adam", 512, 24)
    assert (S10.onecycle.peak_epoch, S10.onecycle.final_div_factor) == (5, 1.0)
    assert (S10.augment.crop_padding, S10.augment.hflip_p, S10.augment.cutout_size) == (4, 0.5, 8)
    assert (S8.model, S8.model_kwargs["norm"], S8.epochs, S8.scheduler) == ("resnet18", "ln", 40, "plateau")
    assert (S8.augment.cutout_size, S8.augment.rotate_limit, S8.augment.hflip_p) == (16, 5.0, 0.0)
    assert dataclasses.replace(S8).gradcam_layer == "layer3" and S10.gradcam_layer == "layer2"


def stop_after_one_epoch(model, loaders, recipe, checkpoint_dir):
    """Train until the first checkpoint is written, then interrupt, as a dropped session would."""
    def interrupt(row):
        raise Interrupt

    with pytest.raises(Interrupt):
        train.fit(model, *loaders, recipe, torch.device("cpu"), max_lr=0.05,
                  checkpoint_dir=checkpoint_dir, progress=False, on_epoch_end=interrupt)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_cuda_runtime_uses_bf16_only_where_it_is_native(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    runtime = train.Runtime.for_device(torch.device("cuda"))
    assert runtime.amp_dtype == dtype and runtime.channels_last
    assert train.Runtime.for_device(torch.device("cuda"), fast=False) == train.Runtime()


def test_resume_refuses_another_data_size(tmp_path):
    recipe = S10.with_overrides(epochs=2)
    device = torch.device("cpu")
    loaders = tiny_setup(recipe, n_train=64, n_test=16)
    stop_after_one_epoch(TinyNet(), loaders, recipe, tmp_path)
    with pytest.raises(train.CheckpointError, match="train_size, steps_per_epoch"):
        train.fit(TinyNet(), *tiny_setup(recipe, n_train=96, n_test=16), recipe, device,
                  max_lr=0.05, checkpoint_dir=tmp_path, progress=False)


def test_resume_from_a_run_without_loss_scaling_into_one_with_it(tmp_path):
    # bf16 or CPU runs save an empty scaler state; an fp16 session (a T4) must still resume.
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    recipe = S10.with_overrides(epochs=2)
    device = torch.device("cpu")
    stop_after_one_epoch(TinyNet(), tiny_setup(recipe, n_train=32, n_test=16), recipe, tmp_path)
    assert train.load_checkpoint(tmp_path / "last.pt")["scaler"] == {}

    class Fp16Like(train.Runtime):
        def scaler(self, device):
            return scaler

    result = train.fit(TinyNet(), *tiny_setup(recipe, n_train=32, n_test=16), recipe, device,
                       Fp16Like(), max_lr=0.05, checkpoint_dir=tmp_path, progress=False)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
