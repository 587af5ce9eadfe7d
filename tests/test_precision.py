"""The CUDA code paths that can be checked without a GPU: precision choice, autocast, gradient scaling."""
import pytest
import torch

import fine_tuning as ft
from helpers import small_setup, snapshot, train_epochs


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_uses_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert ft.choose_precision(torch.device("cuda")) == expected


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_cpu_and_mps_train_in_full_precision(device):
    assert ft.choose_precision(torch.device(device)) is None


def test_only_fp16_turns_the_gradient_scaler_on(monkeypatch):
    for dtype, scaled in [(None, False), (torch.bfloat16, False), (torch.float16, True)]:
        monkeypatch.setattr(ft, "choose_precision", lambda device, dtype=dtype: dtype)
        hw = ft.Hardware(torch.device("cpu"), 32, [0.5] * 3, [0.25] * 3)
        assert hw.scaler.is_enabled() == scaled
        assert hw.amp_dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_training_loop_runs_under_autocast_and_scaling(monkeypatch, dtype):
    # The same code path the GPU takes, run by the CPU's autocast: the loss is computed in low
    # precision, the scaler (fp16 only) scales it, and the weights stay float32 and learn.
    monkeypatch.setattr(ft, "choose_precision", lambda device: dtype)
    setup = small_setup("layer2")
    assert setup.hw.amp_dtype == dtype
    with setup.hw.autocast():
        assert setup.model(torch.zeros(2, 3, 32, 32)).dtype == dtype
    before = snapshot(setup.model.fc)
    train_epochs(setup, epochs=1, max_batches=2)
    assert setup.model.fc.weight.dtype == torch.float32
    assert not torch.equal(before["weight"], setup.model.fc.weight)
    if dtype == torch.float16:
        assert setup.hw.scaler.get_scale() > 0 and setup.hw.scaler.is_enabled()


def test_cpu_keeps_the_default_layout_and_no_workers():
    hw = ft.Hardware(torch.device("cpu"), 32, [0.5] * 3, [0.25] * 3)
    assert hw.memory_format == torch.contiguous_format
    loader = small_setup().loaders[0]
    assert not loader.pin_memory and loader.num_workers == 0


def test_cuda_loaders_pin_memory_and_use_workers_that_ignore_ctrl_c():
    from helpers import small_cfg
    train, test, _ = ft.synthetic_cifar10(0, n_train=200, n_test=40)
    loaders = ft.make_loaders(train, test, small_cfg(), torch.device("cuda"))   # built, not iterated
    assert all(loader.pin_memory and loader.num_workers == 2 for loader in loaders)
    assert loaders[0].worker_init_fn is ft.ignore_ctrl_c
