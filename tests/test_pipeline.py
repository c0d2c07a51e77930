"""The pipeline: settings from the environment, checks before any work, JSON without NaN, cells run again."""

import json
import math
import re
from dataclasses import replace

import pytest

from helpers import pipeline
from helpers.dataset import build_loaders, channel_mean_std
from helpers.lr_finder import lr_range_test
from helpers.models import CustomResNet
from helpers.pipeline import RunOptions, SettingsError, save_json, start_run, variant_folder
from helpers.recipes import RANGES, S8, S9, S10, OverrideError, differences, keys, metavar, override
from helpers.train import Checkpoint, fit


def test_notebook_options_come_from_defaults_then_the_environment():
    env = {"CIFAR_RESUME": "0", "CIFAR_OUT": "x/{recipe}", "CIFAR_DATA_DIR": " ", "CIFAR_SEED": "3",
           "CIFAR10_URLS": "http://127.0.0.1:1/x"}  # not a CIFAR_ option: the downloader's
    options = RunOptions.from_env(env, data_dir="data", download=True)
    assert (options.resume, options.seed, options.download) == (False, 3, True)
    assert options.data_dir == "data"  # blank values are unset
    assert str(options.out_dir(S10)) == "x/s10-seed=3"  # the seed's own folder


def test_a_run_is_the_assignments_exactly_when_its_recipe_is():
    smoke = override(S10, "epochs=1 train_subset=256 lr_finder.num_iter=6")
    assert differences(smoke) == {"epochs": 1, "train_subset": 256, "lr_finder.num_iter": 6}
    assert not pipeline.is_full_run(smoke, RunOptions())
    assert pipeline.is_full_run(override(S10, ""), RunOptions())
    assert pipeline.is_full_run(override(S8, f"lr={S8.lr}"), RunOptions()), "the recipe's own value"
    assert not pipeline.is_full_run(S8, RunOptions(synthetic=True)), "made-up images are no result"


@pytest.mark.parametrize("assignment", [
    "epochs=two", "epoch=2", "optimizer=rmsprop", "epochs=0", "label_smoothing=1", "weight_decay=nan",
    "lr=0.1", "name=s9", "augment.cutout_p=1.5", "epochs", "model_kwargs=(1,2)", "momentum=nan",
    "augment.hflip_p=2", "augment.cutout_size=64", "num_misclassified=-1", "lr_finder.end_lr=1e-6",
    "onecycle.peak_epoch=0", "model=resnet18", "scheduler=plateau", "augment=1", "model_kwargs.norm=bn",
    "nesterov=maybe", "optimizer=sgd momentum=0", "lr_finder.start_lr=1 lr_finder.end_lr=1",
    "plateau.patience=3", "test_subset=0", "onecycle.anneal=cosine", "gradcam_layer=layer3",
    "num_misclassified=0",
])
def test_an_override_of_an_unknown_key_a_wrong_type_or_a_value_out_of_range_is_refused(assignment):
    with pytest.raises(OverrideError):
        override(S10, assignment)


def test_another_optimizer_must_bring_its_own_lr_where_the_recipe_fixes_one():
    with pytest.raises(OverrideError):  # S9's fixed peak was chosen for SGD
        override(S9, "optimizer=adam")
    assert override(S9, "optimizer=adam onecycle.max_lr=0.01").onecycle.max_lr == 0.01
    assert override(S10, "optimizer=sgd").optimizer == "sgd"  # S10's range test picks the peak anyway


def test_a_dict_override_is_merged_and_may_hold_spaces():
    plain = override(S8, "model_kwargs={'zero_init_residual': False,  'norm': 'bn'} epochs=3")
    assert plain.model_kwargs == {"norm": "bn", "zero_init_residual": False} and plain.epochs == 3
    assert override(S8, "model_kwargs={'zero_init_residual': False}").model_kwargs["norm"] == "ln"  # merged
    assert override(S8, ["model_kwargs={'zero_init_residual': False,  'norm': 'bn'}", "epochs=3"]) == plain


def test_overrides_read_none_booleans_and_choices():
    tuned = override(S9, "train_subset=256 nesterov=false onecycle.anneal=cos")
    assert differences(tuned) == {"train_subset": 256, "nesterov": False, "onecycle.anneal": "cos"}
    assert override(S10, "onecycle.max_lr=0.01 onecycle.max_lr=none") == S10
    with pytest.raises(OverrideError):  # S9 fixes its peak: its notebook runs no range test
        override(S9, "onecycle.max_lr=none")
    assert override(tuned, "train_subset=None").train_subset is None


def test_every_number_a_recipe_holds_has_a_range():
    assert {key for key, hint in keys().items() if metavar(hint) in ("INT", "FLOAT")} == set(RANGES)


@pytest.mark.parametrize("env", [{"CIFAR_RESUME": "maybe"}, {"CIFAR_SEED": "x"}, {"CIFAR_SEED": "-1"},
                                 {"CIFAR_EPOCHS": "2"}])  # a recipe value belongs in CIFAR_OVERRIDES
def test_bad_environment_values_are_one_line_errors(env):
    with pytest.raises(SettingsError) as refused:
        RunOptions.from_env(env)
    assert "\n" not in str(refused.value)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    save_json(tmp_path / "m.json", {"loss": math.nan, "rows": [{"acc": math.inf}, 0.5]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": None, "rows": [{"acc": None}, 0.5]}


def test_starting_a_run_checks_everything_and_creates_nothing(tmp_path):
    out = tmp_path / "runs" / "s9"
    run = start_run(S9, RunOptions(synthetic=True, out=str(out)))
    assert run.resume_state is None and not (tmp_path / "runs").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingsError):  # a run folder inside a file
        start_run(S9, RunOptions(synthetic=True, out=str(tmp_path / "file" / "s9")))
    with pytest.raises(SettingsError):  # a value no run can use, as a recipe edited by hand has
        start_run(replace(S9, epochs=0), RunOptions(synthetic=True, out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cells_executed_again_after_training_reuse_the_run_instead_of_redoing_it(tmp_path):
    recipe = override(S10, "epochs=1 batch_size=32 train_subset=64 test_subset=40 lr_finder.num_iter=5")
    run = start_run(recipe, RunOptions(synthetic=True, out=str(tmp_path / "s10"), progress=False))
    data = pipeline.load_run_data(run)
    mean, std = channel_mean_std(data.train_images)
    train_loader, test_loader = build_loaders(data, recipe, mean, std, seed=0, num_workers=0)
    model = CustomResNet()
    assert pipeline.saved_range_test(run) is None  # nothing to resume: the notebook tests
    finder = lr_range_test(model, train_loader, recipe, run.runtime, progress=False)

    def training_cell():
        checkpoint = Checkpoint(run.out, keep={"lr_finder": finder.as_dict()})
        return fit(model, train_loader, test_loader, recipe, run.runtime, finder.suggested_lr, checkpoint,
                   progress=False)

    first = training_cell()
    again = pipeline.saved_range_test(run)  # the range-test cell executed again: the run's own test
    assert again == finder
    second = training_cell()
    assert (first.resumed_from_epoch, second.resumed_from_epoch) == (0, 1) and second.history == first.history


def test_each_variant_has_its_own_readable_folder_name():
    assert variant_folder(S8) == "s8" and variant_folder(override(S8, f"epochs={S8.epochs}")) == "s8"
    assert variant_folder(override(S8, "model_kwargs={'norm': 'bn'}")) == "s8-norm=bn"
    assert variant_folder(S10, seed=1) == "s10-seed=1"
    assert variant_folder(override(S8, "model=resnet34 augment.cutout_p=0.25"), 2) == \
        "s8-model=resnet34-augment.cutout_p=0.25-seed=2"
    long = override(S9, "epochs=1 train_subset=256 test_subset=128 batch_size=32 label_smoothing=0.1")
    odd = override(S8, "model_kwargs={'norm': 'gn', 'note': 'a b/c'}")
    for recipe in (long, odd):  # too long, or not a plain folder name: the recipe and a short hash
        name = variant_folder(recipe)
        assert re.fullmatch(rf"{recipe.name}-[0-9a-f]{{8}}", name) and name == variant_folder(recipe)
    assert variant_folder(long) != variant_folder(long, seed=1)


def test_only_s8_swaps_its_network_and_only_between_the_resnets():
    assert override(S8, "model=resnet34").model == "resnet34"
    for recipe, model in ((S8, "resnet50"), (S8, "custom_resnet"), (S9, "resnet18"), (S10, "resnet34")):
        with pytest.raises(OverrideError):
            override(recipe, f"model={model}")
