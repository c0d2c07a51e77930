"""The benchmark command: seeds x variants, merged sections, and honest target verdicts."""

import json

import pytest

from benchmarks import report
from benchmarks.run import main, parse_args

TINY = ["--synthetic", "--batch-size", "16", "--epochs", "1", "--train-subset", "48",
        "--test-subset", "32", "--max-lr", "0.01", "--throughput-batches", "1",
        "--warmup-batches", "0", "--no-progress"]


def test_runs_seeds_and_variants_and_merges_sections(tmp_path):
    out = ["--out", str(tmp_path)]
    assert main(["--recipe", "s10", "--seeds", "0", "1"] + TINY + out) == 0
    assert main(["--recipe", "s10", "--seeds", "0", "--plain-epochs", "2"] + TINY
                + ["--out", str(tmp_path / "short")]) == 0
    short = json.loads((tmp_path / "short" / "results.json").read_text())["recipes"]["s10"]
    assert {r["variant"]: r["epochs"] for r in short["training"]["runs"]} == {"fast": 1, "plain": 2}
    results = json.loads((tmp_path / "results.json").read_text())
    training = results["recipes"]["s10"]["training"]
    assert len(training["runs"]) == 4 and set(training["summary"]) == {"fast", "plain"}
    assert training["summary"]["fast"]["acc_std"] is not None
    assert isinstance(training["speedup"], float)
    assert training["verdict"]["status"].startswith("not applicable")
    for run in training["runs"]:  # on CPU both variants train in fp32 with the same augmentations
        twin = next(r for r in training["runs"]
                    if r["seed"] == run["seed"] and r["variant"] != run["variant"])
        assert run["final_test_acc"] == twin["final_test_acc"]
    limits = {v["limit"] for v in results["recipes"]["s10"]["throughput"]["variants"].values()}
    assert limits <= {"model", "loader"}

    assert main(["--recipe", "s10", "--throughput-only"] + TINY + out) == 0
    merged = json.loads((tmp_path / "results.json").read_text())["recipes"]["s10"]
    assert merged["training"] == training, "a throughput-only run keeps the training runs"
    markdown = (tmp_path / "results.md").read_text()
    assert "## S10" in markdown and "Speed-up" in markdown


def test_corrupt_results_file_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    assert main(["--recipe", "s10", "--throughput-only", "--out", str(tmp_path)] + TINY) == 2
    assert "move it away" in capsys.readouterr().err


def provenance(device="cuda", device_name="NVIDIA H100 80GB HBM3", train=50_000, epochs=24):
    return {"metadata": {"device": device, "device_name": device_name},
            "data": {"train": train, "test": 10_000, "copy": "jpeg-copy"},
            "epochs": epochs, "batch_size": 512}


@pytest.mark.parametrize("where, acc, wall, status", [
    (provenance(), 0.935, 40.0, "PASS"),
    (provenance(), 0.935, 50.0, "FAIL"),
    (provenance(), 0.925, 40.0, "FAIL"),
    (provenance(device="cpu", device_name="x86_64"), 0.935, 40.0, "not applicable (CPU run)"),
    (provenance(train=5_000), 0.935, 40.0, "not applicable (subset)"),
    (provenance(device_name="Tesla T4"), 0.935, 40.0, "not applicable (Tesla T4 is not an H100/H200)"),
])
def test_target_verdict(where, acc, wall, status):
    training = {"provenance": where, "summary": {"fast": {"acc_mean": acc, "wall_mean": wall}}}
    assert report.target_verdict("s10", training)["status"] == status


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "s10", "--data-dir", "d", "--throughput-batches", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--recipe", "s10"])
    args = parse_args(["--recipe", "s10", "--recipe", "s10", "--synthetic", "--seeds", "1", "1"])
    assert args.recipes == ["s10"] and args.seeds == [1]
