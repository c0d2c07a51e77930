"""How a run uses the machine: device, seeds, precision and memory layout, run metadata, atomic files."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def in_colab() -> bool:
    """True inside a Google Colab runtime (its notebook kernel, or a command run from it)."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_device(name: str | None = None) -> torch.device:
    """The named device if this machine has it, else the best available (CUDA, MPS, CPU).

    Colab without a GPU is refused unless a device is named: its CPUs take hours for what a T4
    trains in minutes, and a runtime opened without a GPU is almost always a missed setting."""
    available = ["cuda"] if torch.cuda.is_available() else []
    available += (["mps"] if torch.backends.mps.is_available() else []) + ["cpu"]  # best first
    if not name:
        if available[0] == "cpu" and in_colab():
            raise DeviceError("this Colab runtime has no GPU: choose Runtime > Change runtime type > "
                              "T4 GPU, then Run all again (to train on its CPUs anyway, for hours, "
                              "set CIFAR_DEVICE=cpu, or pass --device cpu)")
        return torch.device(available[0])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; expected cuda, mps or cpu") from None
    gpus = torch.cuda.device_count() if "cuda" in available else 0
    if device.type not in available or (device.type == "cuda" and (device.index or 0) >= gpus):
        hint = " (in Colab: Runtime > Change runtime type > T4 GPU)" if device.type == "cuda" else ""
        raise DeviceError(f"device {name!r} is not available on this machine{hint}; available: "
                          f"{', '.join(available)}" + (f" ({gpus} GPU(s), from cuda:0)" if gpus else ""))
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not emulated."""
    # Emulated bf16 is ~25x slower than fp32 here (measured on an AVX2-only EPYC: 1.8 vs 48 img/s).
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Runtime:
    """The device and how a run uses it: autocast dtype and memory layout."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, fast: bool = True) -> Runtime:
        """bf16 + channels_last where bf16 is native; fp16 on older GPUs; else (or not `fast`) fp32 NCHW."""
        device = torch.device(device)
        if fast and device.type == "cuda":
            # Not torch.cuda.is_bf16_supported(): it says yes on a T4 (emulated), where cuDNN has
            # no bf16 convolutions. Compute capability 8.0 (Ampere) is where bf16 is native.
            native_bf16 = torch.cuda.get_device_capability(device)[0] >= 8
            return cls(device, torch.bfloat16 if native_bf16 else torch.float16, True)
        if fast and device.type == "cpu" and cpu_has_native_bf16():
            return cls(device, torch.bfloat16, True)
        # fp32 CPU: channels_last measured slower than NCHW for these convnets (44 vs 48 img/s).
        return cls(device)

    def describe(self) -> str:
        """One line for logs: device, precision, layout."""
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device} {precision[self.amp_dtype]}, {layout}"

    def as_dict(self) -> dict[str, Any]:
        """The runtime as plain JSON values."""
        return {"device": str(self.device), "amp_dtype": str(self.amp_dtype).replace("torch.", ""),
                "channels_last": self.channels_last}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device in this runtime's memory layout."""
        if self.device.type == "cuda":
            # cuDNN times its algorithms once per input shape (a run has four) and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        return model.to(self.device, memory_format=self._layout)

    def autocast(self) -> AbstractContextManager:
        """Autocast for the forward pass; in fp32 none at all (torch < 2.5 refuses a disabled one on MPS)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """The loss scaler, enabled for fp16 only, whose gradients underflow (bf16 has fp32's range);
        its inf check syncs once a step."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-blocking copy of a batch, in this runtime's memory layout."""
        images = images.to(self.device, non_blocking=True, memory_format=self._layout)
        return images, labels.to(self.device, non_blocking=True)

    @property
    def _layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.preserve_format


FP32_CPU = Runtime()  # the default of functions that take a runtime: plain fp32 on the CPU


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name with its x86 family and model, from /proc/cpuinfo; else what platform reports."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""  # Linux only
    first = cpuinfo.split("\n\n", 1)[0]  # the first processor's block: all cores are alike here
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    name, family, model = fields.get("model name"), fields.get("cpu family"), fields.get("model")
    if not name:
        return platform.processor() or platform.machine()
    # VMs often name only the brand ("AMD EPYC"): family and model tell a Zen 3 (25) from a Zen 5 (26),
    # which is the difference between fp32 and native bf16 for this project.
    return f"{name} (family {family}, model {model})" if family and model else name


def device_name(device: torch.device) -> str:
    """The device in words: a GPU's name, memory and compute capability; a CPU's model."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor})")
    return cpu_model() if device.type == "cpu" else str(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory held: on a GPU by tensors (since the last reset), on a CPU by this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type != "cpu" or sys.platform == "win32":  # Windows has no `resource` module
        return None
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The checked-out commit of the repository holding this package (None outside a checkout), with
    "+dirty" for changed tracked files, except the figures in images/ that a notebook writes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder or Path(__file__).resolve().parent, check=True,
                              capture_output=True, text=True, timeout=5).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)images")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def utc_now() -> str:
    """The time, as the run records write it: 2026-12-06T04:42:13Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_metadata(runtime: Runtime) -> dict[str, Any]:
    """Device, CPU, library versions, git commit and time, saved with every run."""
    import albumentations
    import torchvision

    device = runtime.device
    meta = {
        "time_utc": utc_now(), "device": str(device), "device_name": device_name(device), "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "runtime": runtime.describe(), "git_commit": git_commit(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "albumentations": albumentations.__version__,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        meta.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return meta


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file.
    A killed write leaves `.NAME.tmp` behind, which the next write of NAME replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
