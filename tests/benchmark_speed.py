"""Training throughput of fine_tuning.py against the compute bound and a tutorial-style loop.

    python tests/benchmark_speed.py [--steps 40] [--rounds 3] [--image-size 224] [--epoch]

In one process, at the script's default settings (ResNet18 frozen up to layer2, batch 32, fused
Adam with the two learning rates), it measures images/s of three loops:

  script     fine_tuning.train_one_epoch: its DataLoader over CIFAR-10 in memory, the batched
             crop and flip, the progress bar and the loss checks, on a full-size CIFAR-10 in the
             official file layout (synthetic pixels), read by fine_tuning.load_cifar10;
  bound      the same model, freezing, batch and optimizer on one batch already on the device:
             no data, no augmentation, no bookkeeping;
  baseline   PyTorch's transfer-learning-tutorial style: torchvision's CIFAR10 with PIL
             transforms, 4 DataLoader workers, default Adam, loss.item() every batch.

The loops run in interleaved rounds (script, bound, baseline, script, ...) after a warm-up and
the median of the rounds is reported, so the drifts of a shared machine hit all three. It also
times the crop and flip (fine_tuning.random_crop_flip on a batch, against torchvision's v2
RandomCrop and RandomHorizontalFlip image by image), and with --epoch one whole
`python fine_tuning.py --epochs 1` on the same files, from launch to exit.
"""

import argparse
import json
import os
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
from torchvision.transforms import v2  # noqa: E402

import fine_tuning as ft  # noqa: E402
from fake_cifar10 import trust_test_md5, write_cifar10  # noqa: E402


def synchronize(device):
    if device.type == "cuda":  # GPU work is asynchronous: wait for it before reading the clock
        torch.cuda.synchronize()


def default_model(device, amp_dtype=None):
    torch.manual_seed(0)
    model = ft.build_model(10, "none")  # the same compute as the ImageNet weights
    ft.freeze(model, ft.FREEZE_UNTIL)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    lrs = ft.block_lrs(ft.BACKBONE_LR, ft.LAYER_LR_DECAY, ft.HEAD_LR)
    optimizer = torch.optim.Adam(ft.param_groups(model, lrs), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return model, optimizer, scaler


class ScriptLoop:
    name = "script"

    def __init__(self, data_dir, device, amp_dtype, image_size):
        full_train, test_set, _ = ft.load_cifar10(data_dir)
        train_set, self.val_set = ft.split_off(full_train, ft.VAL_FRACTION)
        loaders = ft.make_loaders(train_set, self.val_set, test_set, ft.BATCH_SIZE, 0, ft.SEED)
        self.loader, self.val_loader, _ = loaders
        self.model, self.optimizer, self.scaler = default_model(device, amp_dtype)
        self.inputs = ft.ModelInput(image_size, ft.SEED).to(device)
        self.device, self.amp_dtype = device, amp_dtype

    def run(self, steps):
        batches = torch.utils.data.Subset(self.loader.dataset, range(steps * ft.BATCH_SIZE))
        sampler = torch.utils.data.RandomSampler(batches, generator=self.loader.sampler.generator)
        loader = DataLoader(batches, ft.BATCH_SIZE, sampler=sampler, drop_last=True)
        ft.set_train_mode(self.model, ft.FROZEN_BN)
        args = (self.model, loader, self.optimizer, self.scaler, self.inputs, self.amp_dtype)
        ft.train_one_epoch(*args)
        synchronize(self.device)


class BoundLoop:
    name = "bound"

    def __init__(self, device, amp_dtype, image_size):
        self.model, self.optimizer, self.scaler = default_model(device, amp_dtype)
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        x = torch.randn(ft.BATCH_SIZE, 3, image_size, image_size, device=device)
        self.x = x.contiguous(memory_format=memory_format)
        self.y = torch.randint(0, 10, (ft.BATCH_SIZE,), device=device)
        self.device, self.amp_dtype = device, amp_dtype

    def run(self, steps):
        ft.set_train_mode(self.model)
        for _ in range(steps):  # the script's training step, without its data or bookkeeping
            with torch.autocast(self.device.type, self.amp_dtype, enabled=bool(self.amp_dtype)):
                loss = F.cross_entropy(self.model(self.x), self.y)
            self.optimizer.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        synchronize(self.device)


class BaselineLoop:
    name = "baseline"

    def __init__(self, data_dir, device, image_size):
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        if image_size != 32:
            steps.append(transforms.Resize(image_size))
        steps += [
            transforms.ToTensor(),
            transforms.Normalize(ft.IMAGENET.transforms().mean, ft.IMAGENET.transforms().std),
        ]
        dataset = datasets.CIFAR10(data_dir, train=True, transform=transforms.Compose(steps))
        loader = DataLoader(
            dataset, ft.BATCH_SIZE, shuffle=True, num_workers=4, persistent_workers=True
        )
        self.batches = self.cycle(loader)
        torch.manual_seed(0)
        self.model = ft.build_model(10, "none")
        ft.freeze(self.model, ft.FREEZE_UNTIL)
        self.model.to(device)
        lrs = ft.block_lrs(ft.BACKBONE_LR, ft.LAYER_LR_DECAY, ft.HEAD_LR)
        self.optimizer = torch.optim.Adam(ft.param_groups(self.model, lrs))  # the default: foreach
        self.device = device

    @staticmethod
    def cycle(loader):
        while True:
            yield from loader

    def run(self, steps):
        self.model.train()  # the tutorial: frozen BatchNorm layers keep updating too
        running_loss = 0.0
        for _ in range(steps):
            inputs, labels = next(self.batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            loss = F.cross_entropy(self.model(inputs), labels)
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item() * inputs.size(0)


def measure(loops, steps, rounds):
    for loop in loops:  # warm-up: the allocator, the kernels, the workers
        loop.run(max(3, steps // 4))
    rates = {loop.name: [] for loop in loops}
    for number in range(rounds):
        for loop in loops:
            start = time.perf_counter()
            loop.run(steps)
            rates[loop.name].append(steps * ft.BATCH_SIZE / (time.perf_counter() - start))
        print(f"  round {number + 1}: " + "   ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()))
    return {name: statistics.median(values) for name, values in rates.items()}


def augmentation_cost(device, repeats=50):
    """Microseconds per image: the script's batched crop and flip against v2's, image by image."""
    images = torch.randint(0, 256, (ft.BATCH_SIZE, 3, 32, 32), dtype=torch.uint8)
    per_image = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    generator = torch.Generator().manual_seed(0)
    on_device = images.to(device).float() / 255  # the script crops pixels from 0 to 1
    timings = {}
    for name, work in [
        (
            "script: random_crop_flip on the batch",
            lambda: ft.random_crop_flip(on_device, generator),
        ),
        ("v2 RandomCrop + RandomHorizontalFlip per image", lambda: [per_image(i) for i in images]),
    ]:
        work()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        synchronize(device)
        timings[name] = (time.perf_counter() - start) / repeats / ft.BATCH_SIZE * 1e6
    return timings


def one_epoch(data_dir, md5_file, torch_home, out_dir, image_size):
    """`python fine_tuning.py --epochs 1` through the launcher: (seconds, exit code, epoch row)."""
    env = {**os.environ, "TORCH_HOME": str(torch_home), "FT_TEST_MD5": str(md5_file)}
    command = [sys.executable, str(ROOT / "tests" / "launcher.py"), "--epochs", "1"]
    command += [
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out_dir),
        "--image-size",
        str(image_size),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    rows = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("1 ")]
    return time.perf_counter() - start, result.returncode, rows[0] if rows else result.stderr[-300:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="default: the script's auto")
    parser.add_argument("--script-only", action="store_true", help="time the script's loop alone")
    parser.add_argument("--epoch", action="store_true", help="then time one whole real run")
    args = parser.parse_args()
    image_size = args.image_size or (224 if torch.cuda.is_available() else 32)
    device, amp_dtype = ft.choose_device()
    steps = args.steps or (200 if device.type == "cuda" else 40)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            "writing a full-size CIFAR-10 (50,000 + 10,000 synthetic images) in the official layout"
        )
        sums = write_cifar10(tmp / "data", per_batch=10_000, n_test=10_000)
        trust_test_md5(sums)
        (tmp / "md5.json").write_text(json.dumps(sums))
        weights = tmp / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        weights.parent.mkdir(parents=True)
        torch.save(models.resnet18().state_dict(), weights)
        name = (
            torch.cuda.get_device_name() if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
        )
        threads = torch.get_num_threads()
        print(f"{name}, torch {torch.__version__}, {threads} threads, {image_size} px, batch 32")
        loops = [ScriptLoop(tmp / "data", device, amp_dtype, image_size)]
        if not args.script_only:
            loops.append(BoundLoop(device, amp_dtype, image_size))
            loops.append(BaselineLoop(tmp / "data", device, image_size))
        rates = measure(loops, steps, args.rounds)
        script = loops[0]
        start = time.perf_counter()
        ft.evaluate(script.model, script.val_loader, script.inputs, amp_dtype)
        synchronize(device)
        validation_s = time.perf_counter() - start
        augmentation = augmentation_cost(device)
        if args.epoch:
            del loops, script  # free the device's memory for the real run
            epoch = one_epoch(
                tmp / "data", tmp / "md5.json", tmp / "home", tmp / "runs", image_size
            )

    print(f"\n{'loop':<12}{'images/s':>10}")
    for loop, rate in rates.items():
        print(f"{loop:<12}{rate:>10.1f}")
    if not args.script_only:
        print(f"script / bound     {rates['script'] / rates['bound']:.3f}")
        print(f"script / baseline  {rates['script'] / rates['baseline']:.3f}")
    per_epoch = 45_000 / rates["script"]
    print(f"one epoch at this rate: training {per_epoch:.0f} s (45,000 images), validation"
          f" {validation_s:.1f} s (5,000 images)")  # fmt: skip
    for what, microseconds in augmentation.items():
        print(f"crop and flip, {what}: {microseconds:.1f} us an image")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.epoch:
        print(f"python fine_tuning.py --epochs 1: {epoch[0]:.1f} s from launch to exit (exit code"
              f" {epoch[1]}); its epoch row: {epoch[2]}")  # fmt: skip


if __name__ == "__main__":
    main()
