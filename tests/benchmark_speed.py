"""Training throughput of fine_tuning.py against the compute bound and a tutorial-style loop.

    python tests/benchmark_speed.py [--steps 40] [--rounds 3] [--image-size 224] [--other-layout]

In one process, on one machine, at the script's default settings (ResNet18, FREEZE_UNTIL,
BATCH_SIZE, IMAGE_SIZE "auto", fused Adam with the two learning rates), it measures images/s of:

  script     fine_tuning.train_one_epoch: its real DataLoader, device-side augmentation and
             bookkeeping, on a full-size CIFAR-10 in the official file layout (synthetic pixels);
  bound      the same model, freezing, batch size and optimizer on tensors already on the
             device: no data pipeline, no bookkeeping;
  baseline   PyTorch's transfer-learning-tutorial style: torchvision CIFAR10 with PIL
             transforms, a 4-worker DataLoader, default Adam, .to(device) and loss.item()
             every batch, model.train() for the whole model.

The loops run in interleaved rounds (script, bound, baseline, script, ...) after a warm-up,
and the median of the rounds is reported, so slow drifts of a shared machine hit all three.
Then it runs `python fine_tuning.py` itself on the same files, to time start-up (launch to
the first training batch) and to read the peak resident memory of a real run.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, models, transforms  # noqa: E402

import fine_tuning as ft  # noqa: E402
from fake_cifar10 import trust_test_md5, write_cifar10  # noqa: E402


def default_cfg(data_dir, image_size):
    """The script's defaults, checked and resolved by its own parser (IMAGE_SIZE "auto" by device)."""
    return ft.parse_settings(
        ["--data-dir", str(data_dir), "--weights", "none", "--image-size", image_size]
    )


def frozen_model(cfg, device, hw=None):
    """The script's model, frozen as at its defaults; with `hw`, placed as the script places it (device,
    memory layout, and mixed precision on a GPU), else in float32 and the default layout (the baseline)."""
    torch.manual_seed(0)
    model = ft.build_model("none")  # same compute as the ImageNet weights
    ft.freeze(model, cfg.freeze_until)
    return hw.prepare(model) if hw else model.to(device)


def synchronize(device):
    if device.type == "cuda":  # GPU work is asynchronous: wait for it before reading the clock
        torch.cuda.synchronize()


class ScriptLoop:
    name = "script"

    def __init__(self, cfg, device):
        self.hw, self.cfg, self.epoch = ft.Hardware(cfg), cfg, 0
        self.loader, self.val_loader, _, _ = ft.load_data(cfg, self.hw)
        self.model = frozen_model(cfg, device, self.hw)
        self.optimizer = ft.make_optimizer(ft.param_groups(self.model, cfg), device)
        self.device = device

    def run(self, steps):
        self.epoch += 1
        self.cfg.max_batches = steps
        ft.train_one_epoch(self.model, self.loader, self.optimizer, self.hw, self.epoch, self.cfg)
        synchronize(self.device)


class BoundLoop:
    name = "bound"

    def __init__(self, cfg, device, memory_format=None):
        self.hw = ft.Hardware(cfg)
        if memory_format is not None:  # --other-layout: the layout the script does not use
            self.hw.memory_format, self.name = memory_format, f"bound-{str(memory_format)[6:]}"
        self.model = frozen_model(cfg, device, self.hw)
        self.optimizer = ft.make_optimizer(ft.param_groups(self.model, cfg), device)
        size = cfg.image_size
        self.x = torch.randn(cfg.batch_size, 3, size, size, device=device).contiguous(
            memory_format=self.hw.memory_format
        )
        self.y = torch.randint(0, 10, (cfg.batch_size,), device=device)
        self.device = device

    def run(self, steps):
        ft.set_train_mode(self.model)
        for _ in range(steps):  # the script's training step, without its data or bookkeeping
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            self.hw.scaler.scale(loss).backward()  # the scaler passes the loss through unless fp16
            self.hw.scaler.step(self.optimizer)
            self.hw.scaler.update()
        synchronize(self.device)


class BaselineLoop:
    name = "baseline"

    def __init__(self, cfg, device):
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        if cfg.image_size != 32:
            steps.append(transforms.Resize(cfg.image_size))
        steps += [
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
        dataset = datasets.CIFAR10(cfg.data_dir, train=True, transform=transforms.Compose(steps))
        loader = DataLoader(
            dataset, cfg.batch_size, shuffle=True, num_workers=4, persistent_workers=True
        )
        self.batches = iter(self.cycle(loader))
        self.model = frozen_model(cfg, device)  # float32, as the tutorial
        self.optimizer = torch.optim.Adam(ft.param_groups(self.model, cfg))
        self.device = device

    @staticmethod
    def cycle(loader):
        while True:
            yield from loader

    def run(self, steps):
        self.model.train()  # the tutorial: frozen BatchNorm layers keep updating too
        running_loss = running_corrects = 0
        for _ in range(steps):
            inputs, labels = next(self.batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self.model(inputs)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            running_corrects += torch.sum(outputs.argmax(1) == labels.data)


def measure(loops, steps, rounds, batch_size):
    for loop in loops:  # warm-up: allocator, kernels, workers
        loop.run(max(3, steps // 4))
    rates = {loop.name: [] for loop in loops}
    for r in range(rounds):
        for loop in loops:
            start = time.perf_counter()
            loop.run(steps)
            rates[loop.name].append(steps * batch_size / (time.perf_counter() - start))
        print(
            f"  round {r + 1}: " + "   ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()),
            flush=True,
        )
    return {name: statistics.median(values) for name, values in rates.items()}


def real_run(data_dir, md5_file, torch_home, out_dir, train_seconds, image_size):
    """Start `python fine_tuning.py` (defaults) through the test launcher; Ctrl-C it after a while."""
    env = {
        **os.environ,
        "TORCH_HOME": str(torch_home),
        "FT_TEST_MD5": str(md5_file),
        "PYTHONUNBUFFERED": "1",
    }
    start = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "launcher.py"),
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(out_dir),
            "--image-size",
            image_size,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    startup = None
    for line in process.stdout:
        if line.startswith("epoch  train loss"):  # printed just before the first batch is drawn
            startup = time.perf_counter() - start
            time.sleep(train_seconds)
            process.send_signal(signal.SIGINT)
            break
    process.stdout.read()
    process.wait()
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    return startup, peak_mib, process.returncode


def one_epoch(data_dir, md5_file, torch_home, out_dir, image_size):
    """`python fine_tuning.py --epochs 1` through the test launcher, whole: (seconds, exit code, epoch row)."""
    env = {**os.environ, "TORCH_HOME": str(torch_home), "FT_TEST_MD5": str(md5_file)}
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "launcher.py"),
            "--epochs",
            "1",
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(out_dir),
            "--image-size",
            image_size,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    row = next(
        (line.strip() for line in result.stdout.splitlines() if line.strip().startswith("1 ")),
        "none",
    )
    return time.perf_counter() - start, result.returncode, row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--train-seconds", type=float, default=20, help="training time of the real run"
    )
    parser.add_argument(
        "--image-size", default="auto", help="IMAGE_SIZE to measure (default: the script's auto)"
    )
    parser.add_argument(
        "--script-only",
        action="store_true",
        help="time the script's loop alone, and a validation "
        "pass from 10 batches (for slow settings such as 224 px on a CPU)",
    )
    parser.add_argument(
        "--epoch",
        action="store_true",
        help="then run `python fine_tuning.py --epochs 1` whole on "
        "the same files, and time it from launch to exit (test pass included)",
    )
    parser.add_argument(
        "--other-layout",
        action="store_true",
        help="also time the bound in the memory layout the script does not use on this device",
    )
    args = parser.parse_args()
    device = ft.parse_settings([]).device
    steps = args.steps or (200 if device.type == "cuda" else 40)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            "writing a full-size CIFAR-10 (50,000 + 10,000 synthetic images) in the official layout..."
        )
        sums = write_cifar10(tmp / "data", per_batch=10_000, n_test=10_000)
        trust_test_md5(sums)
        (tmp / "md5.json").write_text(json.dumps(sums))
        weights = tmp / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        weights.parent.mkdir(parents=True)
        torch.save(models.resnet18().state_dict(), weights)

        cfg = default_cfg(tmp / "data", args.image_size)
        name = (
            torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
        )
        print(
            f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"image size {cfg.image_size}, batch {cfg.batch_size}, freeze until {cfg.freeze_until}, "
            f"{steps} steps x {args.rounds} rounds"
        )
        # First, while this process has no other children: ru_maxrss of children is then the script's own.
        if not args.script_only:
            startup, peak_mib, code = real_run(
                tmp / "data",
                tmp / "md5.json",
                tmp / "home",
                tmp / "runs",
                args.train_seconds,
                args.image_size,
            )
        loops = [ScriptLoop(cfg, device)] + (
            [] if args.script_only else [BoundLoop(cfg, device), BaselineLoop(cfg, device)]
        )
        if args.other_layout:
            other = torch.contiguous_format if device.type == "cuda" else torch.channels_last
            loops.append(BoundLoop(cfg, device, other))
        rates = measure(loops, steps, args.rounds, cfg.batch_size)
        script = loops[0]
        script.cfg.max_batches = 10 if args.script_only else None
        start = time.perf_counter()
        ft.evaluate(script.model, script.val_loader, script.hw, script.cfg, "val")
        validation_s = (
            (time.perf_counter() - start)
            * len(script.val_loader)
            / min(len(script.val_loader), script.cfg.max_batches or len(script.val_loader))
        )
        if args.epoch:
            del loops, script  # free the device's memory for the real run
            epoch = one_epoch(
                tmp / "data", tmp / "md5.json", tmp / "home", tmp / "epoch", args.image_size
            )

    print(f"\n{'loop':<20}{'images/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<20}{rate:>10.1f}")
    if not args.script_only:
        print(f"script / bound     {rates['script'] / rates['bound']:.3f}")
        print(f"script / baseline  {rates['script'] / rates['baseline']:.3f}")
        print(
            f"python fine_tuning.py: first batch {startup:.1f} s after launch; peak RSS {peak_mib:.0f} MiB "
            f"(exit code {code} after Ctrl-C)"
        )
    print(
        f"benchmark process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.epoch:
        print(
            f"python fine_tuning.py --epochs 1: {epoch[0]:.1f} s from launch to exit (exit code {epoch[1]}); "
            f"its epoch row: {epoch[2]}"
        )
    per_epoch = 45_000 / rates["script"]
    print(
        f"one epoch at this rate: training {per_epoch:.0f} s (45,000 images), validation {validation_s:.1f} s "
        f"(5,000 images{', from 10 batches' if args.script_only else ''}) = "
        f"{validation_s / (per_epoch + validation_s):.0%} of the epoch"
    )


if __name__ == "__main__":
    main()
