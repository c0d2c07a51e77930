"""The benchmark command: runs go through the pipeline, each becomes one log record, and the
report is generated from the log."""

import json
import threading

import pytest
import torch

from benchmarks import run
from benchmarks.run import _log_lock, _short_commit, append_record, main, read_records, repo_relative
from benchmarks.throughput import side_by_side
from helpers import train
from helpers.pipeline import variant_folder
from helpers.recipes import S9, override
from helpers.runtime import Runtime

TINY = ["--synthetic", "--epochs", "1", "--train-subset", "48", "--test-subset", "32", "--onecycle.max-lr",
        "0.01"]
TINY_S9 = override(S9, "epochs=1 train_subset=48 test_subset=32 onecycle.max_lr=0.01")  # S9 with TINY's flags


def test_train_records_one_run_per_seed_with_its_provenance(tmp_path):
    log = tmp_path / "runs.jsonl"
    assert main(["--log", str(log), "train", "--recipe", "s9", "--seeds", "0", "1", "--no-progress",
                 "--out", str(tmp_path / "runs")] + TINY) == 0
    records = read_records(log)
    assert [r["settings"]["seed"] for r in records] == [0, 1]
    for r in records:
        run_dir = tmp_path / "runs" / variant_folder(TINY_S9, r["settings"]["seed"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert r["final_test_acc"] == metrics["final_test_acc"] == r["history"][-1]["test_acc"]
        assert r["kind"] == "training" and r["command"].startswith("python -m benchmarks.run")
        assert r["metadata"]["torch"] and r["data"]["copy"] == "synthetic" and r["max_lr"] == 0.01
    report = (tmp_path / "results.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| s9 |")]
    assert len(rows) == 2 and all("| synthetic |" in row and "| no |" in row for row in rows)


def test_record_appends_a_finished_run_and_throughput_measures_both_sides(tmp_path, capsys):
    log = tmp_path / "runs.jsonl"
    run_dir = tmp_path / "runs" / variant_folder(override(S9, "epochs=1 train_subset=48 test_subset=32"))
    assert main(["--log", str(log), "train", "--recipe", "s9", "--no-progress", "--out",
                 str(tmp_path / "runs")] + TINY[:-2]) == 0
    (first,) = read_records(log)
    capsys.readouterr()
    # the same run twice would count twice: recording it again is refused, training it again skips it
    assert main(["--log", str(log), "record", str(run_dir)]) == 2
    (refusal,) = capsys.readouterr().err.splitlines()
    assert refusal.startswith("error: ") and "already in" in refusal
    assert main(["--log", str(log), "train", "--recipe", "s9", "--no-progress", "--out",
                 str(tmp_path / "runs")] + TINY[:-2]) == 0
    assert "skipped" in capsys.readouterr().out and read_records(log) == [first]
    (log.parent / "other.jsonl").write_text("")
    note = "superseded recipe | kept for the record"
    assert main(["--log", str(log.parent / "other.jsonl"), "record", str(run_dir), "--note", note]) == 0
    (again,) = read_records(log.parent / "other.jsonl")
    assert again["note"] == note and again["history"] == first["history"]
    report = (tmp_path / "results.md").read_text()
    (row,) = [line for line in report.splitlines() if line.startswith("| s9 |")]
    cells = [c.strip() for c in row.replace("\\|", "\0").strip("|").split("|")]
    assert cells[-1].replace("\0", "|") == note and len(cells) == 14  # the note's pipe is escaped
    assert len(read_records(log)) == 1
    assert main(["--log", str(log), "throughput", "--recipe", "s9", "--synthetic", "--batches", "1",
                 "--warmup", "0", "--out", str(tmp_path / "runs")]) == 0
    measured = read_records(log)[-1]
    assert measured["kind"] == "throughput" and measured["limit"] in ("model", "loader")
    assert measured["model"]["train_images_per_second"] > 0 and measured["loader"]["images"] > 0
    assert "| s9 |" in (tmp_path / "results.md").read_text().split("## Where the time goes")[1]


def test_a_recorder_waits_for_the_one_holding_the_log_and_keeps_every_line(tmp_path):
    log = tmp_path / "runs.jsonl"
    log.write_text('{"kind": "note", "n": 0}')  # hand-edited: no newline after the last line
    record = {"kind": "note", "n": 1}
    with _log_lock(log):  # another recorder, between reading the log and renaming its copy over it
        writer = threading.Thread(target=append_record, args=(record, log))
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and read_records(log) == [{"kind": "note", "n": 0}]
    writer.join(10)
    assert read_records(log) == [{"kind": "note", "n": 0}, record]


def test_records_name_paths_inside_the_checkout_relative_to_it(tmp_path):
    record = {"command": f"python -m helpers train --data-dir {tmp_path}/data --out {tmp_path}/runs/s10",
              "settings": {"data_dir": f"{tmp_path}/data", "seed": 0}, "tags": [f"{tmp_path}/x", 1]}
    assert repo_relative(record, tmp_path) == {
        "command": "python -m helpers train --data-dir data --out runs/s10",
        "settings": {"data_dir": "data", "seed": 0}, "tags": ["x", 1]}


def test_the_report_shows_a_run_from_uncommitted_code_as_dirty():
    assert _short_commit("0123456789abcdef+dirty") == "01234567+dirty"
    assert _short_commit("0123456789abcdef") == "01234567" and _short_commit(None) == "None"


def _one_cell_notebook(path, source):
    import nbformat
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source)]
    nbformat.write(notebook, path)


def test_notebook_is_executed_in_place_with_the_data_folder_and_kept_whole_on_failure(tmp_path, monkeypatch):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    path = tmp_path / "S0_Assignment.ipynb"
    monkeypatch.setenv("CIFAR_PROGRESS", "1")  # conftest's smoke setting would hide the override
    _one_cell_notebook(path, "import os\nprint(os.environ['CIFAR_DATA_DIR'], os.environ['CIFAR_PROGRESS'], "
                             "os.getcwd())")
    assert main(["notebook", str(path), "--data-dir", "data/cifar10-jpeg"]) == 0
    (output,) = nbformat.read(path, as_version=4).cells[0].outputs
    assert output.text.split() == ["data/cifar10-jpeg", "0", str(tmp_path)]

    broken = "raise RuntimeError('cell failed')"
    _one_cell_notebook(path, broken)
    before = path.read_bytes()
    with pytest.raises(CellExecutionError, match="cell failed"):
        main(["notebook", str(path)])
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_bad_input_is_one_line_and_status_2_before_any_work(tmp_path, capsys):
    log = tmp_path / "runs.jsonl"
    assert main(["--log", str(log), "train", "--recipe", "s8", "--lr", "0", "--out", str(tmp_path / "r")]
                + TINY[:-2]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["--log", str(log), "record", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no {tmp_path / 'nowhere' / 'metrics.json'}; ")
    assert not log.exists() and not (tmp_path / "r").exists()
    # a bad seed after a good one: refused before seed 0 trains
    assert main(["--log", str(log), "train", "--recipe", "s9", "--seeds", "0", "-1", "--no-progress",
                 "--out", str(tmp_path / "r")] + TINY) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "r").exists()
    # a torn line in the log: one line naming it, not a traceback
    log.write_text('{"kind": "training"}\n{"kind": "tra\n')
    assert main(["--log", str(log), "report"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {log} line 2 is not a JSON record (")


def test_a_stopped_seed_is_resumed_by_the_same_command_after_the_seeds_already_recorded(tmp_path, monkeypatch,
                                                                                       capsys):
    log, out = tmp_path / "l.jsonl", tmp_path / "runs"
    command = ["--log", str(log), "train", "--recipe", "s9", "--no-progress", "--out", str(out), "--seeds"]
    assert main(command + ["0"] + TINY) == 0
    finish = run.run_recipe

    def stopped_in_seed_1(recipe, options):
        if options.seed == 1:
            folder = options.out_dir(recipe)
            folder.mkdir(parents=True)
            train.save_checkpoint(folder / "last.pt", {"model": {}, "epoch": 1})
            raise KeyboardInterrupt
        return finish(recipe, options)

    monkeypatch.setattr(run, "run_recipe", stopped_in_seed_1)
    capsys.readouterr()
    assert main(command + ["0", "1"] + TINY) == 130
    captured = capsys.readouterr()
    assert "seed 0: " in captured.out and "skipped" in captured.out
    seed_1 = out / variant_folder(TINY_S9, seed=1)
    assert str(seed_1) in captured.err and captured.err.strip().count("\n") == 0
    assert [r["settings"]["seed"] for r in read_records(log)] == [0], "nothing recorded for seed 1"


def test_side_by_side_measures_each_distinct_runtime_once(tmp_path):
    fast = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True)
    assert side_by_side(fast) == [fast, Runtime(torch.device("cpu"), torch.bfloat16),
                                  Runtime(torch.device("cpu"))]
    assert side_by_side(Runtime(torch.device("cpu"))) == [Runtime(torch.device("cpu"))]
    log = tmp_path / "runs.jsonl"
    assert main(["--log", str(log), "throughput", "--recipe", "s9", "--synthetic", "--batches", "1",
                 "--warmup", "0", "--device", "cpu", "--side-by-side", "--out", str(tmp_path / "runs")]) == 0
    expected = side_by_side(Runtime.for_device("cpu"))
    records = read_records(log)
    assert [r["runtime"] for r in records] == [r.as_dict() | {"compile": False} for r in expected]
    assert all(r["model"]["train_images_per_second"] > 0 for r in records)
    assert len({r["loader"]["images_per_second"] for r in records}) == 1  # the loader measured once


def fake_training(seed: int, acc: float, tta: float | None, **changes) -> dict:
    """A results-log training record with only the fields the report reads."""
    return {"kind": "training", "recipe": "s9", "full_run": True, "changed": {}, "final_test_acc": acc,
            "best_test_acc": acc, "flip_tta_acc": tta, "epochs": 30, "training_seconds": 60.0,
            "train_images_per_second": 1.0, "resumes": 0, "data": {"copy": "jpeg-copy"},
            "settings": {"seed": seed}, "note": None, "sessions": [{"time_utc": f"2026-12-0{seed + 1}"}],
            "metadata": {"device_name": "a CPU", "cpu_count": 2, "runtime": "cpu fp32, NCHW",
                         "git_commit": "0" * 40}} | changes


def test_the_spread_in_the_report_is_the_mean_and_sample_std_of_the_records(tmp_path):
    log = tmp_path / "runs.jsonl"
    tuned = fake_training(2, 0.5, None, changed={"epochs": 2}, full_run=False)  # not the assignment
    for record in (fake_training(0, 0.8702, 0.8751), fake_training(1, 0.8650, None), tuned):
        append_record(record, log)
    (row,) = [line for line in (tmp_path / "results.md").read_text().splitlines()
              if line.startswith("| s9 | jpeg-copy |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean, std = (0.8702 + 0.8650) / 2, abs(0.8702 - 0.8650) / 2 ** 0.5  # the sample std of two values
    assert cells[2:4] == ["2", "0, 1"]
    assert cells[5] == f"{100 * mean:.2f}% ± {100 * std:.2f}" == "86.76% ± 0.37"
    assert cells[6:9] == ["86.50%", "87.02%", "87.51% (1)"]
