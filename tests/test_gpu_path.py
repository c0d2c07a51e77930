"""What a GPU run does differently, checked on the CPU: precision and loss scaling by compute
capability, fp16 end to end with a skipped step, checkpoints written on a GPU, cuDNN's autotuner,
the device in the run record, out-of-memory as one line, GradCAM on the classes the figures name."""

import dataclasses
import math
import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from helpers import runtime, train
from helpers.__main__ import run_guarded
from helpers.analysis import predict, select_misclassified
from helpers.dataset import build_loaders, channel_mean_std, make_synthetic_cifar
from helpers.gradcam import GradCAM
from helpers.lr_finder import lr_range_test
from helpers.recipes import S10
from helpers.runtime import Runtime
from tests.tiny import TinyNet, tiny_setup

FP16_CPU = Runtime(torch.device("cpu"), torch.float16)  # a T4's precision and loss scaling, on the CPU


@pytest.mark.parametrize("capability, dtype, scales_loss", [((7, 5), torch.float16, True),
                                                            ((8, 0), torch.bfloat16, False)])
def test_a_gpus_compute_capability_chooses_autocast_and_loss_scaling(monkeypatch, capability, dtype,
                                                                      scales_loss):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = Runtime.for_device("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context is only inspected
        assert cuda.autocast().fast_dtype == dtype
    assert cuda.amp_dtype == dtype and cuda.channels_last
    # the scaler that dtype gets, seen on the CPU, where a GradScaler can be enabled
    cpu = Runtime(torch.device("cpu"), dtype)
    assert cpu.scaler().is_enabled() == scales_loss


def test_fp32_opens_no_autocast_at_all(monkeypatch):
    def refused(device_type, **kwargs):  # torch < 2.5 on a Mac: even a disabled MPS autocast raises
        raise RuntimeError(f"unsupported autocast device_type '{device_type}'")

    monkeypatch.setattr(torch, "autocast", refused)
    with Runtime(torch.device("mps")).autocast():
        pass


def test_preparing_a_model_for_cuda_turns_on_cudnns_autotuner(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    Runtime(torch.device("cpu")).prepare(nn.Identity())
    assert torch.backends.cudnn.benchmark is False
    Runtime(torch.device("cuda"), torch.float16, True).prepare(nn.Identity())  # no tensors to move
    assert torch.backends.cudnn.benchmark is True


def test_a_gpu_is_named_with_its_memory_and_compute_capability_and_its_peak_is_read(monkeypatch):
    props = types.SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**29)
    name = runtime.device_name(torch.device("cuda"))
    assert "Tesla T4" in name and "15.0 GiB" in name and "7.5" in name
    assert runtime.peak_memory_gib(torch.device("cuda")) == 1.5
    assert runtime.device_name(torch.device("cpu")) == runtime.cpu_model()


def test_fp16_runs_end_to_end_and_a_skipped_step_does_not_use_up_the_schedule(tmp_path):
    recipe = dataclasses.replace(S10, epochs=2, gradcam_layer="features")
    train_loader, test_loader = tiny_setup(recipe, n_train=96, n_test=64)  # 3 steps per epoch

    def run(folder, stop_after_epoch=None, resuming=False):
        torch.manual_seed(0)
        model = TinyNet()
        finder = lr_range_test(model, train_loader, recipe, FP16_CPU, num_iter=5, progress=False)
        assert all(math.isfinite(v) for v in finder.raw_losses)

        def inf_once(module, inputs, output):  # the run's first step overflows, as fp16's often do
            hook.remove()
            return output * math.inf
        if not resuming:
            hook = model.fc.register_forward_hook(inf_once)

        def stop(row):
            if row["epoch"] == stop_after_epoch:
                raise KeyboardInterrupt

        with warnings.catch_warnings():
            # e.g. OneCycleLR's when it is stepped before the optimizer ever was
            warnings.simplefilter("error", UserWarning)
            return model, train.fit(model, train_loader, test_loader, recipe, FP16_CPU, max_lr=0.02,
                                    checkpoint=train.Checkpoint(folder), progress=False, on_epoch_end=stop)

    straight_model, straight = run(tmp_path / "a")
    state = train.load_checkpoint(tmp_path / "a" / "last.pt")
    skipped = math.log2(65536 / state["scaler"]["scale"])  # each skip halves the initial scale
    assert skipped >= 1 and skipped == int(skipped)
    assert state["scheduler"]["last_epoch"] == recipe.epochs * len(train_loader) - skipped
    assert all(math.isfinite(r["train_loss"]) or r["epoch"] == 1 for r in straight.history)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after_epoch=1)
    resumed_model, resumed = run(tmp_path / "b", resuming=True)
    assert resumed.resumed_from_epoch == 1
    resumed_state = train.load_checkpoint(tmp_path / "b" / "last.pt")
    assert resumed_state["scaler"] == state["scaler"]
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    predictions = predict(resumed_model, test_loader, FP16_CPU, progress=False)
    assert predictions.accuracy == pytest.approx(resumed.history[-1]["test_acc"])
    mistakes = select_misclassified(predictions, recipe.num_misclassified)
    images = torch.stack([test_loader.dataset[i][0] for i in mistakes])
    with GradCAM(resumed_model, "features") as cam:
        maps = cam(images, predictions.preds[mistakes])
    assert maps.shape == (len(mistakes), 32, 32) and torch.isfinite(maps).all()


WRITE_AS_ON_A_GPU = """
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
# Tag every storage as CUDA's, as torch.save does on a GPU machine.
torch.serialization.register_package(0, lambda storage: "cuda:0", lambda storage, location: None)
torch.save(state, sys.argv[2])
"""


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path):
    recipe = dataclasses.replace(S10, epochs=2)
    loaders = tiny_setup(recipe, n_train=64, n_test=32)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(TinyNet(), *loaders, recipe, max_lr=0.02, checkpoint=train.Checkpoint(tmp_path / "cpu"),
                  progress=False, on_epoch_end=stop)
    (tmp_path / "gpu").mkdir()
    subprocess.run([sys.executable, "-c", WRITE_AS_ON_A_GPU, str(tmp_path / "cpu" / "last.pt"),
                    str(tmp_path / "gpu" / "last.pt")], check=True)
    locations = []  # the file really asks for CUDA tensors
    torch.load(tmp_path / "gpu" / "last.pt", weights_only=True,
               map_location=lambda storage, location: locations.append(location) or storage)
    assert set(locations) == {"cuda:0"}
    result = train.fit(TinyNet(), *loaders, recipe, max_lr=0.02,
                       checkpoint=train.Checkpoint(tmp_path / "gpu"),
                       progress=False)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
    assert result.sessions[-1]["peak_memory_gib"] > 0


def test_out_of_gpu_memory_is_one_line_and_status_2(capsys, tmp_path):
    def work():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 14.75 "
                                          "GiB total capacity)\nSee documentation for Memory Management")

    assert run_guarded(work, lambda: tmp_path / "never-made", resume=True, debug=False) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


class NearTie(nn.Module):
    """Class 1 beats class 0 by 2**-10 in fp32, a gap bf16 (8 bits of precision) rounds to a tie,
    which argmax gives to class 0; the two classes weigh the feature map with opposite signs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2, 10)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[0] = torch.tensor([1e-5, -1e-5])
            self.fc.weight[1] = torch.tensor([-1e-5, 1e-5])
            self.fc.bias.fill_(-1.0)
            self.fc.bias[:2] = torch.tensor([1.0, 1.0 + 2**-10])

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_gradcam_explains_the_class_the_figures_name_when_autocast_and_fp32_disagree():
    recipe = dataclasses.replace(S10, gradcam_layer="features", num_misclassified=5)
    data = make_synthetic_cifar(40, 40, seed=0)
    mean, std = channel_mean_std(data.train_images)
    _, test_loader = build_loaders(data, recipe, mean, std, batch_size=20, num_workers=0)
    model, bf16 = NearTie(), Runtime(torch.device("cpu"), torch.bfloat16)
    assert (predict(model, test_loader, bf16, progress=False).preds == 0).all()
    assert (predict(model, test_loader, progress=False).preds == 1).all()  # fp32 disagrees
    predictions = predict(model, test_loader, bf16, progress=False)
    mistakes = select_misclassified(predictions, recipe.num_misclassified)
    assert len(mistakes) and (predictions.preds[mistakes] == 0).all()
    images = torch.stack([test_loader.dataset[i][0] for i in mistakes])
    with GradCAM(model, model.features) as cam:  # as the notebooks do: the predictions are the targets
        explained, fp32_argmax = cam(images, predictions.preds[mistakes]), cam(images)
        torch.testing.assert_close(explained, cam(images, torch.zeros(len(mistakes), dtype=torch.long)))
    assert not torch.allclose(explained, fp32_argmax), "GradCAM's own fp32 argmax explains another class"


class RunsCode:
    """What a malicious pickle can hold: an object whose unpickling calls a function."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "epoch": 1, "payload": RunsCode(marker)}, tmp_path / "last.pt")
    with pytest.raises(train.CheckpointError):
        train.load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()
