"""The headless command: it runs end to end, writes its files, resumes, and refuses bad input."""

import json

import pytest

from helpers.__main__ import main, parse_args

TINY = ["--synthetic", "--epochs", "1", "--batch-size", "32", "--train-subset", "64",
        "--test-subset", "40", "--no-progress", "--workers", "0"]


def test_s10_run_writes_metrics_checkpoints_and_figures(tmp_path, capsys):
    out = tmp_path / "s10"
    assert main(["train", "--recipe", "s10", "--lr-finder-iters", "5", "--out", str(out)] + TINY) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "s10" and metrics["epochs"] == 1
    assert metrics["lr_finder"]["iterations"] <= 5 and metrics["max_lr"] > 0
    assert 0 <= metrics["final_test_acc"] <= 1 and metrics["train_images_per_second"] > 0
    assert metrics["data"] == {"source": "synthetic(seed=0)", "train": 64, "test": 40}
    assert metrics["metadata"]["device"] == "cpu" and metrics["args"]["recipe"] == "s10"
    assert len(metrics["history"]) == 1 and len(metrics["misclassified_indices"]) <= 20
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "last.pt", "best.pt", "samples.png", "class_distribution.png",
            "augmentations.png", "lr_finder.png", "history.png"} <= names
    if metrics["misclassified_indices"]:
        assert {"misclassified.png", "gradcam.png"} <= names
    assert not [n for n in names if n.startswith(".")], "no temporary files left"
    assert "final test accuracy" in capsys.readouterr().out


def test_s8_run_skips_the_range_test_and_resumes(tmp_path):
    out = tmp_path / "s8"
    args = ["train", "--recipe", "s8", "--out", str(out)] + TINY
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert first["lr_finder"] is None and "lr_finder.png" not in {p.name for p in out.iterdir()}
    assert main(args) == 0  # the finished checkpoint is found and nothing is retrained
    again = json.loads((out / "metrics.json").read_text())
    assert again["resumed_from_epoch"] == 1 and again["history"] == first["history"]


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--recipe", "s10", "--data-dir", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o"), "--max-lr", "0.01"])
    assert code == 2
    assert "does not exist and download is off" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "nothing half-written"


@pytest.mark.parametrize("argv, message", [
    (["train", "--recipe", "s8", "--max-lr", "0.1"], "One Cycle recipes only"),
    (["train", "--recipe", "s10", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "--recipe", "s11"], "invalid choice"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_s10_resume_keeps_the_checkpoint_lr(tmp_path, monkeypatch, capsys):
    # On a GPU the range test is not bit-exact: a rerun must not depend on it repeating itself.
    from helpers import train

    out = tmp_path / "s10"
    args = ["train", "--recipe", "s10", "--lr-finder-iters", "5", "--out", str(out)] + TINY
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())
    monkeypatch.setattr(train, "find_max_lr", lambda *a, **k: pytest.fail("range test rerun"))
    assert main(args) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["max_lr"] == first["max_lr"] and again["resumed_from_epoch"] == 1
    assert "from the checkpoint" in capsys.readouterr().out


def test_resume_with_other_data_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "s8"
    assert main(["train", "--recipe", "s8", "--out", str(out)] + TINY) == 0
    other = [a if a != "64" else "96" for a in TINY]  # another train subset size
    assert main(["train", "--recipe", "s8", "--out", str(out)] + other) == 2
    assert "different settings (train_size, steps_per_epoch)" in capsys.readouterr().err
