"""Shared fixtures, and smoke-mode settings for the notebooks run by nbval.

The notebooks apply the recipe overrides in CIFAR_OVERRIDES and read their run options from
CIFAR_<OPTION> variables; the kernels nbval starts inherit this process's environment, so setting
them here shrinks every notebook run to a minute or two on a CPU. Values already set (by .ci/run or
by hand) win.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

_SMOKE_DIR = tempfile.mkdtemp(prefix="cifar-smoke-")
atexit.register(shutil.rmtree, _SMOKE_DIR, ignore_errors=True)  # after the last kernel is gone
for key, value in {
    "CIFAR_OVERRIDES": "epochs=1 train_subset=256 test_subset=128 batch_size=32 lr_finder.num_iter=6",
    "CIFAR_OUT": os.path.join(_SMOKE_DIR, "runs", "{recipe}"),
    "CIFAR_IMAGES_DIR": os.path.join(_SMOKE_DIR, "images"),
    "CIFAR_DOWNLOAD": "0",
    "CIFAR_PROGRESS": "0",
    "CIFAR_DEVICE": "cpu",  # the notebooks' smoke runs stay on the CPU, on a GPU machine too
}.items():
    os.environ.setdefault(key, value)
if "CIFAR_DATA_DIR" not in os.environ:  # no real images given: synthetic ones
    os.environ.setdefault("CIFAR_SYNTHETIC", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same seed."""
    torch.manual_seed(0)
    yield
