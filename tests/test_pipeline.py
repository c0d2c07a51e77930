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
from helpers.pipeline import RunSettings, SettingsError, save_json, start_run
from helpers.recipes import S8


def test_notebook_settings_come_from_defaults_then_the_environment():
    env = {"CIFAR_EPOCHS": "3", "CIFAR_RESUME": "0", "CIFAR_MAX_LR": "0.02", "CIFAR_OUT": "x/{recipe}",
           "CIFAR_DATA_DIR": " ", "CIFAR_UNRELATED": "1", "CIFAR_DIV_FACTOR": "50"}
    settings = RunSettings.from_env("s10", env, data_dir="data", download=True)
    assert (settings.epochs, settings.resume, settings.max_lr, settings.download) == (3, False, 0.02, True)
    assert settings.div_factor == 50.0 and settings.recipe_object().onecycle.div_factor == 50.0
    assert settings.data_dir == "data" and str(settings.out_dir) == "x/s10"  # blank values are unset
    assert not settings.is_full_run and RunSettings.from_env("s10", {}).is_full_run


def test_a_notebook_can_set_the_plateau_recipes_starting_lr():
    settings = RunSettings.from_env("s8", {"CIFAR_LR": "0.02"})
    assert settings.recipe_object().lr == 0.02 and not settings.is_full_run
    assert RunSettings.from_env("s8", {"CIFAR_LR": str(S8.lr)}).is_full_run, "the recipe's own LR"


def test_strides_change_the_model_kwargs_only_when_they_differ_from_the_recipe():
    late = RunSettings.from_env("s8", {"CIFAR_STRIDES": "1, 2, 2, 1"})
    assert late.recipe_object().model_kwargs == {"norm": "ln", "zero_init_residual": True,
                                                 "strides": (1, 2, 2, 1)}
    assert not late.is_full_run
    usual = RunSettings.from_env("s8", {"CIFAR_STRIDES": "1,2,2,2"})
    assert usual.recipe_object() == RunSettings("s8").recipe_object() and usual.is_full_run


def test_a_resumed_run_is_full_when_its_settings_are_and_its_range_test_was():
    launched_with_flags, full = {"full_run": False}, {"full_run": True}
    # S8 has no range test: the resume signature already proved the earlier training identical
    assert pipeline.is_full_run(RunSettings("s8"), [launched_with_flags, full])
    assert not pipeline.is_full_run(RunSettings("s8", patience=1), [full, full])
    # S10's max LR comes from a range test whose length the signature does not cover
    assert not pipeline.is_full_run(RunSettings("s10"), [launched_with_flags, full])
    assert pipeline.is_full_run(RunSettings("s10"), [full, full])


@pytest.mark.parametrize("env, message", [
    ({"CIFAR_EPOCHS": "two"}, "CIFAR_EPOCHS='two' is not a valid int"),
    ({"CIFAR_RESUME": "maybe"}, "CIFAR_RESUME='maybe' is not a valid bool"),
    ({"CIFAR_MAX_LR": "-1"}, "max_lr must be a positive finite number"),
    ({"CIFAR_WEIGHT_DECAY": "1e-4x"}, "CIFAR_WEIGHT_DECAY='1e-4x' is not a valid float"),
    ({"CIFAR_LABEL_SMOOTHING": "-0.1"}, r"label_smoothing must be in \[0, 1\), got -0.1"),
])
def test_bad_environment_values_are_one_line_errors(env, message):
    with pytest.raises(SettingsError, match=message):
        RunSettings.from_env("s10", env)


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
        settings = RunSettings(recipe="s9", synthetic=True, out=str(out), progress=False)
        with pytest.raises(SettingsError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            start_run(settings)
        assert sorted(os.listdir(out)) == [".lock"]  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start_run(settings)  # the kill released the lock: nothing stale to clean by hand
    start_run(settings)  # and this process may start again (a notebook executed twice)


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
    settings = RunSettings(recipe="s10", synthetic=True, epochs=1, batch_size=32, train_subset=64,
                           test_subset=40, lr_finder_iters=5, out=str(tmp_path / "s10"), progress=False)
    run = start_run(settings)
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
    def resolve(settings):
        """Execute the notebook's cells up to the max LR, as a fresh process would."""
        run = start_run(settings)
        data, summary = pipeline.load_run_data(run)
        train_loader, _ = pipeline.build_run_loaders(run, data, summary)
        assert run.resume_state is None  # stopped before the first epoch: no last.pt
        return pipeline.resolve_max_lr(run, pipeline.build_run_model(run), train_loader)

    settings = RunSettings(recipe="s10", synthetic=True, epochs=1, batch_size=16, train_subset=32,
                           test_subset=16, lr_finder_iters=4, out=str(tmp_path / "s10"), progress=False)
    first = resolve(settings)
    real_test, calls = pipeline.lr_range_test, []
    monkeypatch.setattr(pipeline, "lr_range_test", lambda *a, **k: calls.append(1) or real_test(*a, **k))
    again = resolve(settings)
    assert (first.source, again.source) == ("range test", "saved range test") and calls == []
    assert (again.value, again.finder.losses) == (first.value, first.finder.losses)
    assert resolve(replace(settings, seed=1)).source == "range test"  # another init: tested again
    run = start_run(replace(settings, seed=1))
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
