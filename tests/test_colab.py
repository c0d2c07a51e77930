"""The Colab student's path without Colab: the notebooks ask for a GPU, the setup cell clones and
installs (and shows git's own error), the Drive cell keeps a run across a recycled VM, and a
runtime without a GPU is refused before any work."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
import torch

from helpers.__main__ import main
from helpers.runtime import DeviceError, pick_device
from helpers.train import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("S*_Assignment.ipynb"))


def code_cell(notebook: Path, first_line_contains: str) -> str:
    """The source of the notebook's code cell whose first line holds the given text."""
    cells = nbformat.read(notebook, as_version=4).cells
    return next(c.source for c in cells if c.cell_type == "code" and first_line_contains in
                c.source.splitlines()[0])


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_opens_on_a_t4_gpu_runtime_in_colab(notebook):
    metadata = nbformat.read(notebook, as_version=4).metadata
    assert metadata["accelerator"] == "GPU" and metadata["colab"]["gpuType"] == "T4"


@pytest.fixture
def in_fake_colab(monkeypatch, tmp_path):
    """A `google.colab` module, a patched subprocess.run that records commands, and a clone folder."""
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.chdir(tmp_path)  # the cell moves into the clone; undone after the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    commands, answers, origins = [], {}, {}

    def run(command, **kwargs):
        commands.append(list(command))
        if answers.get(command[0]):  # this program fails with that message
            return subprocess.CompletedProcess(command, 128, stdout="", stderr=answers[command[0]])
        stdout = ""
        if command[:2] == ("git", "clone"):  # what a successful clone leaves behind
            os.makedirs(command[-1])
            origins[command[-1]] = command[-2]
        elif command[:2] == ("git", "-C") and command[3:] == ("remote", "get-url", "origin"):
            stdout = origins[command[2]] + "\n"
        return subprocess.CompletedProcess(command, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    return commands, answers, tmp_path / "clone"


def setup_cell(clone: Path, repo: str = "cifar10-course/cifar10-course") -> str:
    """The S10 notebook's setup cell, cloning `repo` into `clone` instead of /content."""
    source = code_cell(ROOT / "S10_Assignment.ipynb", "import os")
    assert '"/content/cifar10-course"' in source and 'REPO = "cifar10-course/cifar10-course"' in source
    return source.replace('"/content/cifar10-course"', repr(str(clone))).replace(
        'REPO = "cifar10-course/cifar10-course"', f"REPO = {repo!r}")


def test_the_setup_cell_clones_the_repo_installs_it_and_moves_into_it(in_fake_colab):
    commands, _, clone = in_fake_colab
    exec(setup_cell(clone, repo="a-student/cifar10-course"), {})  # a student's fork
    assert commands == [["git", "clone", "--depth", "1", "https://github.com/a-student/cifar10-course.git",
                         str(clone)],
                        [sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)]]
    assert Path.cwd() == clone and sys.path[0] == str(clone)
    commands.clear()
    exec(setup_cell(clone, repo="a-student/cifar10-course"), {})  # Run all again on the same VM
    assert [c[:2] for c in commands] == [["git", "-C"], [sys.executable, "-m"]], "no second clone"
    commands.clear()
    with pytest.raises(RuntimeError):  # the REPO field changed: the old clone is not used silently
        exec(setup_cell(clone, repo="cifar10-course/cifar10-course"), {})
    assert [c[:2] for c in commands] == [["git", "-C"]], "nothing installed from the wrong clone"


def test_a_failed_clone_shows_gits_own_message(in_fake_colab):
    commands, answers, clone = in_fake_colab
    answers["git"] = "fatal: repository 'https://github.com/nobody/nothing.git/' not found"
    with pytest.raises(RuntimeError) as failed:
        exec(setup_cell(clone, repo="nobody/nothing"), {})
    assert answers["git"] in str(failed.value)
    assert len(commands) == 1 and not clone.exists()  # nothing installed after a failed clone


def test_outside_colab_the_setup_cell_does_nothing(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("ran a command outside Colab"))
    exec(setup_cell(tmp_path / "clone"), {})


def test_a_colab_runtime_without_a_gpu_is_refused_unless_the_cpu_is_asked_for(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20261201")
    with pytest.raises(DeviceError):
        pick_device()
    assert pick_device("cpu").type == "cpu"
    out = tmp_path / "runs" / "s9"
    tiny = ["train", "--recipe", "s9", "--synthetic", "--epochs", "1", "--train-subset", "64",
            "--test-subset", "32", "--batch-size", "32", "--no-progress", "--out", str(out)]
    assert main(tiny) == 2 and not (tmp_path / "runs").exists()  # before any work
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    assert pick_device().type == "cpu"


FAKE_DRIVE_MODULE = '''
import os

def mount(mountpoint, force_remount=False):
    """Google Drive appears at mountpoint/MyDrive (here a folder that outlives the 'VM')."""
    os.makedirs(os.path.join(mountpoint, "MyDrive"), exist_ok=True)
'''


def run_all(notebook: nbformat.NotebookNode, vm: Path, pythonpath: Path, **env: str) -> None:
    """Execute every cell in a fresh kernel whose working folder is `vm`, as Colab's Run all."""
    from nbclient import NotebookClient

    vm.mkdir(exist_ok=True)
    path = os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])
    env = os.environ | env | {"PYTHONPATH": path}
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(vm)}}).execute(env=env)


def test_with_keep_on_drive_a_new_vm_resumes_the_run_from_drive(tmp_path):
    colab = tmp_path / "site" / "google" / "colab"  # a namespace package, as google.* is
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text("")
    (colab / "drive.py").write_text(FAKE_DRIVE_MODULE)
    drive = tmp_path / "drive"
    notebook = nbformat.read(ROOT / "S9_Assignment.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "KEEP_ON_DRIVE = False" in c.source)
    cell.source = cell.source.replace("KEEP_ON_DRIVE = False", "KEEP_ON_DRIVE = True").replace(
        '"/content/drive"', repr(str(drive)))  # the student ticks the box; Drive mounts here

    run_all(notebook, tmp_path / "vm1", tmp_path / "site")
    (run_folder,) = (drive / "MyDrive" / "cifar10-course" / "runs").iterdir()  # the smoke run's variant
    first = json.loads((run_folder / "metrics.json").read_text())
    assert first["resumed_from_epoch"] == 0 and len(first["history"]) >= 1
    assert not (tmp_path / "vm1" / "runs").exists(), "the run folder is on Drive, not on the VM"

    run_all(notebook, tmp_path / "vm2", tmp_path / "site")  # a recycled VM: a new folder, same Drive
    second = json.loads((run_folder / "metrics.json").read_text())
    assert second["resumed_from_epoch"] == len(first["history"]), "nothing trained again"
    assert second["history"] == first["history"] and second["sessions"] == first["sessions"]


def test_a_change_typed_in_the_form_field_trains_a_variant_beside_the_run_and_the_last_cell_shows_both(
        tmp_path):
    notebook = nbformat.read(ROOT / "S8_Assignment.ipynb", as_version=4)
    runs = tmp_path / "vm" / "runs"
    # two steps of training: on synthetic images too, some test images stay wrong for GradCAM to explain
    smoke = {"CIFAR_OUT": "runs/{recipe}",
             "CIFAR_OVERRIDES": "epochs=1 train_subset=64 test_subset=64 batch_size=32"}
    run_all(notebook, tmp_path / "vm", tmp_path, **smoke)  # Run all, the field empty
    (first,) = runs.iterdir()
    checkpoint = (first / "last.pt").read_bytes()
    assert "image/png" not in str(notebook.cells[-1].outputs), "one run: nothing to compare yet"

    cell = next(c for c in notebook.cells if 'OVERRIDES = ""  # @param' in c.source)
    cell.source = cell.source.replace('OVERRIDES = ""', "OVERRIDES = \"model_kwargs={'norm': 'bn'}\"")
    run_all(notebook, tmp_path / "vm", tmp_path, **smoke)  # the student's change
    second = next(folder for folder in runs.iterdir() if folder != first)
    assert len(list(runs.iterdir())) == 2 and (first / "last.pt").read_bytes() == checkpoint
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["changed"]["model_kwargs"]["norm"] == "bn" and not metrics["full_run"]
    first_state, second_state = (load_checkpoint(folder / "last.pt")["model"] for folder in (first, second))
    assert not any(name.endswith("running_mean") for name in first_state), "the assignment's LayerNorm"
    assert any(name.endswith("running_mean") for name in second_state), "the variant trained BatchNorm"
    assert any("image/png" in output.get("data", {}) for output in notebook.cells[-1].outputs)
