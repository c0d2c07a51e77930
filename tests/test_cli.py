"""The headless command: it runs end to end, writes its files, resumes, and refuses bad input
with one line and exit status 2 before any work."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers import lr_finder, pipeline, train
from helpers.__main__ import main
from helpers.recipes import S8

TINY = ["--synthetic", "--epochs", "1", "--batch-size", "32", "--train-subset", "64",
        "--test-subset", "40", "--no-progress", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def s10_run(tmp_path_factory):
    """One finished tiny S10 run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli") / "s10"
    args = ["train", "--recipe", "s10", "--lr-finder-iters", "5", "--out", str(out)] + TINY
    assert main(args) == 0
    return out, args, json.loads((out / "metrics.json").read_text())


def test_a_run_writes_metrics_checkpoints_and_figures(s10_run):
    out, _, metrics = s10_run
    assert metrics["recipe"] == "s10" and metrics["epochs"] == 1 and not metrics["full_run"]
    assert metrics["lr_finder"]["iterations"] <= 5 and metrics["max_lr_source"] == "range test"
    assert metrics["max_lr"] == metrics["lr_finder"]["suggested_lr"] > 0
    assert metrics["final_test_acc"] == metrics["history"][-1]["test_acc"] == metrics["predict_acc"]
    assert metrics["data"] == {"source": "synthetic(seed=0)", "copy": "synthetic", "train": 64, "test": 40}
    assert metrics["metadata"]["device"] == "cpu" and metrics["settings"]["recipe"] == "s10"
    assert metrics["resumes"] == 0 and len(metrics["sessions"]) == 1
    # each session names the code that trained it (metadata names the code that finished the run)
    assert metrics["sessions"][0]["git_commit"] == metrics["metadata"]["git_commit"] is not None
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "last.pt", "best.pt", "samples.png", "class_distribution.png",
            "augmentations.png", "lr_finder.png", "history.png"} <= names
    if metrics["misclassified_indices"]:
        assert {"misclassified.png", "gradcam.png", "gradcam_true.png"} <= names
    # .lock stays (the OS frees the lock with its process); nothing else hidden may
    assert [n for n in names if n.startswith(".")] == [".lock"], "no temporary files left"


def test_a_rerun_keeps_the_checkpoint_lr_and_range_test_and_trains_nothing(s10_run, monkeypatch):
    out, args, first = s10_run
    (out / "lr_finder.png").unlink()
    monkeypatch.setattr(pipeline, "lr_range_test", lambda *a, **k: pytest.fail("range test rerun"))
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: pytest.fail("trained again"))
    assert main(args) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["max_lr"] == first["max_lr"] and again["max_lr_source"] == "checkpoint"
    assert again["lr_finder"] == first["lr_finder"] and (out / "lr_finder.png").exists()
    assert again["history"] == first["history"] and again["resumed_from_epoch"] == 1


def test_a_killed_run_resumes_and_counts_its_sessions(tmp_path, monkeypatch):
    out = tmp_path / "s9"  # the smallest network: this test is about sessions, not the model
    args = ["train", "--recipe", "s9", "--out", str(out)] + [a if a != "1" else "2" for a in TINY]
    original = train.save_checkpoint

    def killed_after_first_epoch(path, state):
        original(path, state)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed_after_first_epoch)
    assert main(args) == 130
    monkeypatch.setattr(train, "save_checkpoint", original)
    (out / ".last.pt.tmp999999").write_bytes(b"left by a SIGKILL")
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and metrics["resumes"] == 1
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert [s["from_epoch"] for s in metrics["sessions"]] == [0, 1]
    assert not (out / ".last.pt.tmp999999").exists()
    assert metrics["lr_finder"] is None and "lr_finder.png" not in {p.name for p in out.iterdir()}


def test_ctrl_c_is_one_line_with_where_to_resume(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit", interrupt)
    assert main(["train", "--recipe", "s8", "--out", str(tmp_path / "o")] + TINY) == 130
    err = capsys.readouterr().err.strip()
    assert err == "interrupted; no epoch was saved yet; run the same command to resume"


def test_a_sigterm_stop_exits_with_the_shells_status_for_it(tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        raise train.TrainingStopped(signal.SIGTERM)

    monkeypatch.setattr(pipeline, "fit", stopped)
    assert main(["train", "--recipe", "s8", "--out", str(tmp_path / "o")] + TINY) == 128 + 15


def test_tuning_overrides_reach_the_optimizer_and_the_loss_and_mark_the_run_not_full(tmp_path, monkeypatch,
                                                                                     capsys):
    out = tmp_path / "s9"
    args = ["train", "--recipe", "s9", "--out", str(out), "--weight-decay", "0.003",
            "--label-smoothing", "0.25", "--div-factor", "40", "--final-div-factor", "1000",
            "--anneal", "cos"] + TINY
    smoothing = []
    original_loss = train.nn.CrossEntropyLoss

    def recording_loss(*a, **k):
        smoothing.append(k.get("label_smoothing"))
        return original_loss(*a, **k)

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", recording_loss)
    assert main(args) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.003, 0.0]
    # S9's fixed peak 0.2: One Cycle starts at 0.2/40 and ends 1000 times lower (the recipe: 200)
    assert groups[0]["initial_lr"] == pytest.approx(0.2 / 40) and groups[0]["max_lr"] == 0.2
    assert groups[0]["min_lr"] == pytest.approx(0.2 / 40 / 1000)
    assert smoothing and set(smoothing) == {0.25}
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert (settings["weight_decay"], settings["label_smoothing"]) == (0.003, 0.25)
    assert (settings["div_factor"], settings["final_div_factor"], settings["anneal"]) == (40, 1000, "cos")
    assert not metrics["full_run"]
    # each override alone is part of what a checkpoint must match: without it, resuming is refused
    for flag, change in [("--weight-decay", "weight_decay 0.003 -> 0.0005"),
                         ("--label-smoothing", "label_smoothing 0.25 -> 0.0"),
                         ("--div-factor", "onecycle.div_factor 40.0 -> 20.0"),
                         ("--final-div-factor", "onecycle.final_div_factor 1000.0 -> 200.0"),
                         ("--anneal", "onecycle.anneal 'cos' -> 'linear'")]:
        at = args.index(flag)
        assert main(args[:at] + args[at + 2:]) == 2
        assert change in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--weight-decay=-1e-4"], "weight_decay must be a finite number >= 0, got -0.0001"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1), got 1.0"),
    (["--div-factor", "1"], "div_factor must be a finite number > 1, got 1.0"),
    (["--final-div-factor", "0.5"], "final_div_factor must be a finite number >= 1, got 0.5"),
    (["--final-div-factor", "inf"], "final_div_factor must be a finite number >= 1, got inf"),
    (["--max-lr", "0"], "max_lr must be a positive finite number, got 0.0"),
    (["--max-lr", "-0.01"], "max_lr must be a positive finite number"),
    (["--max-lr", "nan"], "max_lr must be a positive finite number, got nan"),
    (["--max-lr", "inf"], "max_lr must be a positive finite number, got inf"),
    (["--lr", "0"], "lr must be a positive finite number, got 0.0"),
    (["--lr", "nan"], "lr must be a positive finite number, got nan"),
    (["--lr-finder-iters", "1"], "lr_finder_iters must be at least 2, got 1"),
    (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**32)], "seed must be in [0, 2**32)"),
    (["--workers", "-1"], "workers must be 0 or more, got -1"),
    (["--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--device", "cuda"], "device 'cuda' is not available on this machine"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the cuda case, also on a GPU machine
    out = tmp_path / "never"
    assert main(["train", "--recipe", "s10", "--synthetic", "--out", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists(), "nothing was written"


def test_a_range_test_without_a_suggestion_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    real_suggest = lr_finder.suggest_lr

    def diverged(lrs, smoothed, raw, fraction=0.1):
        return real_suggest(lrs, [float("nan")] * len(lrs), raw, fraction)  # every loss non-finite

    monkeypatch.setattr(lr_finder, "suggest_lr", diverged)
    args = ["train", "--recipe", "s10", "--lr-finder-iters", "5", "--out", str(tmp_path / "o")]
    assert main(args + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the LR range test diverged at once") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--recipe", "s7"], "argument --recipe: invalid choice: 's7'"),
    (["train", "--recipe", "s8", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["train", "--recipe", "s8", "--out", "runs/{recipe.name}"], "the only placeholder allowed is {recipe}"),
])
def test_flags_argparse_or_the_settings_refuse_are_one_line_too(capsys, argv, message):
    try:
        code = main(argv + ["--synthetic"])
    except SystemExit as exit_:  # argparse's refusals end the process, with the same status
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("recipe, flags, message", [
    ("s9", ["--optimizer", "adam"], "optimizer adam replaces s9's sgd and its max_lr 0.2: pass max_lr too"),
    # what the recipe cannot take is named first, before what the new optimizer still needs
    ("s8", ["--optimizer", "sgd", "--max-lr", "0.01"],
     "max_lr applies to One Cycle recipes only; s8 uses ReduceLROnPlateau: pass lr"),
])
def test_another_optimizer_must_bring_the_lr_its_recipe_fixes(capsys, recipe, flags, message):
    assert main(["train", "--recipe", recipe, "--synthetic"] + flags) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("flag, value", [("--max-lr", "0.1"), ("--div-factor", "20"),
                                         ("--final-div-factor", "1000"), ("--anneal", "cos")])
def test_one_cycle_flags_on_a_plateau_recipe_are_refused(capsys, flag, value):
    assert main(["train", "--recipe", "s8", "--synthetic", flag, value]) == 2
    assert f"{flag[2:].replace('-', '_')} applies to One Cycle recipes only" in capsys.readouterr().err


def test_a_starting_lr_on_a_one_cycle_recipe_is_refused(capsys):
    assert main(["train", "--recipe", "s10", "--synthetic", "--lr", "0.01"]) == 2
    assert "lr applies to ReduceLROnPlateau recipes only; s10 uses One Cycle" in capsys.readouterr().err


def test_a_starting_lr_reaches_the_plateau_optimizer_and_marks_the_run_not_full(tmp_path, capsys):
    out = tmp_path / "s8"
    args = ["train", "--recipe", "s8", "--out", str(out), "--lr", "0.02"] + TINY
    assert main(args) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.02, 0.02]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["lr"] == 0.02 and not metrics["full_run"]
    assert main(args[:-len(TINY) - 2] + TINY) == 2, "resuming without --lr is refused"
    assert f"lr 0.02 -> {S8.lr}" in capsys.readouterr().err


def test_a_run_tuned_with_another_fixed_peak_resumes_only_with_it(tmp_path, capsys):
    out = tmp_path / "s9"
    args = ["train", "--recipe", "s9", "--out", str(out), "--max-lr", "0.05"] + TINY
    assert main(args) == 0
    assert main(args[:5] + args[7:]) == 2, "resuming with S9's own peak 0.2 is refused"
    assert "max_lr 0.05 -> 0.2" in capsys.readouterr().err


def test_strides_reach_the_model_and_mark_the_run_not_full(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s8"
    built = []
    original = pipeline.create_model

    def recording_create_model(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(pipeline, "create_model", recording_create_model)
    args = ["train", "--recipe", "s8", "--out", str(out), "--strides", "1,2,2,1"] + TINY
    assert main(args) == 0
    assert built[0].layer4[0].conv1.stride == (1, 1) and built[0].layer3[0].conv1.stride == (2, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["strides"] == "1,2,2,1" and not metrics["full_run"]
    assert main(args[:5] + args[7:]) == 2, "resuming with the recipe's strides is refused"
    assert "model_kwargs.strides (1, 2, 2, 1) -> '<unset>'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe, strides, message", [
    ("s8", "1,2,2", "strides '1,2,2': expected four values of 1 or 2, one per stage, such as 1,2,2,1"),
    ("s8", "1,2,2,4", "strides '1,2,2,4': expected four values of 1 or 2, one per stage, such as 1,2,2,1"),
    ("s10", "1,2,2,1", "strides: s10's custom_resnet has fixed strides; leave strides unset"),
])
def test_bad_strides_are_refused_before_any_work(tmp_path, capsys, recipe, strides, message):
    out = tmp_path / "never"
    assert main(["train", "--recipe", recipe, "--synthetic", "--out", str(out), "--strides", strides]) == 2
    assert capsys.readouterr().err == f"error: {message}\n" and not out.exists()


def test_another_optimizer_needs_its_own_lr_and_reaches_the_training(tmp_path, capsys):
    out = tmp_path / "s8"
    assert main(["train", "--recipe", "s8", "--out", str(out), "--optimizer", "sgd"] + TINY) == 2
    message = f"optimizer sgd replaces s8's {S8.optimizer} and its lr {S8.lr:g}: pass lr too"
    assert message in capsys.readouterr().err
    assert not out.exists()
    args = ["train", "--recipe", "s8", "--out", str(out), "--optimizer", "sgd", "--lr", "0.05"] + TINY
    assert main(args) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert all(g["nesterov"] and g["lr"] == 0.05 for g in state["optimizer"]["param_groups"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["optimizer"] == "sgd" and not metrics["full_run"]
    assert main(args[:5] + args[7:]) == 2, "resuming with the recipe's optimizer is refused"
    assert f"optimizer 'sgd' -> '{S8.optimizer}'" in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [
    ("data-file", "is a file; pass the folder that holds train/"),
    ("missing", "does not exist and download is off"),
    ("not-cifar", r"not a CIFAR-10 folder: expected train/<class>/\*.*found \['afile', 'half', 'layout'\]"),
    ("half-copy", r"expected folders train/ and test/ .*found \['train'\]; missing test/"),
    ("out-file", "output folder .* is a file"),
])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, where, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for split in ("train", "test"):  # a layout is checked before the output folder
        (tmp_path / "layout" / split).mkdir(parents=True)
    (tmp_path / "half" / "train").mkdir(parents=True)
    data = {"data-file": afile, "missing": tmp_path / "nope", "not-cifar": tmp_path,
            "half-copy": tmp_path / "half"}.get(where, tmp_path / "layout")
    out = afile if where == "out-file" else tmp_path / "o"
    assert main(["train", "--recipe", "s10", "--data-dir", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)
    assert not (tmp_path / "o").exists()


def test_resume_with_other_data_is_refused_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s9"
    assert main(["train", "--recipe", "s9", "--out", str(out)] + TINY) == 0
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: pytest.fail("trained"))
    other = [a if a != "40" else "48" for a in TINY]  # another test subset size
    assert main(["train", "--recipe", "s9", "--out", str(out)] + other) == 2
    assert "data.test_size 40 -> 48" in capsys.readouterr().err


def test_another_recipe_in_a_run_folder_is_refused_before_the_range_test(s10_run, capsys, monkeypatch):
    out, _, _ = s10_run
    monkeypatch.setattr(pipeline, "load_run_data", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["train", "--recipe", "s9", "--out", str(out)] + TINY) == 2
    assert "name 's10' -> 's9'" in capsys.readouterr().err


class _Refusing(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_download_without_any_reachable_copy_is_one_line(tmp_path, capsys, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        monkeypatch.setenv("CIFAR10_URLS", url)
        code = main(["train", "--recipe", "s10", "--data-dir", str(tmp_path / "data"), "--download",
                     "--out", str(tmp_path / "o"), "--no-progress"])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "HTTP 404" in err and "--data-dir" in err
    assert not any((tmp_path / "data").glob("*.tar.gz*"))
    assert not (tmp_path / "o").exists(), "the failed run left its empty run folder behind"


def test_plateau_patience_and_cutout_p_reach_the_scheduler_and_the_augmentation(tmp_path, capsys):
    patience, cutout_p = S8.plateau.patience + 2, S8.augment.cutout_p / 4  # both unlike the recipe's
    out = tmp_path / "s8"
    args = ["train", "--recipe", "s8", "--out", str(out), "--patience", str(patience),
            "--cutout-p", str(cutout_p)] + TINY
    assert main(args) == 0
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert state["scheduler"]["patience"] == patience
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["settings"]["patience"], metrics["settings"]["cutout_p"]) == (patience, cutout_p)
    assert not metrics["full_run"]
    for flag, change in [("--patience", f"plateau.patience {patience} -> {S8.plateau.patience}"),
                         ("--cutout-p", f"augment.cutout_p {cutout_p} -> {S8.augment.cutout_p}")]:
        at = args.index(flag)
        assert main(args[:at] + args[at + 2:]) == 2, f"resuming without {flag} is refused"
        assert change in capsys.readouterr().err


@pytest.mark.parametrize("recipe, flags, message", [
    ("s10", ["--patience", "1"], "patience applies to ReduceLROnPlateau recipes only; s10 uses One Cycle"),
    ("s8", ["--patience", "-1"], "patience must be 0 or more epochs, got -1"),
    ("s8", ["--cutout-p", "1.5"], "cutout_p must be in [0, 1], got 1.5"),
])
def test_bad_plateau_and_cutout_overrides_are_one_line_errors(capsys, recipe, flags, message):
    assert main(["train", "--recipe", recipe, "--synthetic"] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# S10, whose range test starts the loader's (persistent) workers before training takes over Ctrl-C.
WITH_WORKERS = ["train", "--recipe", "s10", "--synthetic", "--epochs", "2", "--batch-size", "32",
                "--train-subset", "256", "--test-subset", "64", "--lr-finder-iters", "5", "--workers", "2",
                "--no-progress", "--device", "cpu"]

NOTEBOOK_CELLS = """
import json, sys
from helpers import pipeline
settings = pipeline.RunSettings("s10", synthetic=True, epochs=2, batch_size=32, train_subset=256,
                                test_subset=64, lr_finder_iters=5, workers=2, progress=False,
                                device="cpu", out=sys.argv[1])
run = pipeline.start_run(settings)
data, summary = pipeline.load_run_data(run)
train_loader, test_loader = pipeline.build_run_loaders(run, data, summary)
model = pipeline.build_run_model(run)
max_lr = pipeline.resolve_max_lr(run, model, train_loader)
try:
    pipeline.train_run(run, model, train_loader, test_loader, max_lr)  # stopped by the interrupt
except KeyboardInterrupt:
    pass
result = pipeline.train_run(run, model, train_loader, test_loader, max_lr)  # the cell run again
print(json.dumps([s["from_epoch"] for s in result.sessions]))
"""


def interrupt_after_the_first_epoch(command: list[str], out) -> subprocess.CompletedProcess:
    """Run `command` in its own process group and send SIGINT to the whole group, as a terminal's
    Ctrl-C or Jupyter's interrupt does, once the first epoch is saved: the workers get it too."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):  # it may have ended already: its output says why
            os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=300)
        log.seek(0)
        return subprocess.CompletedProcess(command, returncode, log.read())


def test_ctrl_c_to_the_process_group_with_loader_workers_saves_and_stops(tmp_path):
    out = tmp_path / "s10"
    command = [sys.executable, "-m", "helpers", *WITH_WORKERS, "--out", str(out)]
    stopped = interrupt_after_the_first_epoch(command, out)
    assert stopped.returncode == 130, stopped.stdout
    assert train.load_checkpoint(out / "last.pt")["epoch"] >= 1
    assert main(WITH_WORKERS + ["--out", str(out)]) == 0  # the same command resumes
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2] and metrics["resumes"] == 1


def test_after_a_notebook_interrupt_the_training_cell_runs_again_and_resumes(tmp_path):
    out = tmp_path / "s10"
    done = interrupt_after_the_first_epoch([sys.executable, "-c", NOTEBOOK_CELLS, str(out)], out)
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, 1]  # stopped in epoch 2, then resumed
