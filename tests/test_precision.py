"""The CUDA code paths that can be checked without a GPU: precision choice, autocast, gradient scaling."""
import pytest
import torch

import fine_tuning as ft
from helpers import settings, small_setup, snapshot, train_epochs


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_uses_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert ft.choose_precision(torch.device("cuda")) == expected


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_cpu_and_mps_train_in_full_precision(device):
    assert ft.choose_precision(torch.device(device)) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_training_loop_runs_under_autocast_and_scaling(monkeypatch, dtype):
    # The same code path the GPU takes, run by the CPU's autocast: the loss is computed in low
    # precision, the scaler (fp16 only) scales it, and the weights stay float32 and learn.
    monkeypatch.setattr(ft, "choose_precision", lambda device: dtype)
    setup = small_setup("--batch-size", "4")     # low precision is slow on CPUs: one small batch
    assert setup.hw.amp_dtype == dtype and setup.hw.scaler.is_enabled() == (dtype == torch.float16)
    with setup.hw.autocast():
        assert setup.model(torch.zeros(2, 3, 32, 32)).dtype == dtype
    before = snapshot(setup.model.fc)
    train_epochs(setup, epochs=1, max_batches=3)   # fp16: the scaler may skip a first step
    assert setup.model.fc.weight.dtype == torch.float32
    assert not torch.equal(before["weight"], setup.model.fc.weight)


def test_cpu_keeps_the_default_layout_and_no_workers():
    hw = ft.Hardware(settings())
    assert hw.memory_format == torch.contiguous_format and hw.num_workers == 0


def test_cuda_loaders_pin_memory_and_use_workers_that_ignore_stop_signals(monkeypatch):
    cfg = settings("--dry-run")
    hw = ft.Hardware(cfg)
    hw.device, hw.num_workers = torch.device("cuda"), 2                       # built, not iterated
    train, val, test, _ = ft.load_data(cfg, hw)
    assert all(loader.pin_memory and loader.num_workers == 2 for loader in (train, val, test))
    assert train.worker_init_fn is ft.ignore_stop_signals
