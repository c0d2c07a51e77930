"""The headless command: it runs end to end, writes its files, resumes, and refuses bad input
with one line and exit status 2 before any work."""

import contextlib
import json
import os
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
from helpers.recipes import S8, S9, keys, override

TINY = ["--synthetic", "--epochs", "1", "--batch-size", "32", "--train-subset", "64",
        "--test-subset", "40", "--no-progress", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def s10_run(tmp_path_factory):
    """One finished tiny S10 run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("cli") / "s10"
    args = ["train", "--recipe", "s10", "--lr-finder.num-iter", "5", "--out", str(out)] + TINY
    assert main(args) == 0
    return out, args, json.loads((out / "metrics.json").read_text())


def test_a_run_writes_metrics_checkpoints_and_figures(s10_run):
    out, _, metrics = s10_run
    assert metrics["recipe"] == "s10" and metrics["epochs"] == 1 and not metrics["full_run"]
    assert metrics["lr_finder"]["iterations"] <= 5
    assert metrics["max_lr"] == metrics["lr_finder"]["suggested_lr"] > 0
    assert metrics["final_test_acc"] == metrics["history"][-1]["test_acc"] == metrics["predict_acc"]
    assert 0 <= metrics["flip_tta_acc"] <= 1  # beside the plain accuracy
    assert metrics["data"] == {"source": "synthetic(seed=0)", "copy": "synthetic", "train": 64, "test": 40}
    assert metrics["metadata"]["device"] == "cpu" and metrics["settings"]["synthetic"]
    assert metrics["resumes"] == 0 and len(metrics["sessions"]) == 1
    # each session names the code that trained it (metadata names the code that finished the run)
    assert metrics["sessions"][0]["git_commit"] == metrics["metadata"]["git_commit"] is not None
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "last.pt", "augmentations.png", "lr_finder.png", "history.png"} <= names
    if metrics["misclassified_indices"]:
        assert {"misclassified.png", "gradcam.png", "gradcam_true.png"} <= names
    assert not [n for n in names if n.startswith(".")], "no temporary files left"


def test_a_rerun_keeps_the_checkpoint_lr_and_range_test_and_trains_nothing(s10_run, capsys):
    out, args, first = s10_run
    (out / "lr_finder.png").unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out  # the range test's result, as the notebook prints it, and flip TTA
    again = json.loads((out / "metrics.json").read_text())
    for value in (f"{first['max_lr']:.3e}", f"{first['lr_finder']['min_loss_lr']:.3e}",
                  f"{100 * again['flip_tta_acc']:.2f}%"):
        assert value in printed
    # a range test on the trained weights would find another minimum
    assert again["max_lr"] == first["max_lr"] and again["lr_finder"] == first["lr_finder"]
    assert (out / "lr_finder.png").exists() and len(again["sessions"]) == 1
    assert again["history"] == first["history"] and again["resumed_from_epoch"] == 1


def test_ctrl_c_is_one_line_with_where_to_resume(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit", interrupt)
    assert main(["train", "--recipe", "s8", "--out", str(tmp_path / "o")] + TINY) == 130
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists(), "a run stopped before its first save leaves no folder"


def with_flag(args: list[str], flag: str, value: str | None = None) -> list[str]:
    """`args` with another value for `flag`, or without the flag when `value` is None."""
    at = args.index(flag)
    return args[:at] + ([flag, value] if value is not None else []) + args[at + 2:]


def test_tuned_values_reach_optimizer_schedule_and_loss_and_a_killed_run_resumes_only_with_them(
        tmp_path, monkeypatch):
    out = tmp_path / "s9"  # the smallest network
    changed = {"--weight-decay": "0.003", "--label-smoothing": "0.25", "--onecycle.max-lr": "0.05",
               "--onecycle.div-factor": "40", "--onecycle.final-div-factor": "1000",
               "--onecycle.anneal": "cos"}
    args = ["train", "--recipe", "s9", "--out", str(out)] + [a for kv in changed.items() for a in kv]
    args = with_flag(args + TINY, "--epochs", "2")
    smoothing = []
    original_loss, original_save = train.nn.CrossEntropyLoss, train.save_checkpoint

    def recording_loss(*a, **k):
        smoothing.append(k.get("label_smoothing"))
        return original_loss(*a, **k)

    def killed_after_first_epoch(path, state):
        original_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", recording_loss)
    monkeypatch.setattr(train, "save_checkpoint", killed_after_first_epoch)
    assert main(args) == 130
    monkeypatch.setattr(train, "save_checkpoint", original_save)
    (out / ".last.pt.tmp").write_bytes(b"left by a SIGKILL")  # the next save replaces it
    assert main(args) == 0
    groups = train.load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.003, 0.0]
    # the fixed peak 0.05 (S9's: 0.2): One Cycle starts at 0.05/40 and ends 1000 times lower (S9's: 200)
    assert groups[0]["initial_lr"] == pytest.approx(0.05 / 40) and groups[0]["max_lr"] == 0.05
    assert groups[0]["min_lr"] == pytest.approx(0.05 / 40 / 1000)
    assert smoothing and set(smoothing) == {0.25}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["changed"] == {"weight_decay": 0.003, "label_smoothing": 0.25, "onecycle.max_lr": 0.05,
                                  "onecycle.div_factor": 40.0, "onecycle.final_div_factor": 1000.0,
                                  "onecycle.anneal": "cos", "epochs": 2, "batch_size": 32, "train_subset": 64,
                                  "test_subset": 40}
    assert not metrics["full_run"]
    assert metrics["resumed_from_epoch"] == 1 and metrics["resumes"] == 1
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert [s["from_epoch"] for s in metrics["sessions"]] == [0, 1]
    assert not (out / ".last.pt.tmp").exists()
    assert metrics["lr_finder"] is None and "lr_finder.png" not in {p.name for p in out.iterdir()}
    # each value, and the data, is part of what a checkpoint must match: otherwise resuming is refused
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: pytest.fail("trained"))
    for flag in changed:
        assert main(with_flag(args, flag)) == 2, f"resuming without {flag} is refused"
    assert main(with_flag(args, "--test-subset", "48")) == 2, "resuming with other data is refused"


def test_s8_values_reach_optimizer_scheduler_model_and_augmentation_and_a_checkpoint_refuses_others(
        tmp_path, monkeypatch):
    out = tmp_path / "s8"
    plain_init = "{'zero_init_residual': False}"  # merged: S8's norm stays
    patience, cutout_p = S8.plateau.patience + 2, S8.augment.cutout_p / 4  # both unlike the recipe's
    changed = {"--optimizer": "sgd", "--lr": "0.05", "--model-kwargs": plain_init,
               "--plateau.patience": str(patience), "--augment.cutout-p": str(cutout_p)}
    args = ["train", "--recipe", "s8", "--out", str(out)] + [a for kv in changed.items() for a in kv] + TINY
    assert main(args) == 0
    state = train.load_checkpoint(out / "last.pt")
    assert [(g["lr"], g["nesterov"]) for g in state["optimizer"]["param_groups"]] == [(0.05, True)] * 2
    assert state["scheduler"]["patience"] == patience
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["changed"] == {"model_kwargs": {"norm": "ln", "zero_init_residual": False},
                                  "optimizer": "sgd", "lr": 0.05, "augment.cutout_p": cutout_p,
                                  "plateau.patience": patience, "epochs": 1,
                                  "batch_size": 32, "train_subset": 64, "test_subset": 40}
    assert not metrics["full_run"]
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: pytest.fail("trained"))
    for flag in changed:  # without --lr, SGD would have no LR of its own: another one instead
        assert main(with_flag(args, flag, "0.02" if flag == "--lr" else None)) == 2, f"{flag} differs"
    bad = "{'norm': 'batch'}"  # no such norm
    assert main(["train", "--recipe", "s8", "--synthetic", "--out", str(tmp_path / "never"),
                 "--model-kwargs", bad]) == 2
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("flags", [
    ["--weight-decay=-1e-4"], ["--weight-decay", "nan"], ["--label-smoothing", "1"],
    ["--onecycle.div-factor", "1"], ["--onecycle.final-div-factor", "0.5"], ["--onecycle.max-lr", "0"],
    ["--onecycle.max-lr", "inf"], ["--lr-finder.num-iter", "1"], ["--seed", "-1"], ["--seed", str(2**32)],
    ["--workers", "-1"], ["--epochs", "0"], ["--epochs", "two"], ["--optimizer", "rmsprop"],
    ["--device", "cuda"], ["--lr", "0.01"], ["--plateau.patience", "1"], ["--out", "runs/{recipe.name}"],
    ["--model-kwargs", "{'strides': (1, 2, 2, 1)}"],  # s10's custom ResNet has fixed strides
    ["--plateau.factor", "1"], ["--augment.hflip-p", "2"],
])
def test_bad_arguments_are_one_line_and_exit_2_before_any_work(tmp_path, capsys, monkeypatch, flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the cuda case, also on a GPU machine
    out = tmp_path / "never"
    assert main(["train", "--recipe", "s10", "--synthetic", "--out", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists(), "nothing was written"


def test_a_range_test_without_a_suggestion_is_one_line_and_status_2(tmp_path, capsys, monkeypatch):
    real_suggest = lr_finder.suggest_lr

    def diverged(lrs, smoothed, raw, fraction=0.1):
        return real_suggest(lrs, [float("nan")] * len(lrs), raw, fraction)  # every loss non-finite

    monkeypatch.setattr(lr_finder, "suggest_lr", diverged)
    args = ["train", "--recipe", "s10", "--lr-finder.num-iter", "5", "--out", str(tmp_path / "o")]
    assert main(args + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_the_help_has_a_flag_per_recipe_value_with_each_recipes_value_for_the_schedule_it_uses(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert exit_.value.code == 0
    assert all(f"--{key.replace('_', '-')} " in text for key in keys())
    assert "--lr FLOAT s8: 0.002;" in text and "--onecycle.max-lr FLOAT s9: 0.2, s10: None;" in text


def test_an_unknown_recipe_is_refused_by_the_parser_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's refusals end the process, with status 2
        main(["train", "--recipe", "s7", "--synthetic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("where", ["data-file", "missing", "not-cifar", "half-copy", "out-file"])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, where):
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
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_another_recipe_in_a_run_folder_is_refused_before_the_range_test(s10_run, capsys, monkeypatch):
    out, _, _ = s10_run
    monkeypatch.setattr(pipeline, "load_run_data", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["train", "--recipe", "s9", "--out", str(out)] + TINY) == 2


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
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not any((tmp_path / "data").glob("*.tar.gz*"))
    assert not (tmp_path / "o").exists(), "the failed run left its empty run folder behind"


# S10, whose range test starts the loader's (persistent) workers before training takes over Ctrl-C.
WITH_WORKERS = ["train", "--recipe", "s10", "--synthetic", "--epochs", "2", "--batch-size", "32",
                "--train-subset", "256", "--test-subset", "64", "--lr-finder.num-iter", "5", "--workers", "2",
                "--no-progress", "--device", "cpu"]

NOTEBOOK_CELLS = """
import json, sys
from helpers import pipeline
from helpers.dataset import build_loaders, channel_mean_std
from helpers.lr_finder import lr_range_test
from helpers.models import CustomResNet
from helpers.recipes import S10, override
from helpers.train import Checkpoint, fit
recipe = override(S10, "epochs=2 batch_size=32 train_subset=256 test_subset=64 lr_finder.num_iter=5")
options = pipeline.RunOptions(synthetic=True, workers=2, progress=False, device="cpu", out=sys.argv[1])
run = pipeline.start_run(recipe, options)
data = pipeline.load_run_data(run)
mean, std = channel_mean_std(data.train_images)
train_loader, test_loader = build_loaders(data, recipe, mean, std, run.runtime.device, num_workers=2)
model = CustomResNet()
finder = lr_range_test(model, train_loader, recipe, run.runtime, progress=False)
checkpoint = Checkpoint(run.out, keep={"lr_finder": finder.as_dict()})
try:
    fit(model, train_loader, test_loader, recipe, run.runtime, finder.suggested_lr, checkpoint, False)
except KeyboardInterrupt:  # stopped by the interrupt
    pass
checkpoint = Checkpoint(run.out, keep={"lr_finder": finder.as_dict()})
result = fit(model, train_loader, test_loader, recipe, run.runtime, finder.suggested_lr, checkpoint, False)
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



OTHER_PYTHON = os.environ.get("CI_OTHER_PYTHON")  # another environment's python (.ci/run sets it)


def torch_version(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(not OTHER_PYTHON, reason="CI_OTHER_PYTHON, another environment's python, is not set")
@pytest.mark.parametrize("written_by_other", [True, False], ids=["other-to-this", "this-to-other"])
def test_a_checkpoint_written_under_one_torch_resumes_under_the_other(tmp_path, written_by_other):
    writer, resumer = (OTHER_PYTHON, sys.executable) if written_by_other else (sys.executable, OTHER_PYTHON)
    assert torch_version(writer) != torch_version(resumer)  # else this proves nothing
    out = tmp_path / "s10"
    command = ["-m", "helpers", *WITH_WORKERS, "--out", str(out)]
    stopped = interrupt_after_the_first_epoch([writer, *command], out)
    assert stopped.returncode == 130, stopped.stdout
    resumed = subprocess.run([resumer, *command], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2] and metrics["resumes"] == 1

def test_a_variant_trains_and_resumes_in_its_own_folder_and_leaves_the_base_run_untouched(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["train", "--recipe", "s9", "--out", str(runs / "{recipe}")] + TINY
    assert main(base) == 0
    (base_folder,) = runs.iterdir()
    checkpoint = (base_folder / "last.pt").read_bytes()
    variants = {"--label-smoothing": "0.2", "--seed": "1"}  # a changed recipe value, another seed
    for flag, value in variants.items():
        assert main(base + [flag, value]) == 0
    assert len(list(runs.iterdir())) == 1 + len(variants)
    assert (base_folder / "last.pt").read_bytes() == checkpoint, "a variant never writes the base's folder"
    capsys.readouterr()
    assert main(base + ["--seed", "1"]) == 0  # run again: it finds its own finished checkpoint
    assert "nothing to train" in capsys.readouterr().out
    tiny = override(S9, "epochs=1 batch_size=32 train_subset=64 test_subset=40")
    assert base_folder.name == pipeline.variant_folder(tiny)
    seeded = json.loads((runs / pipeline.variant_folder(tiny, seed=1) / "metrics.json").read_text())
    assert seeded["resumed_from_epoch"] == 1 and seeded["settings"]["seed"] == 1


def test_an_explicit_folder_without_the_placeholder_still_refuses_other_settings(tmp_path):
    mine = ["train", "--recipe", "s9", "--out", str(tmp_path / "mine")] + TINY
    assert main(mine) == 0
    assert main(mine + ["--label-smoothing", "0.2"]) == 2
    assert {p.name for p in tmp_path.iterdir()} == {"mine"}
