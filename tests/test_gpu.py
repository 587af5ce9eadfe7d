"""On a real CUDA GPU (skipped elsewhere): the precision the GPU gets, copies that arrive whole, the confusion
matrix counted on the device, frozen blocks that stay frozen in mixed precision, and a dry run end to end.
The README's GPU check runs this file, then the benchmark."""

import pytest
import torch

import fine_tuning as ft
from conftest import run
from helpers import settings, snapshot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_hardware(*args):
    cfg = settings(*args)
    assert cfg.device.type == "cuda"
    return cfg, ft.Hardware(cfg)


def test_the_gpu_gets_the_precision_its_compute_capability_allows():
    _, hw = gpu_hardware()
    major = torch.cuda.get_device_capability()[0]
    assert hw.amp_dtype == (torch.bfloat16 if major >= 8 else torch.float16 if major == 7 else None)
    assert (
        hw.scaler.is_enabled() == (hw.amp_dtype == torch.float16)
        and hw.non_blocking
        and hw.pin_memory
    )


def test_pinned_non_blocking_copies_give_the_same_batch_as_the_cpu():
    _, hw = gpu_hardware("--image-size", "224")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).pin_memory()
    on_gpu = ft.model_inputs(images, hw).float().cpu()
    hw.device, hw.non_blocking = torch.device("cpu"), False
    hw.mean, hw.std = (t.cpu() for t in (hw.mean, hw.std))
    assert torch.allclose(on_gpu, ft.model_inputs(images, hw).float(), atol=1e-4)


def test_the_confusion_matrix_counted_on_the_gpu_is_the_cpus():
    cfg, hw = gpu_hardware("--batch-size", "32")
    torch.manual_seed(0)
    model = hw.prepare(ft.build_model("none"))
    (images, labels), _, _ = ft.synthetic_cifar10(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:256], labels[:256]), 64
    )
    cfg.max_batches = None
    loss, confusion, _ = ft.evaluate(model, loader, hw, cfg, "val")
    expected = torch.zeros(10, 10, dtype=torch.int64)
    with torch.inference_mode():  # the same batches, counted one by one on the CPU
        for batch, true in loader:
            predicted = model(ft.model_inputs(batch, hw)).float().argmax(1).cpu()
            for t, p in zip(true.tolist(), predicted.tolist()):
                expected[t, p] += 1
    assert confusion.sum() == 256 and (confusion - expected).abs().sum() <= 4  # a rare tie may flip


def test_frozen_blocks_stay_frozen_in_mixed_precision():
    cfg, hw = gpu_hardware("--batch-size", "16")
    torch.manual_seed(0)
    model = ft.build_model("none")
    ft.freeze(model, "layer2")
    model = hw.prepare(model)
    optimizer = ft.make_optimizer(ft.param_groups(model, cfg), hw.device)
    before = {name: snapshot(block) for name, block in ft.block_modules(model).items()}
    (images, labels), _, _ = ft.synthetic_cifar10(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:160], labels[:160]),
        16,
        sampler=torch.utils.data.RandomSampler(range(160), generator=torch.Generator()),
    )
    cfg.max_batches = None
    assert ft.train_one_epoch(model, loader, optimizer, hw, 1, cfg) is not None
    for name, block in ft.block_modules(model).items():
        moved = [k for k, v in snapshot(block).items() if not torch.equal(v, before[name][k])]
        assert (not moved) == (name in ["stem", "layer1", "layer2"]), name


def test_a_dry_run_on_the_gpu_trains_tests_and_reports(tmp_path, capsys):
    code, out, err = run(capsys, "--dry-run", "--epochs", "2", "--output-dir", tmp_path)
    assert code == 0, err
    assert (
        out.startswith("device: cuda (") and "compute capability" in out and "test accuracy" in out
    )
