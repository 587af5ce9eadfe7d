"""On a real CUDA GPU (skipped elsewhere): the precision it gets, inputs and confusion matrices that
match the CPU's, frozen blocks that stay frozen in mixed precision, and a dry run end to end.
The README's GPU check runs this file, then the benchmark."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import fine_tuning as ft
from conftest import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_gpu_gets_the_precision_its_compute_capability_allows():
    device, amp_dtype = ft.choose_device()
    major = torch.cuda.get_device_capability()[0]
    expected = None
    if major >= 8:
        expected = torch.bfloat16
    elif major == 7:
        expected = torch.float16
    assert device.type == "cuda" and amp_dtype == expected


def test_inputs_prepared_on_the_gpu_match_the_cpus():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).pin_memory()
    on_gpu = ft.ModelInput(224, 0).cuda().eval()(images.to("cuda", non_blocking=True)).cpu()
    assert torch.allclose(on_gpu, ft.ModelInput(224, 0).eval()(images), atol=1e-4)


def test_the_confusion_matrix_counted_on_the_gpu_is_the_cpus():
    # A linear model: its float32 matmul is IEEE on the GPU too, where cuDNN's convolutions would
    # round through TF32 (Ampere and newer) and flip the near ties of a random ResNet's logits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(256) % 10), 64)
    _, on_cpu, _ = ft.evaluate(model, loader, ft.ModelInput(32, 0))
    _, on_gpu, _ = ft.evaluate(model.cuda(), loader, ft.ModelInput(32, 0).cuda())
    assert on_gpu.sum() == 256 and (on_gpu - on_cpu).abs().sum() <= 4  # a near tie may flip


def test_frozen_blocks_stay_frozen_in_mixed_precision():
    device, amp_dtype = ft.choose_device()
    torch.manual_seed(0)
    model = ft.build_model(10, "none")
    ft.freeze(model, "layer2")
    model.to(device, memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrs = ft.block_lrs(1e-4, 1.0, 1e-3)
    optimizer = torch.optim.Adam(ft.param_groups(model, lrs), fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    dataset = TensorDataset(images, torch.arange(128) % 10)
    sampler = RandomSampler(dataset, generator=torch.Generator())
    loader = DataLoader(dataset, 32, sampler=sampler, drop_last=True, pin_memory=True)
    inputs = ft.ModelInput(224, 0).to(device)
    ft.set_train_mode(model, "eval")
    loss, _ = ft.train_one_epoch(model, loader, optimizer, scaler, inputs, amp_dtype)
    assert 0 < loss < 10
    for key, value in model.state_dict().items():
        if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.")):
            assert torch.equal(value, before[key]), key


def test_a_dry_run_on_the_gpu_trains_tests_and_reports(tmp_path, capsys):
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 0, err
    assert "device: cuda (" in out and "the model sees 224 px" in out and "test accuracy" in out
