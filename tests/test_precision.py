"""The GPU and Mac code paths that can be checked without a GPU: precision by compute capability, autocast,
gradient scaling, which copies are non-blocking, and a run resumed on a GPU of another precision."""
import contextlib
import io

import pytest
import torch

import fine_tuning as ft
from conftest import run
from helpers import settings, small_setup, snapshot, train_epochs


def a_gpu(monkeypatch, capability, name="Tesla T4"):
    """What torch answers on a GPU of this compute capability; is_bf16_supported() says True, as a T4's does."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.mark.parametrize("capability,expected,why", [
    ((9, 0), torch.bfloat16, ""), ((8, 6), torch.bfloat16, ""), ((8, 0), torch.bfloat16, ""),   # H100, RTX 30xx, A100
    ((7, 5), torch.float16, "bf16 needs 8.0 or newer"), ((7, 0), torch.float16, "bf16 needs 8.0 or newer"),  # T4, V100
    ((6, 1), None, "no tensor cores below 7.0"), ((5, 2), None, "no tensor cores below 7.0")])  # GTX 10xx, Maxwell
def test_cuda_precision_follows_the_compute_capability_not_is_bf16_supported(monkeypatch, capability, expected, why):
    a_gpu(monkeypatch, capability)
    assert ft.choose_precision(torch.device("cuda")) == (expected, why)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_the_device_line_names_the_gpu_and_why_that_precision(monkeypatch):
    a_gpu(monkeypatch, (7, 5))
    cfg = settings()
    cfg.device = torch.device("cuda")
    monkeypatch.setattr(ft, "imagenet_normalization", lambda device: (torch.zeros(1), torch.ones(1)))  # no GPU here
    with contextlib.redirect_stdout(io.StringIO()) as out:
        hw = ft.Hardware(cfg)
    assert out.getvalue().splitlines()[0] == ("device: cuda (Tesla T4, compute capability 7.5)   image size: 32px   "
                                              "precision: float16 (bf16 needs 8.0 or newer)")
    assert hw.amp_dtype == torch.float16 and hw.non_blocking and hw.pin_memory   # the scaler: only on a real GPU
    torch.backends.cudnn.benchmark = False


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_cpu_and_mps_train_in_full_precision(device):
    assert ft.choose_precision(torch.device(device)) == (None, "")


@pytest.mark.parametrize("device,non_blocking", [("cpu", False), ("mps", False), ("cuda", True)])
def test_copies_are_non_blocking_only_to_cuda_from_pinned_memory(monkeypatch, device, non_blocking):
    # A Hardware whose device is `device`, its tensors kept on the CPU (this machine has neither GPU);
    # every copy that model_inputs() asks for is recorded, with its non_blocking flag.
    real_normalization, real_to, copies = ft.imagenet_normalization, torch.Tensor.to, []
    monkeypatch.setattr(ft, "choose_precision", lambda device: (None, ""))
    monkeypatch.setattr(ft, "imagenet_normalization", lambda device: real_normalization("cpu"))
    monkeypatch.setattr(ft, "capability", lambda device: "8.0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "GPU")
    cfg = settings("--dry-run")
    cfg.device = torch.device(device)
    hw = ft.Hardware(cfg)
    torch.backends.cudnn.benchmark = False
    assert hw.non_blocking == hw.pin_memory == non_blocking
    assert all(loader.pin_memory == non_blocking for loader in ft.load_data(cfg, hw)[:3])   # built, not iterated
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "to", lambda tensor, *args, **kwargs: copies.append(
            (tensor.dtype, kwargs.get("non_blocking", False))) or real_to(tensor, "cpu"))
        ft.model_inputs(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), hw, torch.Generator().manual_seed(0))
    assert (torch.uint8, non_blocking) in copies                       # the batch itself
    assert all(not flag for dtype, flag in copies if dtype != torch.uint8)   # the augmentation's offsets: never


def test_autocast_is_entered_only_when_mixed_precision_is_used(monkeypatch):
    entered = []
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: entered.append(args) or (lambda f: f))
    setup = small_setup()
    forward = setup.model.forward
    assert setup.hw.prepare(setup.model).forward == forward and not entered    # float32: no autocast at all
    setup.hw.amp_dtype = torch.bfloat16
    setup.hw.prepare(setup.model)
    assert entered == [("cpu",)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_training_loop_runs_under_autocast_and_scaling(monkeypatch, dtype):
    # The same code path the GPU takes, run by the CPU's autocast: the forward pass is in low precision,
    # the scaler (fp16 only) scales the loss, and the weights stay float32 and learn.
    monkeypatch.setattr(ft, "choose_precision", lambda device: (dtype, ""))
    setup = small_setup("--batch-size", "4")     # low precision is slow on CPUs: one small batch
    assert setup.hw.amp_dtype == dtype and setup.hw.scaler.is_enabled() == (dtype == torch.float16)
    model = setup.hw.prepare(setup.model)
    assert model(torch.zeros(2, 3, 32, 32)).dtype == dtype
    before = snapshot(setup.model.fc)
    train_epochs(setup, epochs=1, max_batches=3)   # fp16: the scaler may skip a first step
    assert setup.model.fc.weight.dtype == torch.float32
    assert not torch.equal(before["weight"], setup.model.fc.weight)


@pytest.mark.parametrize("first,then", [(torch.bfloat16, torch.float16), (torch.float16, None)])
def test_a_run_resumes_on_a_gpu_of_another_precision(monkeypatch, tmp_path, capsys, first, then):
    # A bf16 run (A100) resumed on a T4 (fp16 with a scaler), an fp16 run resumed on the CPU (float32).
    from test_signals_and_resume import stop_after_epoch
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    args = ["--dry-run", "--epochs", "2", "--batch-size", "4", "--output-dir", tmp_path, "--run-name", "moved"]
    with monkeypatch.context() as patch:
        patch.setattr(ft, "choose_precision", lambda device: (first, ""))
        stop_after_epoch(patch, 1)
        assert run(capsys, *args)[0] == 130
    monkeypatch.setattr(ft, "choose_precision", lambda device: (then, ""))
    code, out, err = run(capsys, "--resume", tmp_path / "moved")
    assert code == 0 and "resuming" in out and "Traceback" not in err, err


def test_cpu_keeps_the_default_layout_and_no_workers():
    hw = ft.Hardware(settings())
    assert hw.memory_format == torch.contiguous_format and hw.num_workers == 0 and not hw.non_blocking


def test_cuda_loaders_pin_memory_and_use_workers_that_ignore_stop_signals(monkeypatch):
    cfg = settings("--dry-run")
    hw = ft.Hardware(cfg)
    hw.pin_memory, hw.num_workers = True, 2                                  # built, not iterated
    train, val, test, _ = ft.load_data(cfg, hw)
    assert all(loader.pin_memory and loader.num_workers == 2 for loader in (train, val, test))
    assert train.worker_init_fn is ft.ignore_stop_signals


def test_the_confusion_matrix_is_counted_on_the_device_without_bincount(monkeypatch):
    setup = small_setup()
    monkeypatch.setattr(torch, "bincount", lambda *args, **kwargs: pytest.fail("bincount syncs with the GPU"))
    setup.cfg.max_batches = 2
    loss, confusion, _ = ft.evaluate(setup.model, setup.loader, setup.hw, setup.cfg, "val")
    assert confusion.shape == (10, 10) and confusion.sum() == 32 and confusion.dtype == torch.int64
