"""Whole runs in this process, on a tiny CIFAR-10 through torchvision's real loaders: what a run
keeps and prints, early stopping, each run read against the right one, divergence, progress,
pictures, and the README's code for a fine-tuned model, on a machine without the run's GPU."""

import csv
import errno
import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.models import ResNet

import fine_tuning as ft
from conftest import LAUNCHER, ROOT, load_state, run, save_as_on_a_gpu, script_env, tiny


def rows(path):
    with open(path, newline="", encoding="utf-8-sig") as file:
        return list(csv.DictReader(file))


def test_a_run_trains_tests_the_best_weights_and_keeps_its_files(
    real_files, tmp_path, capsys, monkeypatch
):
    returned = []  # train_one_epoch's figures, epoch by epoch
    train_one_epoch = ft.train_one_epoch

    def record(*args):
        returned.append(train_one_epoch(*args))
        return returned[-1]

    monkeypatch.setattr(ft, "train_one_epoch", record)
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--run-name", "first"))
    assert code == 0, err
    run_dir = tmp_path / "first"
    names = sorted(path.name for path in run_dir.iterdir() if not path.name.startswith("."))
    assert names == ["best.pt", "config.json", "history.csv", "results.json"]  # last.pt: gone
    assert "data: 90 train / 10 validation / 30 test images, 10 classes, 32 px\n" in out
    assert "model: ResNet18, ImageNet weights (IMAGENET1K_V1), new 10-class head" in out
    assert re.search(r"test accuracy [\d.]+%   \(the weights of epoch [12], the best val_loss", out)
    history = rows(run_dir / "history.csv")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert [(float(row["train_loss"]), float(row["train_acc"])) for row in history] == returned
    assert history[0]["lr_layer3"] == "0.0001" and history[0]["lr_fc"] == "0.001"
    assert history[0]["lr_layer2"] == ""  # frozen: no learning rate
    results = json.loads((run_dir / "results.json").read_text())
    seconds = sum(float(row["seconds"]) for row in history)  # every epoch's, not the last one's
    assert results["minutes"] == round(seconds / 60, 2)
    confusion = torch.tensor(results["confusion_matrix"])
    assert confusion.sum() == 30 and results["test_acc"] == confusion.trace().item() / 30
    for c, name in enumerate(results["classes"]):
        assert results["per_class_acc"][name] == confusion[c, c].item() / confusion[c].sum().item()
    assert load_state(run_dir / "best.pt")["fc.weight"].shape == (10, 512)
    summary = rows(tmp_path / "summary.csv")
    assert [row["run"] for row in summary] == ["first"] and summary[0]["IMAGE_SIZE"] == "32"
    assert summary[0]["DATASET"] == "CIFAR10" and summary[0]["UNFREEZE_SCHEDULE"] == "none"
    assert "\nthe first run in summary.csv (val acc: the best epoch's" in out


def test_a_run_leaves_the_frozen_blocks_as_imagenet_gave_them_batchnorm_statistics_included(
    real_files, torch_home, tmp_path, capsys
):
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--run-name", "frozen"))
    assert code == 0, err
    cached = load_state(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    best = load_state(tmp_path / "frozen" / "best.pt")
    frozen = [key for key in cached if key.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]
    assert "layer2.1.bn2.running_var" in frozen and "bn1.num_batches_tracked" in frozen
    assert [key for key in frozen if not torch.equal(best[key], cached[key])] == []
    trained = "layer3.1.bn2.running_var"  # FREEZE_UNTIL = "layer2": layer3 adapts
    assert not torch.equal(best[trained], cached[trained])


def test_the_imagenet_weights_come_through_torchvisions_cache(real_files, torch_home):
    # resnet18(weights=IMAGENET1K_V1) reads the cached file (the tests' random copy of it).
    cached = load_state(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = ft.build_model(10, "IMAGENET1K_V1")
    assert torch.equal(model.layer1[0].conv1.weight, cached["layer1.0.conv1.weight"])
    assert model.fc.out_features == 10


def test_early_stopping_stops_and_the_best_epochs_weights_are_tested(
    real_files, tmp_path, capsys, monkeypatch
):
    saved = {}
    log_epoch = ft.Run.log_epoch

    def keep_weights(self, epoch, *args):
        log_epoch(self, epoch, *args)
        saved[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(ft.Run, "log_epoch", keep_weights)
    tested = {}
    evaluate = ft.evaluate

    def record(model, loader, inputs, amp_dtype=None, desc="val"):
        if desc == "test":
            tested.update({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(model, loader, inputs, amp_dtype, desc)

    monkeypatch.setattr(ft, "evaluate", record)
    args = tiny(real_files, tmp_path, "--epochs", "9", "--patience", "2", "--min-delta", "100")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "stopped: early stopping: val_loss did not improve on epoch 1 by more than 100" in out
    assert sorted(saved) == [1, 2, 3]  # epoch 1, then two without an improvement of 100
    assert all(torch.equal(tested[k], saved[1][k]) for k in tested)
    assert not all(torch.equal(saved[3][k], saved[1][k]) for k in saved[1])


def test_monitor_val_acc_chooses_the_best_epoch_and_stops_by_validation_accuracy(
    tmp_path, capsys, monkeypatch
):
    # Each epoch the validation loss falls and the accuracy falls too: they disagree.
    figures = iter([(1.0, 5), (0.5, 4), (0.4, 3)])  # (loss, right of 10)
    evaluate = ft.evaluate

    def scripted(model, loader, inputs, amp_dtype=None, desc="val"):
        if desc == "test":
            return evaluate(model, loader, inputs, amp_dtype, desc)
        loss, right = next(figures)
        confusion = torch.zeros(10, 10, dtype=torch.long)
        confusion[0, 0] = right
        confusion[0, 1] = 10 - right
        return loss, confusion, None

    monkeypatch.setattr(ft, "evaluate", scripted)
    args = ["--dry-run", "--monitor", "val_acc", "--patience", "1", "--epochs", "3"]
    code, out, err = run(capsys, *args, "--output-dir", tmp_path)
    assert code == 0, err
    assert "stopped: early stopping: val_acc did not improve on epoch 1 by more than" in out
    assert "(the weights of epoch 1, the best val_acc, from best.pt" in out


def test_the_block_table_gives_each_blocks_status_parameters_and_rate_and_the_totals(capsys):
    model = ft.build_model(10, "none")
    ft.freeze(model, "layer2")
    lrs = ft.block_lrs(1e-4, 0.5, 1e-3)
    ft.print_blocks(model, torch.optim.Adam(ft.param_groups(model, lrs)), "eval")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["block", "status", "parameters", "lr", "BatchNorm"]
    assert lines[3].split() == ["layer2", "frozen", "525,568", "-", "eval"]
    assert lines[4].split() == ["layer3", "trainable", "2,099,712", "5.0e-05", "train"]
    assert lines[6].split() == ["fc", "trainable", "5,130", "1.0e-03", "-"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert lines[7] == f"trainable parameters: {trainable:,}   frozen: {frozen:,}"


# Layer3 is to be released at epoch 3, but early stopping ends the run after epoch 2.
PREVENTED = ["--dry-run", "--freeze-until", "layer4", "--unfreeze-schedule", "3:layer3"]
PREVENTED += ["--patience", "1", "--min-delta", "10", "--epochs", "4"]


def test_a_scheduled_unfreezing_at_the_last_epoch_run_is_not_named_as_prevented(tmp_path, capsys):
    # Layer3 joins at epoch 2, and early stopping ends the run after it: it did happen.
    happened = [*PREVENTED[:4], "2:layer3", *PREVENTED[5:]]
    code, out, err = run(capsys, *happened, "--output-dir", tmp_path)
    assert code == 0, err
    assert "\nunfreezing layer3, layer4\n" in out
    assert "by more than 10 since then (PATIENCE = 1)\n" in out  # the reason ends there


def test_a_scheduled_unfreezing_that_early_stopping_prevents_is_named(tmp_path, capsys):
    code, out, err = run(capsys, *PREVENTED, "--output-dir", tmp_path)
    assert code == 0, err
    assert (
        "by more than 10 since then (PATIENCE = 1); the scheduled unfreezing 3:layer3 did not"
        in out
    )
    assert "\nunfreezing" not in out


@pytest.fixture
def drawn(with_matplotlib, monkeypatch):
    """The figures the run would save, by file name, drawn but not written."""
    figures = {}
    monkeypatch.setattr(ft, "save_figure", lambda figure, path: figures.update({path.name: figure}))
    return figures


def test_the_curves_draw_no_unfreezing_that_early_stopping_prevented(drawn, tmp_path, capsys):
    code, out, err = run(capsys, *PREVENTED, "--output-dir", tmp_path)
    assert code == 0, err
    for axis in drawn["curves.png"].axes:  # loss, accuracy
        assert axis.get_legend_handles_labels()[1] == ["train", "validation", "best epoch"]
        assert axis.get_xlim()[1] < 2.5  # two epochs ran: nothing drawn at 2.5, where 3 starts


def test_the_curves_mark_where_a_scheduled_unfreezing_happened(drawn, tmp_path, capsys):
    args = ["--dry-run", "--freeze-until", "layer4", "--unfreeze-schedule", "2:layer3"]
    code, out, err = run(capsys, *args, "--epochs", "2", "--output-dir", tmp_path)
    assert code == 0, err
    assert "\nunfreezing layer3, layer4" in out
    for axis in drawn["curves.png"].axes:  # loss, accuracy
        labels = axis.get_legend_handles_labels()[1]
        assert labels == ["train", "validation", "best epoch", "unfreeze layer3"]
        marks = [line.get_xdata() for line in axis.get_lines() if line.get_linestyle() == "--"]
        assert marks == [[1.5, 1.5]]  # between epoch 1 and epoch 2, where layer3 joined


def comparison(out):
    return " ".join(out[out.index("\nvs ") :].split("\n\n")[0].split())


def test_each_run_is_compared_with_the_earlier_run_that_differs_from_it_least(
    real_files, tmp_path, capsys
):
    # The Experiments table's way: a default run, then one setting changed per row.
    rows = [("default", []), ("head", ["--head-lr", "0.003"]), ("size", ["--image-size", "48"])]
    rows.append(("head2", ["--head-lr", "0.003"]))
    printed = {}
    for name, extra in rows:
        args = tiny(real_files, tmp_path, "--run-name", name, "--epochs", "1", *extra)
        code, printed[name], err = run(capsys, *args)
        assert code == 0, err
    line = comparison(printed["size"])  # against "default" (one change), not "head" (two)
    assert line.startswith("vs default (IMAGE_SIZE 32 -> 48): validation accuracy of the best")
    assert "the sampling error of the 10 validation images (two standard errors)" in line
    assert line.endswith("Runs with another --seed show how much runs differ.")
    out = printed["size"]
    table = out[out.index("the last 3 of 3 runs in summary.csv") :].splitlines()
    assert table[2].endswith("  default: IMAGE_SIZE=32")  # where each differs from this run
    assert table[3].endswith("  head: IMAGE_SIZE=32 HEAD_LR=0.003")
    assert table[4].endswith("  size: this run")
    assert comparison(printed["head2"]).startswith("vs head (the same settings): ")
    table = printed["head2"][printed["head2"].index("the last 4 of 4 runs") :].splitlines()
    assert table[3].endswith("  head: the same settings") and table[5].endswith("  head2: this run")


@pytest.mark.parametrize("minutes", ["0.5", "0.0", ""])
def test_the_minutes_are_compared_only_with_an_earlier_runs_time(minutes, capsys):
    # 0.0: a run under 0.3 s (a few images on a GPU); "": a cell cleared in a spreadsheet
    before = {"run": "old", "best_val_acc": "0.8", "minutes": minutes}
    now = {"run": "new", "best_val_acc": "0.82", "minutes": "1.5", "val_images": "5000"}
    ft.print_comparison(before, now, [])
    line = comparison(capsys.readouterr().out)
    if minutes == "0.5":
        assert "of the best epoch +2.0 points, 3.0x the minutes. Each figure is ±1.1 points" in line
    else:
        assert "of the best epoch +2.0 points. Each figure is ±1.1 points" in line


def test_a_perfect_validation_accuracy_still_has_a_sampling_error(capsys):
    before = {"run": "old", "best_val_acc": "0.9167", "minutes": "0.5"}
    now = {"run": "new", "best_val_acc": "1.0", "minutes": "0.5", "val_images": "12"}
    ft.print_comparison(before, now, [])  # 12 of 12 right: not ±0.0, but (14 of 16) ±16.5
    line = comparison(capsys.readouterr().out)
    assert "Each figure is ±16.5 points: the sampling error of the 12 validation images" in line


def test_a_dry_run_uses_synthetic_images_of_cifar10s_size_and_every_other_setting(tmp_path, capsys):
    args = ["--dry-run", "--freeze-until", "layer3", "--head-lr", "0.002", "--output-dir", tmp_path]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "data: 45,000 train / 5,000 validation / 10,000 test images, 10 classes, 32 px" in out
    assert "dry run: synthetic images, random weights, batches per phase: 1" in out
    assert "fc      trainable         5,130  2.0e-03" in out and "layer3  frozen" in out
    assert "(dry run: not added to summary.csv)" in out and not (tmp_path / "summary.csv").exists()
    assert (
        "(no pictures: `pip install matplotlib` draws inputs.png, curves.png, mistakes.png)" in out
    )
    train_set, test_set, classes = ft.synthetic_cifar10(0)
    assert train_set.tensors[0].shape == (50_000, 3, 32, 32) and len(test_set) == 10_000
    assert train_set.tensors[0].dtype == torch.uint8 and classes == ft.CIFAR10_CLASSES
    # CIFAR-10's 5,000 images a class, in a random order: a dry run's 64 test images hold each
    assert torch.bincount(train_set.tensors[1]).tolist() == [5_000] * 10
    assert train_set.tensors[1][:20].tolist() != list(range(10)) * 2
    assert " n/a " not in out[out.index("most often taken for") :]


def test_seed_fixes_the_new_heads_first_weights_the_shuffle_and_the_augmentation(
    tmp_path, monkeypatch
):
    started = []  # for each run: the head's first weights, the shuffle's and augmentation's seeds

    class Started(Exception):
        pass

    def record(cfg, model, optimizer, scaler, stopper, train_loader, inputs):
        head = model.fc.weight.detach().clone()
        shuffle = train_loader.sampler.generator.initial_seed()
        started.append((head, shuffle, inputs.generator.initial_seed()))
        raise Started  # the run goes no further

    monkeypatch.setattr(ft, "Run", record)
    for seed in (1, 2, 1):
        with pytest.raises(Started):
            ft.main(["--dry-run", "--seed", seed, "--output-dir", tmp_path])
    (first, shuffle, augment), (other, *_), (again, *_) = started
    assert shuffle == 1 and augment == 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_adam_is_fused_on_every_device(tmp_path, capsys, monkeypatch):
    # One kernel on CUDA and MPS, one C++ loop on the CPU: torch 2.5 and newer have all three.
    made = []
    adam = torch.optim.Adam

    def record(*args, **kwargs):
        made.append(kwargs)
        return adam(*args, **kwargs)

    monkeypatch.setattr(ft.torch.optim, "Adam", record)
    assert run(capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path)[0] == 0
    assert made == [{"fused": True}]
    assert "mps" in torch.utils._foreach_utils._get_fused_kernels_supported_devices()


def test_a_nan_loss_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    cross_entropy = torch.nn.functional.cross_entropy
    calls = []

    def diverging(logits, labels, **kwargs):
        calls.append(1)
        loss = cross_entropy(logits, labels, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss  # the first training batch

    monkeypatch.setattr(ft.F, "cross_entropy", diverging)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "nan")
    assert code == 1
    assert err == (
        "error: training diverged: the loss became nan. Try a lower learning rate (--head-lr,"
        " --backbone-lr), e.g. 10x smaller\n"
    )
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError(  # a Mac's GPU: torch raises a plain RuntimeError
            "MPS backend out of memory (MPS allocated: 5.20 GB, other allocations: 1.02 GB, max"
            " allowed: 6.80 GB). Tried to allocate 784.00 MB on private pool."
        ),
    ],
)
def test_a_gpu_out_of_memory_gets_one_line(tmp_path, capsys, monkeypatch, error):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(ft, "train_one_epoch", out_of_memory)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 1 and err == (
        "error: the GPU ran out of memory. Try a smaller --batch-size or --image-size\n"
    )


@pytest.mark.parametrize(
    "error",
    [
        None,  # this machine's own refusal: Linux refuses what no memory could hold
        RuntimeError(  # Windows, which has no overcommit, refuses what does not fit now
            "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: not enough memory: you"
            " tried to allocate 411041792 bytes."
        ),
    ],
)
def test_the_cpu_out_of_memory_gets_one_line(tmp_path, capsys, monkeypatch, error):
    # On Windows, photos at 224 px on a laptop's CPU with a large --batch-size: torch's allocator
    # raises a RuntimeError (Linux mostly lets the kernel kill the process instead).
    def out_of_memory(*args, **kwargs):
        if error is not None:
            raise error
        torch.empty(2**46)  # 256 TiB of float32, more than any address space holds

    monkeypatch.setattr(ft, "train_one_epoch", out_of_memory)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 1 and err == (
        "error: this machine ran out of memory. Try a smaller --batch-size or --image-size\n"
    )
    assert list(tmp_path.iterdir()) == []  # no epoch completed: the run folder is removed


def test_a_gpu_this_torch_has_no_kernels_for_gets_one_line(tmp_path, capsys, monkeypatch):
    # A Kaggle P100 (compute capability 6.0) with a torch built for 7.5 and newer: CUDA's error
    # comes at the first kernel, here moving the model to the GPU.
    def no_kernel(*args, **kwargs):
        raise RuntimeError(
            "CUDA error: no kernel image is available for execution on the device\nCUDA kernel"
            " errors might be asynchronously reported at some other API call"
        )

    monkeypatch.setattr(ft, "build_model", no_kernel)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla P100-PCIE-16GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_120"])
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 1 and err == (
        f"error: this torch ({torch.__version__}) has no kernels for this GPU"
        " (Tesla P100-PCIE-16GB, compute capability 6.0), only for sm_75 sm_80 sm_120. Install a"
        " torch built for it (torch's warning above may name one:"
        " https://pytorch.org/get-started/locally/), or another GPU\n"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied", "/somewhere/else"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x512 and 256x10)"),
    ],
)
def test_an_error_the_script_does_not_know_keeps_its_traceback(error, tmp_path, monkeypatch):
    # Not a full disk, not a dead worker: a bug, or a cause only its traceback names.
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(ft, "train_one_epoch", failing)
    with pytest.raises(type(error)) as raised:
        ft.cli(["--dry-run", "--output-dir", tmp_path, "--run-name", "bug"])
    assert raised.value is error
    assert not (tmp_path / "bug").exists()  # no epoch completed: the new run's folder is gone


def test_progress_is_a_live_bar_on_a_terminal_and_a_line_every_30_s_elsewhere(monkeypatch):
    # A log (`> log`, `| tee`) is not a terminal: it still gets progress, every 30 s.
    monkeypatch.setattr(ft.sys.stderr, "isatty", lambda: False, raising=False)
    logged = ft.progress_bar(range(3), "train")
    assert not logged.disable and logged.mininterval == 30 and logged.delay == 30
    monkeypatch.setattr(ft.sys.stderr, "isatty", lambda: True, raising=False)
    live = ft.progress_bar(range(3), "train")
    assert not live.disable and live.mininterval == 0.1


def test_progress_in_a_notebooks_cell_is_a_live_bar(monkeypatch):
    # The script pasted into a cell, or %run: stderr is the kernel's stream, which is no terminal
    # (ipykernel's OutStream: isatty() is False) but draws tqdm's carriage returns as one
    monkeypatch.setattr(ft.sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(ft, "IN_A_KERNEL", True)  # "ipykernel" in sys.modules, as it started
    live = ft.progress_bar(range(3), "train")
    assert not live.disable and live.mininterval == 0.1 and live.delay == 0.1


def test_progress_in_idles_shell_is_drawn_as_in_a_log(monkeypatch):
    # IDLE's shell says it is a terminal but draws no carriage return: each redraw of a live bar
    # lengthened one line, and the shell slowed with it (measured: reading 50,000 images fell to 3
    # a second within 20 seconds)
    monkeypatch.setattr(ft.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setitem(ft.sys.modules, "idlelib", SimpleNamespace())
    bar = ft.progress_bar(range(3), "train")
    assert not bar.disable and bar.mininterval == 30 and bar.delay == 30


def test_pictures_show_the_inputs_the_curves_and_the_mistakes(
    with_matplotlib, real_files, tmp_path, capsys
):
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--run-name", "pictures"))
    assert code == 0, err
    for name in ["inputs.png", "curves.png", "mistakes.png"]:
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_are_drawn_under_a_notebooks_matplotlib_backend(
    with_matplotlib, torch_home, tmp_path
):
    # `!python fine_tuning.py` in a notebook inherits the kernel's MPLBACKEND (ipykernel sets
    # inline), which the `python` on PATH may lack: its `import matplotlib` raised ValueError
    if importlib.util.find_spec("matplotlib_inline") is not None:
        pytest.skip("matplotlib-inline is installed: its backend is valid here")
    env = {**script_env(torch_home), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    del env["FT_TEST_NO_MATPLOTLIB"]
    args = [*LAUNCHER, "--dry-run", "--output-dir", tmp_path, "--run-name", "notebook"]
    done = subprocess.run([str(arg) for arg in args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for name in ["inputs.png", "curves.png", "mistakes.png"]:
        assert (tmp_path / "notebook" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mistakes_png_shows_the_16_test_images_most_confidently_wrong(
    with_matplotlib, tmp_path, monkeypatch
):
    grids = {}  # file name: the titles of its images

    def record(figure, images, titles, title, path):
        grids[path.name] = titles

    monkeypatch.setattr(ft, "image_grid", record)
    monkeypatch.setattr(ft, "save_figure", lambda figure, path: None)
    labels = torch.zeros(20, dtype=torch.long)  # 20 cats
    predicted = torch.ones(20)
    predicted[19] = 0  # the surest prediction is right
    confidence = torch.arange(20) / 20
    test_set = TensorDataset(torch.zeros(20, 3, 8, 8, dtype=torch.uint8), labels)
    history = [dict(epoch=1, train_loss=1.0, val_loss=1.0, train_acc=0.5, val_acc=0.5)]
    cfg = SimpleNamespace(unfreeze_schedule={}, classes=["cat", "dog"])
    run = SimpleNamespace(history=history, best_epoch=1, dir=tmp_path, cfg=cfg)
    ft.save_pictures(run, test_set, torch.stack([predicted, confidence], 1))
    surest_wrong = range(18, 2, -1)  # images 18 down to 3, of the 19 wrong
    expected = [f"cat\n-> dog ({confidence[i]:.0%})" for i in surest_wrong]
    assert grids["mistakes.png"] == expected


@pytest.mark.parametrize("epochs", [1, 2, 60])
def test_the_curves_label_whole_epochs_few_enough_to_read(epochs, drawn, monkeypatch):
    monkeypatch.setattr(ft, "image_grid", lambda *args: None)  # mistakes.png: not under test
    history = [
        dict(epoch=e, train_loss=1 / e, val_loss=1 / e, train_acc=0.5, val_acc=0.5)
        for e in range(1, epochs + 1)
    ]
    cfg = SimpleNamespace(unfreeze_schedule={}, classes=["cat", "dog"])
    run = SimpleNamespace(history=history, best_epoch=epochs, dir=Path("runs") / "r", cfg=cfg)
    test_set = TensorDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))
    ft.save_pictures(run, test_set, torch.tensor([[0.0, 0.9], [1.0, 0.9]]))
    for axis in drawn["curves.png"].axes:  # loss, accuracy
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert all(tick == int(tick) for tick in ticks), ticks  # no epoch 0.98
        assert 1 <= len(ticks) <= 15, ticks  # 60 labels overlap into a smear
        assert 1 in ticks or epochs > 10


def test_long_class_names_in_a_picture_neither_overlap_nor_leave_it(drawn):
    names = ["Tomato___Tomato_Yellow_Leaf_Curl_Virus", "Corn_(maize)___Northern_Leaf_Blight"]
    titles = [f"{names[i % 2]}\n-> {names[1 - i % 2]} (42%)" for i in range(16)]  # PlantVillage
    images = torch.zeros(16, 8, 8, 3)
    figure = ft.new_figure(figsize=(8, 9))
    ft.image_grid(figure, images, titles, "mistakes", Path("runs") / "r" / "mistakes.png")
    figure = drawn["mistakes.png"]
    figure.draw_without_rendering()
    boxes = [axis.title.get_window_extent() for axis in figure.axes]
    for box in boxes:
        assert box.x0 >= 0 and box.x1 <= figure.bbox.x1  # within the picture
    for left, right in zip(boxes[:-1], boxes[1:], strict=True):
        if abs(left.y0 - right.y0) < 1:  # the same row
            assert left.x1 < right.x0, "titles overlap"
    for axis, title in zip(figure.axes, titles, strict=True):
        assert "".join(axis.get_title().split()) == "".join(title.split())  # wrapped, all there


def test_class_names_with_dollar_signs_are_drawn_as_written(drawn):
    # Between two $ signs matplotlib reads TeX: the title of a $5 taken for a $10 lost its $ signs
    # and came out in italics; where the text between is no formula, drawing raised ValueError
    titles = ["$5\n-> $10 (42%)", "price_$\n-> price_$$ (42%)"]
    figure = ft.new_figure(figsize=(8, 9))
    ft.image_grid(figure, torch.zeros(2, 8, 8, 3), titles, "mistakes", Path("r") / "m.png")
    drawn["m.png"].draw_without_rendering()
    for axis, title in zip(drawn["m.png"].axes, titles, strict=False):
        assert axis.get_title() == title and not axis.title.get_parse_math()  # as written


def test_drawing_inputs_png_leaves_what_training_draws_as_it_was(drawn):
    colours = torch.randint(0, 256, (40, 3, 1, 1), dtype=torch.uint8)
    images = colours.expand(40, 3, 32, 32).clone()  # an image of one colour each
    inputs = ft.ModelInput(32, seed=0)
    run = SimpleNamespace(train_set=TensorDataset(images, torch.arange(40) % 10), inputs=inputs)
    run.cfg = SimpleNamespace(classes=ft.CIFAR10_CLASSES)
    run.dir = Path("runs") / "r"
    before = inputs.generator.get_state()
    ft.draw_inputs(run)  # 16 images augmented, as training augments them
    axes = drawn["inputs.png"].axes
    titles = [axis.get_title() for axis in axes]
    assert titles == [ft.CIFAR10_CLASSES[n % 10] for n in range(0, 32, 2)]  # every second image
    assert torch.equal(inputs.generator.get_state(), before)
    # Shown in their own colours, not as the normalised numbers the network gets: the centre of a
    # crop is never the padding
    centres = [torch.from_numpy(axis.images[0].get_array()[16, 16]) for axis in axes]
    expected = [colours[n].flatten() / 255 for n in range(0, 32, 2)]
    assert torch.allclose(torch.stack(centres), torch.stack(expected))


def test_the_readme_code_classifies_images_with_a_best_pt_trained_on_a_gpu_as_training_saw_them(
    real_files, tmp_path, capsys, monkeypatch
):
    assert run(capsys, *tiny(real_files, tmp_path, "--run-name", "done"))[0] == 0
    best = tmp_path / "done" / "best.pt"
    save_as_on_a_gpu(load_state(best), best, monkeypatch)
    try:
        torch.load(best, weights_only=True)  # what the README's code did before map_location
        raise AssertionError("a GPU's best.pt loaded on a CPU without map_location")
    except RuntimeError as error:
        assert "Attempting to deserialize object on a CUDA device" in str(error)
    # A phone's photo, stored sideways with the EXIF tag that turns it upright: red on the left.
    photo = tmp_path / "photos" / "cats" / "my photo.jpg"
    photo.parent.mkdir(parents=True)
    image = Image.new("RGB", (64, 48), (30, 120, 200))
    image.paste((220, 20, 20), (0, 0, 32, 48))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(photo, exif=exif)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(args[0]) if isinstance(module, ResNet) else None
    )
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using the fine-tuned model") :]
    code = section.split("```python\n")[1].split("```")[0]
    code = code.replace('"runs/<run name>"', repr(str(tmp_path / "done")))
    code = code.replace('"./data"', repr(str(real_files))).replace(
        '"my_photo.jpg"', repr(str(photo))
    )
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        hook.remove()
    out = capsys.readouterr().out
    assert re.fullmatch(r"true: \w+, predicted: \w+ \(\d+% sure\)\n\w+ \(\d+% sure\)\n", out), out
    # The photo reached the model as training feeds it: upright, at the run's size, normalised.
    photos, _ = ft.load_image_folder(tmp_path / "photos", 32)
    images, _ = photos.tensors
    trained_on = ft.ModelInput(32, seed=0).eval()(images)
    assert torch.allclose(seen[-1], trained_on, atol=1e-5)
