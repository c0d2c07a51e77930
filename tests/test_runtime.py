"""The runtime: device choice, precision by hardware, metadata, atomic files."""

import subprocess
from pathlib import Path

import pytest
import torch

from helpers import runtime as rt
from helpers.runtime import DeviceError, Runtime, atomic_write, pick_device, run_metadata


def test_cpu_is_always_available_and_unknown_or_missing_devices_are_refused(monkeypatch):
    assert pick_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)  # where Colab refuses a GPU-less default
    assert pick_device().type in ("cpu", "mps")
    with pytest.raises(DeviceError):
        pick_device("cuda")
    with pytest.raises(DeviceError):
        pick_device("tpu9")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_runtime_uses_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    runtime = Runtime.for_device("cpu")
    assert runtime.amp_dtype == (torch.bfloat16 if native else None)
    assert runtime.channels_last == native and not runtime.scaler().is_enabled()
    assert Runtime.for_device("cpu", fast=False) == Runtime(torch.device("cpu"))


def test_bf16_cpu_runtime_runs_a_training_step_in_bf16(monkeypatch):
    runtime = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True)
    model = runtime.prepare(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    images, _ = runtime.to_device(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with runtime.autocast():
        out = model(images)
    assert out.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
    assert "bf16 autocast, channels_last" in runtime.describe()


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_cuda_runtime_uses_bf16_only_where_it_is_native(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    runtime = Runtime.for_device(torch.device("cuda"))
    assert runtime.amp_dtype == dtype and runtime.channels_last
    assert Runtime.for_device(torch.device("cuda"), fast=False) == Runtime(torch.device("cuda"))


def test_run_metadata_names_the_machine_versions_and_commit():
    meta = run_metadata(Runtime())
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["cpu_count"] >= 1 and meta["runtime"] == Runtime().describe()
    assert meta["git_commit"] is None or len(meta["git_commit"].split("+")[0]) == 40


ZEN5_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx512_bf16

processor\t: 1
cpu family\t: 99
model\t\t: 9
model name\t: Other
"""


@pytest.mark.parametrize("cpuinfo, expected", [
    (ZEN5_CPUINFO, "AMD EPYC (family 26, model 2)"),  # the first processor's block, not the last
    ("model name\t: Apple M2\n", "Apple M2"),  # no family: the name alone
])
def test_the_cpu_is_named_with_its_family_and_model(cpuinfo, expected):
    assert rt.cpu_model(cpuinfo) == expected


def test_without_a_model_name_the_cpu_is_what_platform_reports(monkeypatch):
    monkeypatch.setattr(rt.platform, "processor", lambda: "arm")
    assert rt.cpu_model("") == "arm"


def test_a_killed_writes_leftover_is_replaced_by_the_next_write(tmp_path):
    (tmp_path / ".last.pt.tmp").write_bytes(b"half a checkpoint")  # what a SIGKILL mid-save leaves
    atomic_write(tmp_path / "last.pt", lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"whole"
    with pytest.raises(ZeroDivisionError):  # a write that fails leaves the old file and no leftover
        atomic_write(tmp_path / "last.pt", lambda tmp: (Path(tmp).write_bytes(b"torn"), 1 / 0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"whole"


def test_a_checkout_is_dirty_for_changed_code_but_not_for_the_figures_a_notebook_writes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "helpers").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "helpers" / "train.py").write_text("x = 1\n")
    (tmp_path / "images" / "s10_history.png").write_bytes(b"old figure")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    package = tmp_path / "helpers"  # git_commit asks from the package's folder
    assert not rt.git_commit(package).endswith("+dirty")
    (tmp_path / "images" / "s10_history.png").write_bytes(b"a new run's figure")
    assert not rt.git_commit(package).endswith("+dirty")
    (tmp_path / "helpers" / "train.py").write_text("x = 2\n")
    assert rt.git_commit(package).endswith("+dirty")
