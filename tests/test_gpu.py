"""The GPU path for real, on a CUDA machine: each recipe trains a short run with the recipe's own
loaders (workers, pinned memory), autocast and loss scaling, is stopped by Ctrl-C to its whole
process group, resumes, and explains its mistakes with GradCAM; GradCAM on the GPU matches the CPU.
Skipped without CUDA. With the throughput command (README, "Checking a GPU") this is the GPU check."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import train
from helpers.gradcam import GradCAM
from helpers.models import create_model
from helpers.recipes import RECIPES
from tests.test_cli import interrupt_after_the_first_epoch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def short_run(recipe: str, out) -> list[str]:
    """Three epochs on 4,096 images (real ones when CIFAR_DATA_DIR names a copy) on the GPU."""
    real = os.environ.get("CIFAR_DATA_DIR")
    data = ["--data-dir", real] if real else ["--synthetic"]
    range_test = ["--lr-finder.num-iter", "20"] if recipe == "s10" else []
    return [sys.executable, "-m", "helpers", "train", "--recipe", recipe, *data, *range_test,
            "--epochs", "3", "--train-subset", "4096", "--test-subset", "1024", "--device", "cuda",
            "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("recipe", ["s10", "s8", "s9"])
def test_a_short_run_stops_resumes_and_explains_on_the_gpu(recipe, tmp_path):
    out = tmp_path / recipe
    command = short_run(recipe, out)
    stopped = interrupt_after_the_first_epoch(command, out)
    assert stopped.returncode == 130, stopped.stdout
    resumed = subprocess.run(command, capture_output=True, text=True)  # the same command resumes
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    native_bf16 = torch.cuda.get_device_capability()[0] >= 8
    assert metrics["runtime"]["amp_dtype"] == ("bfloat16" if native_bf16 else "float16")
    assert metrics["runtime"]["channels_last"] and metrics["resumes"] >= 1
    assert torch.cuda.get_device_name() in metrics["metadata"]["device_name"]
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3]
    assert all(r["train_loss"] == r["train_loss"] for r in metrics["history"]), "no NaN loss"
    assert all(s["peak_memory_gib"] > 0 for s in metrics["sessions"])
    wrong = round((1 - metrics["predict_acc"]) * metrics["data"]["test"])  # synthetic data: maybe none
    assert len(metrics["misclassified_indices"]) == min(RECIPES[recipe].num_misclassified, wrong)
    if wrong:
        assert {"misclassified.png", "gradcam.png", "gradcam_true.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("recipe", ["s10", "s8", "s9"])
def test_gradcam_on_the_gpu_matches_the_cpu(recipe, monkeypatch):
    # fp32 on both sides: Ampere and later GPUs would otherwise run these convolutions in TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    spec = RECIPES[recipe]
    torch.manual_seed(0)
    model = create_model(spec.model, **spec.model_kwargs).eval()
    images = torch.randn(8, 3, 32, 32)
    targets = model(images).argmax(1)  # the same classes on both devices, even on a near-tie
    with GradCAM(model, spec.gradcam_layer) as cam:
        on_cpu = cam(images, targets)
    model.cuda()
    with GradCAM(model, spec.gradcam_layer) as cam:
        on_gpu = cam(images.cuda(), targets.cuda()).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=0)


def test_a_gpu_checkpoint_loads_on_the_cpu(tmp_path):
    model = torch.nn.Linear(2, 2).cuda()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    state = train.load_checkpoint(tmp_path / "last.pt")
    assert state["model"]["weight"].device.type == "cpu"
