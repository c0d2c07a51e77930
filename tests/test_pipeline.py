"""The pipeline: settings from the environment, JSON without NaN, one process per run folder."""

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest

from helpers import pipeline
from helpers.pipeline import RunOptions, SettingsError, save_json, start_run
from helpers.recipes import S8, S9, S10, OverrideError, differences, override


def test_notebook_options_come_from_defaults_then_the_environment():
    env = {"CIFAR_RESUME": "0", "CIFAR_OUT": "x/{recipe}", "CIFAR_DATA_DIR": " ", "CIFAR_SEED": "3",
           "CIFAR10_URLS": "http://127.0.0.1:1/x"}  # not a CIFAR_ option: the downloader's
    options = RunOptions.from_env(env, data_dir="data", download=True)
    assert (options.resume, options.seed, options.download) == (False, 3, True)
    assert options.data_dir == "data" and str(options.out_dir(S10)) == "x/s10"  # blank values are unset


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
    "onecycle.peak_epoch=0",
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
    late = override(S8, "model_kwargs={'strides': (1, 2, 2, 1)} epochs=3")
    assert late.model_kwargs == S8.model_kwargs | {"strides": (1, 2, 2, 1)} and late.epochs == 3


@pytest.mark.parametrize("env", [{"CIFAR_RESUME": "maybe"}, {"CIFAR_SEED": "x"}, {"CIFAR_SEED": "-1"},
                                 {"CIFAR_EPOCHS": "2"}])  # a recipe value belongs in CIFAR_OVERRIDES
def test_bad_environment_values_are_one_line_errors(env):
    with pytest.raises(SettingsError) as refused:
        RunOptions.from_env(env)
    assert "\n" not in str(refused.value)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    save_json(tmp_path / "m.json", {"loss": math.nan, "rows": [{"acc": math.inf}, 0.5]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": None, "rows": [{"acc": None}, 0.5]}


def test_a_run_folder_holds_one_process_at_a_time_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from helpers.pipeline import lock_run_folder; lock_run_folder(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        options = RunOptions(synthetic=True, out=str(out), progress=False)
        with pytest.raises(SettingsError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            start_run(S9, options)
        assert sorted(os.listdir(out)) == [".lock"]  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start_run(S9, options)  # the kill released the lock: nothing stale to clean by hand
    start_run(S9, options)  # and this process may start again (a notebook executed twice)


def test_a_run_folder_left_holding_only_its_lock_is_released_and_removed_if_the_run_made_it(tmp_path):
    made, existing, used = tmp_path / "runs" / "made", tmp_path / "existing", tmp_path / "used"
    existing.mkdir()
    for out in (made, existing, used):
        pipeline.lock_run_folder(out)
    (used / "last.pt").write_bytes(b"a checkpoint")
    assert pipeline.release_unused_run_folder(made) and not (tmp_path / "runs").exists()
    assert pipeline.release_unused_run_folder(existing) and os.listdir(existing) == []
    assert not pipeline.release_unused_run_folder(used)  # it holds a run's file: kept, still locked
    assert sorted(os.listdir(used)) == [".lock", "last.pt"]
    assert not pipeline.release_unused_run_folder(tmp_path / "never-locked")
    pipeline.lock_run_folder(made)  # released for real: the folder can be taken again
    assert os.listdir(made) == [".lock"]


def test_cells_executed_again_after_training_reuse_the_run_instead_of_redoing_it(tmp_path, monkeypatch):
    recipe = override(S10, "epochs=1 batch_size=32 train_subset=64 test_subset=40 lr_finder.num_iter=5")
    run = start_run(recipe, RunOptions(synthetic=True, out=str(tmp_path / "s10"), progress=False))
    data, summary = pipeline.load_run_data(run)
    train_loader, test_loader = pipeline.build_run_loaders(run, data, summary)
    model = pipeline.build_run_model(run)
    max_lr = pipeline.resolve_max_lr(run, model, train_loader)
    first = pipeline.train_run(run, model, train_loader, test_loader, max_lr)
    assert max_lr.source == "range test" and first.resumed_from_epoch == 0

    def no_second_test(*args, **kwargs):
        raise AssertionError("a range test on trained weights")
    monkeypatch.setattr(pipeline, "lr_range_test", no_second_test)
    again = pipeline.resolve_max_lr(run, model, train_loader)  # the LR cell executed again
    assert (again.source, again.value, again.finder.min_loss_lr) == ("checkpoint", max_lr.value,
                                                                    max_lr.finder.min_loss_lr)
    second = pipeline.train_run(run, model, train_loader, test_loader, again)  # the training cell
    assert second.resumed_from_epoch == 1 and second.history == first.history


def test_a_range_test_is_kept_for_an_execution_stopped_before_its_first_checkpoint(tmp_path, monkeypatch):
    recipe = override(S10, "epochs=1 batch_size=16 train_subset=32 test_subset=16 lr_finder.num_iter=4")

    def resolve(options):
        """Execute the notebook's cells up to the max LR, as a fresh process would."""
        run = start_run(recipe, options)
        data, summary = pipeline.load_run_data(run)
        train_loader, _ = pipeline.build_run_loaders(run, data, summary)
        assert run.resume_state is None  # stopped before the first epoch: no last.pt
        return pipeline.resolve_max_lr(run, pipeline.build_run_model(run), train_loader)

    settings = RunOptions(synthetic=True, out=str(tmp_path / "s10"), progress=False)
    first = resolve(settings)
    real_test, calls = pipeline.lr_range_test, []
    monkeypatch.setattr(pipeline, "lr_range_test", lambda *a, **k: calls.append(1) or real_test(*a, **k))
    again = resolve(settings)
    assert (first.source, again.source) == ("range test", "saved range test") and calls == []
    assert (again.value, again.finder.losses) == (first.value, first.finder.losses)
    assert resolve(replace(settings, seed=1)).source == "range test"  # another init: tested again
    run = start_run(recipe, replace(settings, seed=1))
    data, summary = pipeline.load_run_data(run)
    loader, _ = pipeline.build_run_loaders(run, data, summary)
    assert pipeline.range_test_signature(run, pipeline.build_run_model(run), loader)["seed"] == 1
    (tmp_path / "s10" / pipeline.RANGE_TEST_FILE).write_bytes(b"torn")  # unreadable: tested again
    assert resolve(settings).source == "range test" and len(calls) == 2


def test_a_folder_on_a_filesystem_without_locks_still_runs_and_resumes(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from helpers.__main__ import main

    def no_locks_here(fd, operation):  # Google Drive's mount in Colab, some network filesystems
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks_here)
    out = tmp_path / "drive" / "s9"
    tiny = ["train", "--recipe", "s9", "--synthetic", "--epochs", "1", "--batch-size", "32",
            "--train-subset", "64", "--test-subset", "32", "--no-progress", "--device", "cpu",
            "--workers", "0", "--out", str(out)]
    assert main(tiny) == 0 and (out / "last.pt").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1, "one line warns it is not locked"
    assert main(tiny) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_epoch"] == 1
