"""The CI tooling: Colab's pins from a freeze, the check that the install changes none of them, the data
step's download branch against a loopback mirror, and one-line failures of ci/env and ci/pins.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ci import data, pins
from helpers.download import CIFAR10_FILENAME
from tests.test_download import fake, mirror, refused_url  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def test_a_freeze_gives_registry_versions_without_urls_or_the_cuda_stack():
    freeze = ("torch==2.11.0+cu128\nnvidia-cudnn-cu12==9.10.2.21\ncuda-toolkit==12.8.1\n"
              "cucim-cu12 @ https://example.invalid/cucim.whl\nPyYAML==6.0.3\n# a comment\n")
    assert pins.freeze_versions(freeze) == {"torch": ("torch", "2.11.0"), "pyyaml": ("PyYAML", "6.0.3")}


def write_report(path: Path, installs: dict[str, str]) -> Path:
    """pip's --report format, as far as the check reads it."""
    metadata = [{"metadata": {"name": name, "version": version}} for name, version in installs.items()]
    path.write_text(json.dumps({"install": metadata}))
    return path


def test_an_install_that_replaces_a_colab_package_is_refused_one_that_only_adds_is_not(tmp_path):
    colab = tmp_path / "colab.txt"
    colab.write_text("# python 3.13\nnumpy==2.1.3\ntyping_extensions==4.16.0\n")
    adds = write_report(tmp_path / "adds.json", {"nbval": "0.11.0", "cifar10-helpers": "0.1.0"})
    pins.unchanged(adds, colab)  # returns: nothing of Colab's changes
    check = [sys.executable, "-c", "import sys; from pathlib import Path; from ci import pins; "
             "pins.unchanged(Path(sys.argv[1]), Path(sys.argv[2]))"]
    replaced = write_report(tmp_path / "replaces.json", {"nbval": "0.11.0", "typing-extensions": "4.17.0"})
    done = subprocess.run([*check, str(replaced), str(colab)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "4.16.0 -> 4.17.0" in done.stderr


def test_the_data_step_downloads_the_archive_where_there_is_no_jpeg_copy(tmp_path, fake, mirror):  # noqa: F811
    folder = data.small_copy(tmp_path / "cifar10", tmp_path / "no.pack", [mirror.url("/good")], fake.md5)
    assert (folder / CIFAR10_FILENAME).read_bytes() == fake.data
    assert sorted(p.name for p in (folder / "cifar-10-batches-py").iterdir()) == sorted(fake.files)


def test_the_data_step_offline_is_one_line_status_2_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("CIFAR10_URLS", refused_url())
    assert data.main([str(tmp_path / "cifar10")], pack=tmp_path / "no.pack") == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ | env)


def test_a_missing_python_is_one_line_and_status_2(tmp_path):
    done = run([sys.executable, "ci/pins.py", "python", "3.99"], PYENV_ROOT=str(tmp_path), PATH=str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stdout == ""


def test_a_build_pip_cannot_satisfy_is_one_line_status_2_and_leaves_no_environment(tmp_path):
    done = run(["ci/env", "build", "newest"], CI_ENVS=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "newest").exists() and (tmp_path / "newest.log").is_file()


def test_a_test_of_an_environment_not_built_is_one_line_and_status_2(tmp_path):
    done = run(["ci/env", "test", "newest"], CI_ENVS=str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
