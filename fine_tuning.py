"""Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10 (Example 2 of a transfer-learning series).

Read it from the top, beside README.md, down to the banner "The lesson ends here": the settings,
the data, the model and its new head, freezing, learning rates, the training step, evaluation,
early stopping, and main(), the story of a run. Below the banner is plumbing.

    python fine_tuning.py --dry-run              # offline check in seconds: synthetic data
    python fine_tuning.py                        # the real run: downloads CIFAR-10 and the weights
    python fine_tuning.py --freeze-until layer4  # any constant below as a flag; --help lists them

`##` comments teach, `#` comments explain the code: `sed '/^ *##/d' fine_tuning.py` keeps the code.
"""

# === Settings: the one place to edit. Each is also a flag: EPOCHS -> --epochs 3 ===================
# data
DATA_DIR = "./data"  # CIFAR-10 (about 170 MB) is downloaded here on the first run
SEED = 0  # fixes the split, the new head's first weights, the shuffle and the augmentation
VAL_FRACTION = 0.1  # of the 50,000 training images: 45,000 train / 5,000 validation
TRAIN_PER_CLASS = "all"  # "all", or keep N training images per class: try 100 (little data)
IMAGE_SIZE = "auto"  # pixels the model sees: "auto" = 224 on CUDA (ImageNet's), 32 elsewhere
# model
WEIGHTS = "IMAGENET1K_V1"  # ImageNet's; "none": random (from scratch); or a ResNet18 weights file
FREEZE_UNTIL = (
    "layer2"  # last frozen block: none, stem, layer1..layer4 (layer4: feature extraction)
)
UNFREEZE_SCHEDULE = {}  # gradual unfreezing: {2: "layer3"} releases layer3 at the start of epoch 2
FROZEN_BN = "eval"  # BatchNorm of frozen blocks: "eval" keeps ImageNet's statistics, "train" adapts
# optimizer
BATCH_SIZE = 32  # images per step
EPOCHS = 15  # at most: early stopping may end the run sooner
BACKBONE_LR = 1e-4  # layer4's learning rate: small steps keep what ImageNet taught
LAYER_LR_DECAY = 1.0  # each block below layer4 learns at this times the rate above it (try 0.5)
HEAD_LR = 1e-3  # the new head starts from random weights: 10x larger steps
# early stopping
MONITOR = "val_loss"  # what early stopping watches: "val_loss" or "val_acc"
PATIENCE = 3  # epochs without improvement before training stops
MIN_DELTA = 0.001  # the smallest change that counts (loss, or accuracy as a fraction)
# system
NUM_WORKERS = "auto"  # DataLoader worker processes: "auto" = 2 on CUDA, 0 elsewhere
OUTPUT_DIR = "./runs"  # each run writes OUTPUT_DIR/<run name>/; finished runs add to summary.csv

import argparse
import csv
import errno
import importlib.metadata
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import sys
import textwrap
import time
import urllib.error
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from filelock import FileLock, Timeout  # installed with torch
    from torch import nn
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset
    from torchvision import datasets, models
    from tqdm import tqdm
except ImportError as missing:
    sys.exit(f"error: {missing.name} is not installed. Run: pip install -r requirements.txt")
except RuntimeError as mismatch:
    # "operator torchvision::nms does not exist": this torchvision was built for another torch
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision")}
    sys.exit(
        f"error: torchvision {versions['torchvision']} does not match torch {versions['torch']}"
        f" ({mismatch}). Install them together: pip install --upgrade torch torchvision"
    )

BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]  # ResNet18's, input to output
NUM_CLASSES = 10
IMAGENET = models.ResNet18_Weights.IMAGENET1K_V1


# === 1. Data: CIFAR-10 and a stratified validation split ==========================================
## CIFAR-10 has 50,000 training and 10,000 test images of 32x32 pixels in 10 classes. The test set
## is used once, at the very end. To choose the best epoch and to stop early we hold out a
## validation split from the training images: the same share of every class ("stratified").
def load_cifar10(data_dir):
    """CIFAR-10's training and test sets as TensorDatasets of uint8 images (N, 3, 32, 32)."""
    ## torchvision downloads CIFAR-10 once, checks its md5 sums, and from then on only reads it.
    train = datasets.CIFAR10(data_dir, train=True, download=True)
    test = datasets.CIFAR10(data_dir, train=False, download=True)
    ## The images stay in memory as one uint8 tensor (150 MB): the DataLoader only indexes it,
    ## with no PIL image per sample, and the pixels become floats on the device, a batch at a time.
    sets = []
    for split in (train, test):
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        sets.append(TensorDataset(images, torch.tensor(split.targets)))
    return sets[0], sets[1], train.classes


def stratified_split(labels, val_fraction, seed, train_per_class="all"):
    """Indices (train, val): each class gives round(val_fraction x its size) images to validation
    and the rest, or a random `train_per_class` of them, to training."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        if train_per_class == "all":
            train_parts.append(members[n_val:])
        else:
            train_parts.append(members[n_val : n_val + train_per_class])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def split_train_val(train_set, val_fraction, seed, train_per_class="all"):
    images, labels = train_set.tensors
    train_idx, val_idx = stratified_split(labels, val_fraction, seed, train_per_class)
    train_set = TensorDataset(images[train_idx], labels[train_idx])
    return train_set, TensorDataset(images[val_idx], labels[val_idx])


def make_loaders(train_set, val_set, test_set, batch_size, num_workers, device):
    """The three DataLoaders. The training loader shuffles with a generator of its own, which
    train_one_epoch() seeds each epoch: a resumed run sees what an uninterrupted one would."""
    options = dict(
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",  # page-locked memory: copies to the GPU run alongside it
        worker_init_fn=ignore_ctrl_c,
    )
    sampler = RandomSampler(train_set, generator=torch.Generator())
    ## drop_last drops the last, smaller batch (45,000 = 1,406 x 32 + 8): every step has the same
    ## size, and no batch can be a single image, which BatchNorm cannot normalise in train mode.
    train_loader = DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, **options)
    ## Evaluation keeps no gradients, so twice the batch fits in the same memory.
    val_loader = DataLoader(val_set, 2 * batch_size, **options)
    test_loader = DataLoader(test_set, 2 * batch_size, **options)
    return train_loader, val_loader, test_loader


def ignore_ctrl_c(worker_id):
    # Ctrl-C reaches DataLoader workers too; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


## Augmentation: a random 32x32 crop of the image padded by 4 black pixels, and a horizontal flip
## half of the time, the classic CIFAR recipe. It is what transforms.v2.RandomCrop(32, padding=4)
## and RandomHorizontalFlip() do to one image, done here to a batch on the device: image by image
## on the CPU they took 184 us an image, this 7 us (tests/benchmark_speed.py, 2 CPU cores), and
## CPU work per image can starve a fast GPU. Validation and test images are never augmented.
def random_crop_flip(images, generator, padding=4):
    n, _, height, width = images.shape
    padded = F.pad(images, [padding] * 4)
    tops = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    crops = []
    for image, top, left, flip in zip(padded, tops, lefts, flips, strict=True):
        crop = image[:, top : top + height, left : left + width]
        if flip:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


## The pretrained weights expect what they saw in training: pixels from 0 to 1, normalised with
## ImageNet's mean and standard deviation per colour channel, at about ImageNet's size.
class ImageNetInput(nn.Module):
    """uint8 batch -> normalised float batch of `image_size` pixels."""

    def __init__(self, image_size):
        super().__init__()
        self.image_size = image_size
        preset = IMAGENET.transforms()
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1))

    def forward(self, images):
        x = (images.float() / 255 - self.mean) / self.std
        if x.shape[-1] != self.image_size:
            ## 32 -> 224 pixels for a whole batch at once, on the device.
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # cuDNN's fastest layout
        return x


# === 2. The model: ResNet18 with ImageNet weights and a new 10-class head =========================
## The pretrained network ends in ImageNet's 1000-way classifier, `fc`. We keep everything before
## it, the feature extractor, and replace `fc` by a new 10-way layer for CIFAR-10's classes.
def build_model(weights="IMAGENET1K_V1"):
    """ResNet18 with the given weights and a new, randomly initialised 10-way head."""
    if weights == "IMAGENET1K_V1":
        ## Downloaded once into torch's cache (45 MB), checked against its hash, then read there.
        model = models.resnet18(weights=models.ResNet18_Weights.IMAGENET1K_V1)
    else:
        model = models.resnet18()  # random weights
        if weights != "none":  # a ResNet18 state dict in a file, such as a copy of ImageNet's
            ## weights_only=True refuses pickled Python objects: unpickling a file can run code.
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)
    return model


# === 3. Freezing: which blocks learn ==============================================================
## Early blocks detect generic things (edges, colours, textures) that help on any image, so we
## freeze them; later blocks combine them into ImageNet's object parts, so we fine-tune them.
## The default freezes stem, layer1 and layer2, and fine-tunes layer3 and layer4 with the head.
## "Frozen" has two switches. requires_grad=False: no gradient, so the weights never change. And
## the mode of the block's BatchNorm: in train mode it normalises with each batch's statistics
## and updates its running averages (99% of ImageNet's are gone within 44 batches, 0.9^44 < 0.01);
## in eval mode it keeps them. FROZEN_BN chooses; "eval" keeps what "frozen" promises.
def blocks(model):
    """ResNet18's six blocks, input to output: what freezing and learning rates act on."""
    return {
        "stem": nn.ModuleList([model.conv1, model.bn1]),
        "layer1": model.layer1,
        "layer2": model.layer2,
        "layer3": model.layer3,
        "layer4": model.layer4,
        "fc": model.fc,
    }


def is_trainable(block):
    return any(p.requires_grad for p in block.parameters())


def freeze(model, freeze_until):
    """Freeze every block up to and including `freeze_until` ("none" freezes nothing)."""
    if freeze_until == "none":
        return
    for name in BLOCKS[: BLOCKS.index(freeze_until) + 1]:
        blocks(model)[name].requires_grad_(False)


def set_train_mode(model, frozen_bn="eval"):
    """model.train(); with frozen_bn "eval", the frozen blocks go back to eval mode."""
    model.train()
    if frozen_bn == "eval":
        for block in blocks(model).values():
            if not is_trainable(block):
                block.eval()


# === 4. Learning rates: one parameter group per block =============================================
## Discriminative learning rates: the pretrained blocks are already good, so small steps adapt
## them without destroying what they know; the new head starts from random numbers and must move
## far: a 10x larger rate. LAYER_LR_DECAY adds a tier: the earlier a block, the more generic its
## features, the slower it may learn. Adam takes parameter groups, each with its own lr.
def block_lrs(backbone_lr, layer_lr_decay, head_lr):
    """{block: lr}: head_lr for fc, backbone_lr for layer4, times layer_lr_decay per block down."""
    lrs = {"fc": head_lr}
    for steps_down, name in enumerate(reversed(BLOCKS[:-1])):
        lrs[name] = backbone_lr * layer_lr_decay**steps_down
    return lrs


def param_groups(model, lrs):
    groups = []
    for name, block in blocks(model).items():
        if is_trainable(block):
            groups.append({"name": name, "params": list(block.parameters()), "lr": lrs[name]})
    return groups


## Head first, or not. The default trains layer3, layer4 and the new head together from the first
## step: the random head's first, large gradients reach layer3 and layer4, and their small rate
## keeps them from moving far. Keras's guide and fastai's fine_tune() train the head alone first,
## then unfreeze: FREEZE_UNTIL = "layer4" with UNFREEZE_SCHEDULE = {2: "layer3"}. That is gradual
## unfreezing: blocks join later, once the head has settled, and never see its first gradients.
def unfreeze(model, optimizer, block_name, lrs):
    """Make `block_name` and every frozen block after it trainable, each in Adam at its own rate."""
    released = []
    for name in BLOCKS[BLOCKS.index(block_name) :]:
        block = blocks(model)[name]
        if not is_trainable(block):
            block.requires_grad_(True)  # from now on set_train_mode() trains its BatchNorm too
            optimizer.add_param_group(
                {"name": name, "params": list(block.parameters()), "lr": lrs[name]}
            )
            released.append(name)
    print(f"unfreezing {', '.join(released)}")
    return released


# === 5. The training step =========================================================================
## The classic loop: forward pass, loss, zero_grad, backward, step. On a GPU, torch.autocast runs
## the forward pass in 16-bit floats; float16 (older GPUs) also needs the gradient scaler, which
## scales the loss up so that small gradients do not underflow to zero. On the CPU, in float32,
## the scaler is disabled and its three calls are plain loss.backward() and optimizer.step().
def train_one_epoch(
    model, loader, optimizer, scaler, prepare, seed, frozen_bn="eval", amp_dtype=None
):
    """One pass over the training split, shuffled and augmented from `seed`: (loss, accuracy)."""
    device = next(model.parameters()).device
    set_train_mode(model, frozen_bn)
    loader.sampler.generator.manual_seed(seed)
    augmentation = torch.Generator().manual_seed(seed + 1)
    total_loss = torch.zeros((), device=device)  # sums stay on the device: no waiting for the GPU
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    total_images = 0
    progress = Progress(loader, "train")
    for images, labels in progress:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = prepare(random_crop_flip(images, augmentation))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        scaler.scale(loss).backward()  # gradients reach only the trainable blocks
        scaler.step(optimizer)  # each parameter group at its own learning rate
        scaler.update()
        total_loss += loss.detach() * len(labels)
        total_correct += (logits.argmax(1) == labels).sum()
        total_images += len(labels)
        progress.update(loss)  # the bar, and a check for a nan or inf loss
    return total_loss.item() / total_images, total_correct.item() / total_images


# === 6. Evaluation ================================================================================
## eval mode for every layer: BatchNorm uses its running statistics, so a prediction never depends
## on the other images in the batch. inference_mode() keeps no autograd records at all.
@torch.inference_mode()
def evaluate(model, loader, prepare, amp_dtype=None, desc="val"):
    """Mean loss, confusion matrix (rows: true class), each image's (prediction, probability)."""
    device = next(model.parameters()).device
    model.eval()
    total_loss = torch.zeros((), device=device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long, device=device)
    predictions = []
    progress = Progress(loader, desc)
    for images, labels in progress:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(prepare(images)).float()
        loss = F.cross_entropy(logits, labels)
        total_loss += loss * len(labels)
        probability, predicted = logits.softmax(1).max(1)
        predictions.append(torch.stack([predicted.float(), probability], 1))
        # Each (true, predicted) pair counted by a sum of one-hot rows: no wait for the GPU.
        confusion += F.one_hot(labels * NUM_CLASSES + predicted, NUM_CLASSES * NUM_CLASSES).sum(0)
        progress.update(loss)
    confusion = confusion.view(NUM_CLASSES, NUM_CLASSES).cpu()
    return total_loss.item() / confusion.sum().item(), confusion, torch.cat(predictions).cpu()


def accuracy(confusion):
    return confusion.trace().item() / confusion.sum().item()


# === 7. Early stopping ============================================================================
## Training accuracy keeps rising long after the model stops getting better on images it has not
## seen. Early stopping watches the validation split, keeps the weights of the best epoch, and
## ends training once `patience` epochs in a row failed to beat the best by at least `min_delta`.
class EarlyStopping:
    def __init__(self, patience, min_delta, monitor="val_loss"):
        self.patience = patience
        self.min_delta = min_delta
        self.monitor = monitor  # "val_loss" (lower is better) or "val_acc" (higher is better)
        self.best = None
        self.best_epoch = None
        self.bad_epochs = 0

    def step(self, val_loss, val_acc, epoch):
        """Record one epoch's validation figures; True when the monitored one is a new best."""
        if self.monitor == "val_loss":
            value = val_loss
            improved = self.best is None or value < self.best - self.min_delta
        else:
            value = val_acc
            improved = self.best is None or value > self.best + self.min_delta
        if improved:
            self.best = value
            self.best_epoch = epoch
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self):
        return self.bad_epochs >= self.patience


def epoch_seed(seed, epoch):
    """A seed of its own for each epoch's shuffle and augmentation, from (SEED, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# === 8. The story of a run ========================================================================
def main(argv=None):
    """Settings, data, model, freezing, optimizer, epochs with early stopping, test, report."""
    cfg = parse_settings(argv)  # the constants above, overridden by flags or by --resume
    run = open_run_folder(cfg)  # OUTPUT_DIR/<run name>, this run's alone, before any download
    device, amp_dtype = choose_device(cfg.image_size)
    train_set, val_set, test_set, classes = load_data(cfg)  # CIFAR-10, split_train_val()
    train_loader, val_loader, test_loader = make_loaders(
        train_set, val_set, test_set, cfg.batch_size, cfg.num_workers, device
    )
    torch.manual_seed(cfg.seed)  # the new head's first weights
    model = load_model(cfg)  # build_model(), with a clear message if a download fails
    freeze(model, cfg.freeze_until)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else None)
    prepare = ImageNetInput(cfg.image_size).to(device)
    lrs = block_lrs(cfg.backbone_lr, cfg.layer_lr_decay, cfg.head_lr)
    ## fused=True: one kernel (CUDA) or one C++ loop (CPU) updates every tensor, not a loop of ops.
    optimizer = torch.optim.Adam(param_groups(model, lrs), fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor)
    run.start(model, optimizer, scaler, stopper, amp_dtype)  # config.json; a resume: last.pt
    with stop_after_batch():  # Ctrl-C or SIGTERM: finish the batch, keep the files, stop
        for epoch in range(run.next_epoch, cfg.epochs + 1):
            if stopper.should_stop:
                break
            if epoch in cfg.unfreeze_schedule:
                unfreeze(model, optimizer, cfg.unfreeze_schedule[epoch], lrs)
            started = time.perf_counter()
            seed = epoch_seed(cfg.seed, epoch)
            train_loss, train_acc = train_one_epoch(
                model, train_loader, optimizer, scaler, prepare, seed, cfg.frozen_bn, amp_dtype
            )
            val_loss, confusion, _ = evaluate(model, val_loader, prepare, amp_dtype)
            improved = stopper.step(val_loss, accuracy(confusion), epoch)
            ## The best epoch's weights go to best.pt: they are what we test at the end.
            run.save_epoch(epoch, train_loss, train_acc, val_loss, confusion, started, improved)
    print(f"\nstopped: {run.stop_reason()}")
    if stopper.best_epoch is None or stop.signal == signal.SIGTERM:
        return run.stop_without_test()
    ## The test set is used once, on the weights that early stopping chose on the validation split:
    ## choosing anything by test accuracy would make its score an optimistic guess.
    model.load_state_dict(torch.load(run.dir / "best.pt", map_location=device, weights_only=True))
    test_loss, confusion, predictions = evaluate(model, test_loader, prepare, amp_dtype, "test")
    return run.finish(classes, test_loss, confusion, test_set, predictions)


# ==================================================================================================
# The lesson ends here: on a first read, stop and go on with the README. Below is plumbing: the
# command line, devices, data files and downloads, the run folder and resume, reports, signals.
# ==================================================================================================
SETTINGS = [
    "DATA_DIR", "SEED", "VAL_FRACTION", "TRAIN_PER_CLASS", "IMAGE_SIZE", "WEIGHTS", "FREEZE_UNTIL",
    "UNFREEZE_SCHEDULE", "FROZEN_BN", "BATCH_SIZE", "EPOCHS", "BACKBONE_LR", "LAYER_LR_DECAY",
    "HEAD_LR", "MONITOR", "PATIENCE", "MIN_DELTA", "NUM_WORKERS", "OUTPUT_DIR",
]  # fmt: skip
CIFAR10_PER_CLASS = 5_000  # training images per class: the split is checked before any download
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DRY_RUN_BATCHES = 2  # --dry-run: batches per phase (train, validation, test)
DRY_RUN_EPOCHS = 3  # --dry-run: epochs, unless --epochs is given or the schedule needs more
SYNC_EVERY = 25  # read the losses back from the device every N batches (see Progress)
LOG_EVERY = 30  # seconds between progress lines where the output is a log, not a terminal
HISTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
HISTORY += [f"lr_{name}" for name in BLOCKS] + ["seconds"]  # the columns of history.csv
stop = SimpleNamespace(signal=None, after_batch=False)  # Ctrl-C and SIGTERM (see on_stop_signal)


class SettingError(Exception):
    """A bad setting: one line, exit code 2."""


class RunError(Exception):
    """Something outside the code went wrong (a download, a file, divergence): exit code 1."""


# --- The command line: the constants are its defaults, so one path checks both --------------------
def flag(name):
    return "--" + name.lower().replace("_", "-")


def checked(convert, allowed, expected):
    """An argparse type: convert(text), refused with `expected` unless allowed(value)."""

    def parse(text):
        try:
            value = convert(text.strip())
        except ValueError:
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not allowed: expected {expected}")
        return value

    return parse


def number_or(word):
    """A converter: `word` itself, or a whole number."""

    def convert(text):
        if text.lower() == word:
            return word
        return int(text)

    return convert


def one_of(*choices):
    return checked(str.lower, lambda value: value in choices, "one of " + ", ".join(choices))


def folder(text):
    return Path(text).expanduser()


def schedule(text):
    """'5:layer2,10:layer1', or a dict's text "{5: 'layer2'}", as {5: 'layer2', 10: 'layer1'}."""
    plain = text.lower()
    for character in "{}'\" ":
        plain = plain.replace(character, "")
    plan = {}
    if plain in ("", "none"):
        return plan
    for pair in plain.split(","):
        epoch, _, block = pair.partition(":")
        if not epoch.isdigit() or block not in BLOCKS[:-1] or int(epoch) in plan:
            raise ValueError(pair)
        plan[int(epoch)] = block
    return dict(sorted(plan.items()))


def schedule_text(plan):
    return ",".join(f"{epoch}:{block}" for epoch, block in plan.items()) or "none"


def weights_setting(text):
    """IMAGENET1K_V1, none, or the absolute path of a file checked to hold ResNet18 weights."""
    if text.lower() == "none":
        return "none"
    if text.upper() == "IMAGENET1K_V1":
        return "IMAGENET1K_V1"
    path = Path(text).expanduser().absolute()
    problem = weights_file_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not allowed: expected IMAGENET1K_V1, none, or a ResNet18 weights file"
            f" ({problem})"
        )
    return str(path)


def weights_file_problem(path):
    """What keeps `path` from holding ResNet18 weights with finite values, or None."""
    if not path.is_file():
        return "no such file"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError):
        return (
            "torch.load(weights_only=True) refused it: it is damaged, not saved by torch.save,"
            " or it holds Python objects, which could run code"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a state dict: save one with torch.save(model.state_dict(), path)"
    expected = models.resnet18().state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        return f"not ResNet18's parameters: missing {missing[:2]}, unexpected {unexpected[:2]}"
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            return (
                f"{key} has shape {list(tensor.shape)}, ResNet18's is {list(expected[key].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{key} holds nan or inf values"
    return None


def constant_text(name):
    """A constant as the text a flag would give, so that argparse checks both the same way."""
    if name not in globals():
        raise SettingError(f"{name} is missing from the settings at the top of fine_tuning.py")
    value = globals()[name]
    if isinstance(value, dict):
        return schedule_text(value)
    return str(value)


class SettingsParser(argparse.ArgumentParser):
    def error(self, message):
        # "argument --epochs: ..." -> "EPOCHS (--epochs): ...", the name a learner edits
        for name in SETTINGS:
            message = message.replace(f"argument {flag(name)}:", f"{name} ({flag(name)}):")
        super().error(message)


def settings_parser():
    parser = SettingsParser(
        prog="fine_tuning.py",
        allow_abbrev=False,
        description="Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10. "
        "Each option overrides the constant of its name at the top of fine_tuning.py.",
    )
    whole = "a whole number >= "
    rate = "a learning rate in (0, 1], e.g. "
    types = {
        "DATA_DIR": checked(
            folder,
            lambda path: path.name != "cifar-10-batches-py" and not path.is_file(),
            "the folder that holds (or will hold) cifar-10-batches-py, not that folder itself",
        ),
        "SEED": checked(int, lambda n: 0 <= n < 2**32, "a whole number from 0 to 4294967295"),
        "VAL_FRACTION": checked(float, lambda x: 0 < x < 1, "a number between 0 and 1, e.g. 0.1"),
        "TRAIN_PER_CLASS": checked(
            number_or("all"), lambda n: n == "all" or n >= 1, "all or " + whole + "1"
        ),
        "IMAGE_SIZE": checked(
            number_or("auto"),
            lambda n: n == "auto" or 32 <= n <= 512,
            "auto or a whole number from 32 to 512",
        ),
        "WEIGHTS": weights_setting,
        "FREEZE_UNTIL": one_of("none", *BLOCKS[:-1]),
        "UNFREEZE_SCHEDULE": checked(
            schedule, lambda plan: True, "none, or EPOCH:BLOCK pairs such as 3:layer2,6:layer1"
        ),
        "FROZEN_BN": one_of("eval", "train"),
        "BATCH_SIZE": checked(
            int, lambda n: n >= 2, whole + "2 (BatchNorm needs 2 images or more)"
        ),
        "EPOCHS": checked(int, lambda n: n >= 1, whole + "1"),
        "BACKBONE_LR": checked(float, lambda x: 0 < x <= 1, rate + "1e-4 (above 1 is a typo)"),
        "LAYER_LR_DECAY": checked(float, lambda x: 0 < x <= 1, "a number in (0, 1], e.g. 0.5"),
        "HEAD_LR": checked(float, lambda x: 0 < x <= 1, rate + "1e-3 (above 1 is a typo)"),
        "MONITOR": one_of("val_loss", "val_acc"),
        "PATIENCE": checked(int, lambda n: n >= 1, whole + "1"),
        "MIN_DELTA": checked(float, lambda x: 0 <= x < math.inf, "a number >= 0"),
        "NUM_WORKERS": checked(
            number_or("auto"), lambda n: n == "auto" or n >= 0, "auto or " + whole + "0"
        ),
        "OUTPUT_DIR": checked(folder, lambda path: not path.is_file(), "a folder"),
    }
    for name in SETTINGS:
        default = constant_text(name)
        parser.add_argument(
            flag(name),
            dest=name.lower(),
            metavar=name,
            type=types[name],
            default=default,
            help=f"default: {default}",
        )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"check your setup offline in seconds: synthetic images, random weights,"
        f" {DRY_RUN_BATCHES} batches per phase, {DRY_RUN_EPOCHS} epochs unless --epochs is given",
    )
    parser.add_argument(
        "--run-name",
        type=checked(
            str, lambda name: re.fullmatch(r"\w[\w.+=-]*", name), "letters, digits and ._+=-"
        ),
        help="name of the run folder (default: the time and the settings)",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", type=folder, help="continue a stopped run")
    return parser


def parse_settings(argv=None):
    """The checked settings, named in lower case (cfg.epochs), as main() uses them."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    parser = settings_parser()
    cfg = parser.parse_args(argv)
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if cfg.resume:
        others = given - {"--resume", "--epochs"}
        if others:
            parser.error(
                "--resume continues a run with its saved settings; only --epochs may change, not "
                + ", ".join(sorted(others))
            )
        cfg.epochs_given = cfg.epochs if "--epochs" in given else None
        return cfg  # open_run_folder() reads the saved settings from the run's last.pt
    if cfg.image_size == "auto":
        cfg.image_size = 224 if torch.cuda.is_available() else 32
    if cfg.num_workers == "auto":
        cfg.num_workers = 2 if torch.cuda.is_available() else 0
    if cfg.dry_run and "--epochs" not in given:
        cfg.epochs = min(cfg.epochs, max([DRY_RUN_EPOCHS, *cfg.unfreeze_schedule]))
    check_together(cfg)
    if cfg.dry_run:
        cfg.weights = "none"  # random weights: a dry run downloads nothing
    return cfg


def check_together(cfg):
    """The checks that need two settings, made on CIFAR-10's sizes (a dry run's too)."""
    frozen = []
    if cfg.freeze_until != "none":
        frozen = BLOCKS[: BLOCKS.index(cfg.freeze_until) + 1]
    for epoch, block in cfg.unfreeze_schedule.items():
        pair = f"UNFREEZE_SCHEDULE (--unfreeze-schedule): {epoch}:{block} is not allowed"
        if not 1 <= epoch <= cfg.epochs:
            raise SettingError(f"{pair}: epoch {epoch} is outside 1..{cfg.epochs} (EPOCHS)")
        if block not in frozen:
            raise SettingError(
                f"{pair}: {block} is trainable by then; name a block that is still frozen"
            )
        frozen = frozen[: frozen.index(block)]  # that block and every block after it now train
    n_val = round(CIFAR10_PER_CLASS * cfg.val_fraction)
    if not 1 <= n_val < CIFAR10_PER_CLASS:
        raise SettingError(
            f"VAL_FRACTION (--val-fraction) = {cfg.val_fraction} leaves {n_val} validation"
            f" images of each class's {CIFAR10_PER_CLASS:,}; both splits must keep some"
        )
    per_class = CIFAR10_PER_CLASS - n_val
    if cfg.train_per_class != "all" and cfg.train_per_class > per_class:
        raise SettingError(
            f"TRAIN_PER_CLASS (--train-per-class) = {cfg.train_per_class} is not allowed: only"
            f" {per_class:,} training images per class remain after the validation split"
        )
    if cfg.train_per_class != "all":
        per_class = cfg.train_per_class
    if cfg.batch_size > NUM_CLASSES * per_class:
        raise SettingError(
            f"BATCH_SIZE (--batch-size) = {cfg.batch_size} is not allowed: the training split"
            f" has only {NUM_CLASSES * per_class:,} images"
        )
    if cfg.weights == "none" and cfg.freeze_until != "none":
        print(
            f"note: WEIGHTS = none with FREEZE_UNTIL = {cfg.freeze_until} keeps random blocks"
            " frozen, which is rarely meant. From scratch, every block trains: --freeze-until none"
        )


def settings_record(cfg):
    """The settings as this run uses them: config.json, last.pt and summary.csv."""
    record = {name: getattr(cfg, name.lower()) for name in SETTINGS}
    record["DATA_DIR"] = str(cfg.data_dir.absolute())  # absolute: a resume works from anywhere
    record["OUTPUT_DIR"] = str(cfg.output_dir.absolute())
    return record


# --- Devices and precision ------------------------------------------------------------------------
def choose_device(image_size):
    """The device, and the autocast dtype by what the GPU has (None: float32)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    amp_dtype = None
    name = ""
    if device.type == "cuda":
        # bf16 from compute capability 8.0 (A100, RTX 30xx and newer); fp16 and the gradient scaler
        # on 7.x (V100, T4, RTX 20xx), where cuDNN has no bf16 convolutions; below 7.0, float32.
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            amp_dtype = torch.bfloat16
        elif major == 7:
            amp_dtype = torch.float16
        name = f" ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
        torch.backends.cudnn.benchmark = True  # fixed input sizes: time the algorithms once
    precision = str(amp_dtype or torch.float32).replace("torch.", "")
    print(f"device: {device}{name}   image size: {image_size}px   precision: {precision}")
    return device, amp_dtype


# --- Data files and downloads ---------------------------------------------------------------------
def load_data(cfg):
    """CIFAR-10 (with --dry-run, its synthetic twin) split into train, validation and test sets."""
    if cfg.dry_run:
        print(f"dry run: synthetic images, random weights, {DRY_RUN_BATCHES} batches per phase")
        full_train_set, test_set, classes = synthetic_cifar10(cfg.seed)
    else:
        archive = cfg.data_dir / datasets.CIFAR10.filename
        source = "https://www.cs.toronto.edu/~kriz/cifar.html"
        hint = f"put {archive.name} (from {source}) in {cfg.data_dir}"
        with download_errors("CIFAR-10", hint, "DATA_DIR (--data-dir)", archive):
            full_train_set, test_set, classes = load_cifar10(cfg.data_dir)
    train_set, val_set = split_train_val(
        full_train_set, cfg.val_fraction, cfg.seed, cfg.train_per_class
    )
    cfg.val_images = len(val_set)
    kept = ""
    if cfg.train_per_class != "all":
        kept = f" ({cfg.train_per_class} per class)"
    print(
        f"data: {len(train_set):,} train{kept} / {len(val_set):,} validation"
        f" / {len(test_set):,} test images, {len(classes)} classes"
    )
    if cfg.dry_run:  # the first batches of each set
        train_set = first_images(train_set, DRY_RUN_BATCHES * cfg.batch_size)
        val_set = first_images(val_set, DRY_RUN_BATCHES * 2 * cfg.batch_size)
        test_set = first_images(test_set, DRY_RUN_BATCHES * 2 * cfg.batch_size)
    return train_set, val_set, test_set, classes


def first_images(dataset, n):
    return TensorDataset(*(tensor[:n] for tensor in dataset.tensors))


def synthetic_cifar10(seed):
    """Class-tinted noise of CIFAR-10's size (50,000 + 10,000 images): something to learn."""
    rng = np.random.default_rng(seed)
    tints = rng.integers(0, 128, (NUM_CLASSES, 3, 1, 1), dtype=np.uint8)
    sets = []
    for n in (NUM_CLASSES * CIFAR10_PER_CLASS, 10_000):
        labels = np.arange(n) % NUM_CLASSES
        images = rng.integers(0, 128, (n, 3, 32, 32), dtype=np.uint8) + tints[labels]
        sets.append(TensorDataset(torch.from_numpy(images), torch.from_numpy(labels).long()))
    return sets[0], sets[1], CLASSES


def load_model(cfg):
    """build_model(), with a failed download of ImageNet's weights as one line."""
    if cfg.weights == "IMAGENET1K_V1":
        print("model: ResNet18 with ImageNet weights (IMAGENET1K_V1), new 10-class head")
    elif cfg.weights == "none":
        print("model: ResNet18 with random weights, new 10-class head")
    else:
        print(f"model: ResNet18 with the weights in {cfg.weights}, new 10-class head")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET.url).name
    hint = (
        f"put {cached.name} ({IMAGENET.url}) in {cached.parent}, or pass its path: --weights PATH"
    )
    with download_errors(
        "the ImageNet weights", hint, "the TORCH_HOME environment variable", cached
    ):
        return build_model(cfg.weights)


@contextmanager
def download_errors(what, hint, setting, target):
    """A failed download as one line: a folder we may not write, a full disk, no network."""
    try:
        yield
    except PermissionError as error:
        raise RunError(
            f"could not download {what}: permission denied for {error.filename}. Set {setting}"
            " to a folder of your own"
        ) from None
    except OSError as error:  # urllib's URLError too: no network, a proxy, an SSL or HTTP error
        if error.errno == errno.ENOSPC:
            raise RunError(
                f"could not download {what}: the disk is full. Free some space, or set {setting}"
            ) from None
        reason = error.strerror or error
        if isinstance(error, urllib.error.URLError):
            reason = error.reason
        raise RunError(
            f"could not download {what} ({reason}). Without internet, {hint}."
            " `python fine_tuning.py --dry-run` works offline."
        ) from None
    except RuntimeError as error:  # torchvision's md5 check, or torch.hub's hash check, failed
        raise RunError(
            f"the download of {what} failed its check ({error}): delete {target}, run again"
        ) from None


# --- The run folder: made or resumed, locked, saved each epoch, finished or left ------------------
class Run:
    """A run's folder and what it keeps: config.json, history.csv, best.pt, last.pt, results."""

    def __init__(self, cfg, run_dir, new):
        self.cfg = cfg
        self.dir = run_dir
        self.new = new  # made by this process: removed again if no epoch completes
        self.checkpoint = None  # a resumed run's last.pt, until start() restores it
        self.history = []
        self.next_epoch = 1
        self.lock = FileLock(run_dir / ".lock", timeout=0)
        self.printed_header = False

    def start(self, model, optimizer, scaler, stopper, amp_dtype):
        """Write config.json (a resumed run first restores its state from last.pt) and print the
        block table. save_epoch() and finish() then work on these objects."""
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.stopper = stopper
        if self.checkpoint is not None:
            self.resume()
        config = dict(
            run=self.dir.name, dry_run=self.cfg.dry_run, settings=settings_record(self.cfg)
        )
        config["device"] = str(next(model.parameters()).device)
        config["precision"] = str(amp_dtype or torch.float32)
        config["torch"] = torch.__version__
        config["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with atomic_write(self.dir / "config.json") as file:
            file.write(json.dumps(config, indent=2).encode())
        print(f"run folder: {self.dir}")
        print_blocks(model, optimizer, self.cfg.frozen_bn)

    def resume(self):
        state = self.checkpoint
        self.checkpoint = None  # copied into the model and optimizer: not kept for the run
        lrs = block_lrs(self.cfg.backbone_lr, self.cfg.layer_lr_decay, self.cfg.head_lr)
        for epoch, block in self.cfg.unfreeze_schedule.items():
            if epoch <= state["epoch"]:  # the same parameter groups, in the same order
                unfreeze(self.model, self.optimizer, block, lrs)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:  # it may resume on another precision
            self.scaler.load_state_dict(state["scaler"])
        vars(self.stopper).update(state["early_stopping"])
        self.history = state["history"]
        self.next_epoch = state["epoch"] + 1
        print(f"resuming {self.dir} after epoch {state['epoch']}")

    def save_epoch(self, epoch, train_loss, train_acc, val_loss, confusion, started, improved):
        """history.csv and best.pt, then last.pt: once last.pt is written, the epoch is complete."""
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss)
        row["val_acc"] = accuracy(confusion)
        for group in self.optimizer.param_groups:
            row[f"lr_{group['name']}"] = group["lr"]
        row["seconds"] = round(time.perf_counter() - started, 2)
        self.history.append(row)
        write_csv(self.dir / "history.csv", HISTORY, self.history)
        if improved:
            with atomic_write(self.dir / "best.pt") as file:
                torch.save(self.model.state_dict(), file)
        state = dict(
            epoch=epoch, model=self.model.state_dict(), optimizer=self.optimizer.state_dict()
        )
        state["scaler"] = self.scaler.state_dict()
        state["early_stopping"] = vars(self.stopper)
        state["history"] = self.history
        state["settings"] = settings_record(self.cfg)
        state["dry_run"] = self.cfg.dry_run
        with atomic_write(self.dir / "last.pt") as file:
            torch.save(state, file)
        self.print_row(row, improved)

    def print_row(self, row, improved):
        if not self.printed_header:
            print(
                f"{'epoch':>5}{'train loss':>12}{'train acc':>11}{'val loss':>10}"
                f"{'val acc':>9}{'time':>8}"
            )
            self.printed_header = True
        losses = f"{row['train_loss']:>12.4f}{row['train_acc']:>11.2%}{row['val_loss']:>10.4f}"
        best = "  * best" if improved else ""
        print(
            f"{row['epoch']:>5}{losses}{row['val_acc']:>9.2%}{row['seconds']:>7.1f}s{best}",
            flush=True,
        )

    def stop_reason(self):
        cfg = self.cfg
        done = 0
        if self.history:
            done = self.history[-1]["epoch"]
        if self.stopper.should_stop:
            reason = (
                f"early stopping: {cfg.monitor} did not improve on epoch {self.stopper.best_epoch}"
                f" by at least {cfg.min_delta:g} for {self.stopper.bad_epochs} epochs"
                f" (PATIENCE = {cfg.patience})"
            )
            skipped = [
                f"{epoch}:{block}" for epoch, block in cfg.unfreeze_schedule.items() if epoch > done
            ]
            if skipped:
                reason += f"; the scheduled unfreezing {', '.join(skipped)} did not happen"
            return reason
        if done == cfg.epochs:
            return f"all epochs ran (EPOCHS = {cfg.epochs})"
        return "interrupted"

    def stop_without_test(self):
        """Stopped before any test: say what is kept and how to go on."""
        return stopped_message()

    def finish(self, classes, test_loss, confusion, test_set, predictions):
        """Print and save the test results; a finished run joins summary.csv and is compared."""
        cfg = self.cfg
        best_epoch = self.stopper.best_epoch
        reason = self.stop_reason()
        best = next(row for row in self.history if row["epoch"] == best_epoch)
        test_acc = accuracy(confusion)
        minutes = sum(row["seconds"] for row in self.history) / 60
        print(
            f"test loss {test_loss:.4f}   test accuracy {test_acc:.2%}   (the weights of epoch"
            f" {best_epoch}, the best {cfg.monitor}, from best.pt; their validation accuracy:"
            f" {best['val_acc']:.2%})"
        )
        results = dict(test_loss=test_loss, test_acc=test_acc)
        results["per_class_acc"] = print_report(confusion, classes)
        results["confusion_matrix"] = confusion.tolist()
        results["classes"] = classes
        results["best_epoch"] = best_epoch
        results["best_val_acc"] = best["val_acc"]
        results["epochs_run"] = self.history[-1]["epoch"]
        results["stop_reason"] = reason
        results["train_minutes"] = round(minutes, 2)
        with atomic_write(self.dir / "results.json") as file:
            file.write(json.dumps(results, indent=2).encode())
        save_pictures(self, best_epoch, classes, test_set, predictions)
        if reason == "interrupted":
            print("\n(interrupted run: not added to summary.csv)")
            return stopped_message()
        if cfg.dry_run:
            print("\n(dry run: not added to summary.csv)")
        else:
            row = dict(
                run=self.dir.name, **settings_record(cfg), best_val_acc=round(best["val_acc"], 4)
            )
            row["UNFREEZE_SCHEDULE"] = schedule_text(cfg.unfreeze_schedule)  # as the flag reads
            row["test_acc"] = round(test_acc, 4)
            row["val_images"] = cfg.val_images
            row["epochs_run"] = self.history[-1]["epoch"]
            row["minutes"] = round(minutes, 2)
            print_runs(add_to_summary(cfg.output_dir, row))
        (self.dir / "last.pt").unlink()  # only needed to resume: a finished run keeps best.pt
        print(f"\nfiles in {files_in(self.dir)}")
        return 0


def open_run_folder(cfg):
    """This run's folder, locked while the process lives: a new OUTPUT_DIR/<name>, or the folder
    given to --resume, whose last.pt then supplies the settings."""
    if cfg.resume:
        return resume_run_folder(cfg)
    if cfg.run_name:
        run_dir = cfg.output_dir / cfg.run_name
        if run_dir.exists():
            hint = ""
            if (run_dir / "last.pt").exists():
                hint = f", or continue it: python fine_tuning.py --resume {run_dir}"
            raise SettingError(f"--run-name: {run_dir} already exists; choose another name{hint}")
        make_folder(run_dir)
    else:
        run_dir = new_default_folder(cfg)
    run = Run(cfg, run_dir, new=True)
    run.lock.acquire()
    claimed.run = run
    return run


def default_run_name(cfg):
    if cfg.dry_run:
        return time.strftime("%m%d-%H%M%S_dry-run")
    parts = [
        time.strftime("%m%d-%H%M%S"),
        cfg.freeze_until,
        f"{cfg.backbone_lr:.0e}",
        f"{cfg.head_lr:.0e}",
    ]
    parts.append(f"{cfg.image_size}px")
    if cfg.weights == "none":
        parts.append("scratch")
    return "_".join(parts)


def new_default_folder(cfg):
    """OUTPUT_DIR/<time and settings>, with -2, -3... when another run took that name."""
    name = default_run_name(cfg)
    number = 1
    while True:
        run_dir = cfg.output_dir / name
        if number > 1:
            run_dir = cfg.output_dir / f"{name}-{number}"
        if make_folder(run_dir, exist_ok=True):
            return run_dir
        number += 1


def make_folder(run_dir, exist_ok=False):
    """mkdir: True if this process made it (atomic: of two processes, one does)."""
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        if exist_ok:
            return False
        raise SettingError(f"--run-name: {run_dir} already exists; choose another name") from None
    except OSError as error:
        raise SettingError(
            f"OUTPUT_DIR (--output-dir): cannot make {run_dir}: {error.strerror}"
        ) from None
    return True


def resume_run_folder(cfg):
    """Lock the run folder to resume and read its settings from its last.pt."""
    run_dir = cfg.resume
    if not (run_dir / "last.pt").is_file():
        if (run_dir / "results.json").is_file():
            raise SettingError(f"--resume: {run_dir} has finished; its results are in results.json")
        raise SettingError(f"--resume: {run_dir} holds no completed epoch of a run to continue")
    run = Run(cfg, run_dir, new=False)
    try:
        run.lock.acquire()
    except Timeout:
        raise SettingError(f"--resume: another process is training in {run_dir} now") from None
    claimed.run = run
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    for name, value in state["settings"].items():
        setattr(cfg, name.lower(), value)
    cfg.data_dir = Path(cfg.data_dir)
    cfg.output_dir = Path(cfg.output_dir)
    cfg.dry_run = state["dry_run"]
    if cfg.epochs_given is not None:
        if cfg.epochs_given <= state["epoch"]:
            raise SettingError(
                f"EPOCHS (--epochs) = {cfg.epochs_given}: the run has done {state['epoch']}"
                " epochs; give more"
            )
        cfg.epochs = cfg.epochs_given
    check_together(cfg)
    run.checkpoint = state
    return run


claimed = SimpleNamespace(run=None)  # the run folder this process holds


def leave_run_folder():
    """Unlock the run folder; a new run that completed no epoch removes it whole."""
    run = claimed.run
    claimed.run = None
    if run is None:
        return
    run.lock.release()
    if run.new and not (run.dir / "last.pt").exists() and not (run.dir / "results.json").exists():
        shutil.rmtree(run.dir)  # made by this process, and nothing in it worth keeping


def stopped_message():
    """What a stop keeps, and the command that continues it; the exit code of the signal."""
    run = claimed.run
    if run is not None and (run.dir / "last.pt").exists():
        print(
            f"\nkept in {files_in(run.dir)}\nresume with: python fine_tuning.py --resume {run.dir}"
        )
    elif run is not None and run.new and not (run.dir / "results.json").exists():
        print("\nno epoch was completed: nothing to test or to resume; run the same command again.")
    return 128 + (stop.signal or signal.SIGINT)


def files_in(folder):
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return f"{folder}: {' '.join(names)}"


# --- Files: every write is atomic, so a crash or a full disk never leaves half a file -------------
@contextmanager
def atomic_write(path):
    """A file opened for writing under a temporary name, renamed over `path` once complete:
    readers see the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:  # torch.save too lets the file's own error through (2.5 to 2.14)
        raise write_error(path, error) from None
    finally:
        temporary.unlink(missing_ok=True)


def write_error(path, error):
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return RunError(f"could not write {path}: {error.strerror}")
    then = "then run the same command again"
    run = claimed.run
    if run is not None and (run.dir / "last.pt").exists():
        then = f"then resume: python fine_tuning.py --resume {run.dir}"
    return RunError(
        f"the disk is full: could not write {path}. The files of the last completed epoch are"
        f" intact: free some space, {then}"
    )


def write_csv(path, columns, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as file:
        file.write(text.getvalue().encode())


def add_to_summary(output_dir, row):
    """Add this run's row to OUTPUT_DIR/summary.csv, one process at a time. Returns every row."""
    path = output_dir / "summary.csv"
    row = {key: str(value) for key, value in row.items()}  # as read back: text
    with FileLock(output_dir / ".summary.csv.lock"):
        rows = []
        columns = list(row)
        if path.exists():
            with open(path, newline="", encoding="utf-8-sig") as file:  # -sig: as Excel saves it
                reader = csv.DictReader(file)
                rows = [old for old in reader if old.get("run") != row["run"]]
                columns += [name for name in reader.fieldnames or [] if name not in row]
        rows.append(row)
        write_csv(path, columns, rows)
    return rows


# --- Reports: the block table, results per class, pictures, the runs so far -----------------------
def print_blocks(model, optimizer, frozen_bn):
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    counts = {"trainable": 0, "frozen": 0}
    print(f"\n{'block':<8}{'status':<11}{'parameters':>12}{'lr':>9}  BatchNorm")
    for name, block in blocks(model).items():
        size = sum(p.numel() for p in block.parameters())
        status = "trainable" if is_trainable(block) else "frozen"
        counts[status] += size
        lr = f"{lrs[name]:.1e}" if name in lrs else "-"
        norm = "train" if status == "trainable" else frozen_bn
        if name == "fc":
            norm = "-"
        print(f"{name:<8}{status:<11}{size:>12,}{lr:>9}  {norm}")
    print(f"trainable parameters: {counts['trainable']:,}   frozen: {counts['frozen']:,}\n")


def print_report(confusion, classes):
    """The confusion matrix with each class's test accuracy, and the most confused pairs."""
    print("\nconfusion matrix (rows: true class, columns: predicted) and accuracy per class")
    print(" " * 11 + "".join(f"{name[:5]:>6}" for name in classes) + f"{'accuracy':>9}")
    per_class = {}
    for c, name in enumerate(classes):
        images = confusion[c].sum().item()
        per_class[name] = confusion[c, c].item() / images if images else None  # None: no test image
        shown = "n/a" if per_class[name] is None else f"{per_class[name]:.1%}"
        print(
            f"{name[:10]:<11}" + "".join(f"{n:>6}" for n in confusion[c].tolist()) + f"{shown:>9}"
        )
    pairs = []
    for t in range(len(classes)):
        for p in range(len(classes)):
            if t != p and confusion[t, p] > 0:
                pairs.append((confusion[t, p].item(), classes[t], classes[p]))
    pairs.sort(key=lambda pair: -pair[0])
    if pairs:
        print("most confused: " + ", ".join(f"{t} -> {p}: {n}" for n, t, p in pairs[:3]))
    return per_class


def print_runs(rows, shown=8):
    """The last runs of summary.csv, each with the settings where it differs from most of them;
    then this run against the one before it."""
    names = [name for name in SETTINGS if name not in ("DATA_DIR", "OUTPUT_DIR")]
    last = rows[-shown:]
    usual = {
        name: Counter(row.get(name, "") for row in last).most_common(1)[0][0] for name in names
    }
    shown_of = f"the last {len(last)} of {len(rows)} in summary.csv"
    print(f"\nruns so far ({shown_of}; val acc: the validation accuracy of the best epoch)")
    print(
        f"{'val acc':>8}{'test acc':>9}{'epochs':>7}{'minutes':>8}  run: where it differs from most"
    )
    for row in last:
        differs = [
            f"{name}={row.get(name, '')}" for name in names if row.get(name, "") != usual[name]
        ]
        figures = f"{percent(row, 'best_val_acc'):>8}{percent(row, 'test_acc'):>9}"
        print(
            f"{figures}{row.get('epochs_run', '?'):>7}{row.get('minutes', '?'):>8}"
            f"  {row['run']}: {' '.join(differs)}"
        )
    if len(rows) > 1:
        print_comparison(rows[-2], rows[-1], names)


def percent(row, key):
    try:
        return f"{float(row[key]):.1%}"
    except (KeyError, ValueError):
        return "?"


def print_comparison(before, now, names):
    """This run against the one before, by the validation accuracy of their best epochs, with the
    sampling error of the validation set named as such."""
    changed = [f"{n} {before.get(n, '?')} -> {now[n]}" for n in names if before.get(n) != now[n]]
    gap = 100 * (float(now["best_val_acc"]) - float(before["best_val_acc"]))
    minutes = float(now["minutes"]) / max(float(before["minutes"]), 1e-9)
    images = int(now["val_images"])
    p = float(now["best_val_acc"])
    error = 200 * math.sqrt(p * (1 - p) / images)  # two standard errors of an accuracy on n images
    text = (
        f"vs {before['run']} ({', '.join(changed) or 'the same settings'}): validation accuracy of"
        f" the best epoch {gap:+.1f} points, {minutes:.1f}x the minutes. Each figure is"
        f" ±{error:.1f}"
        f" points: the sampling error of the {images:,} validation images (two standard errors)."
        " Runs with another --seed show how much runs differ."
    )
    print("\n" + textwrap.fill(text, 100))


def save_pictures(run, best_epoch, classes, test_set, predictions):
    """curves.png: loss and accuracy per epoch; mistakes.png: the 16 test images the model got
    most confidently wrong. Drawn only where matplotlib (optional) is installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: works without a display
    except ImportError:
        print("(no pictures: `pip install matplotlib` draws curves.png and mistakes.png)")
        return
    curves = Figure(figsize=(10, 4), layout="constrained")
    epochs = [row["epoch"] for row in run.history]
    best = next(row for row in run.history if row["epoch"] == best_epoch)
    colours = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for axis, metric, scale in zip(curves.subplots(1, 2), ["loss", "acc"], [1, 100], strict=True):
        axis.plot(
            epochs, [scale * row[f"train_{metric}"] for row in run.history], "o-", label="train"
        )
        axis.plot(
            epochs, [scale * row[f"val_{metric}"] for row in run.history], "o-", label="validation"
        )
        star = dict(color="gold", markeredgecolor="black", markersize=16)
        axis.plot(
            best_epoch, scale * best[f"val_{metric}"], "*", label=f"best epoch {best_epoch}", **star
        )
        for (epoch, block), colour in zip(run.cfg.unfreeze_schedule.items(), colours, strict=False):
            axis.axvline(epoch - 0.5, color=colour, linestyle="--", label=f"unfreeze {block}")
        axis.set_xticks(epochs)
        label = "loss" if metric == "loss" else "accuracy (%)"
        axis.set(xlabel="epoch", ylabel=label, title=label)
        axis.legend(fontsize=8)
    curves.suptitle(f"run {run.dir.name}")
    images, labels = test_set.tensors
    predicted = predictions[:, 0].long()
    confidence = predictions[:, 1]
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:16].tolist()
    mistakes = Figure(figsize=(8, 9), layout="constrained")
    for axis in mistakes.subplots(4, 4).flat:
        axis.set_axis_off()
    for axis, i in zip(mistakes.axes, worst, strict=False):  # fewer than 16 when few are wrong
        axis.imshow(images[i].permute(1, 2, 0).numpy())
        title = f"{classes[labels[i]]}\n-> {classes[predicted[i]]} ({confidence[i]:.0%})"
        axis.set_title(title, fontsize=10)
    mistakes.suptitle(
        f"run {run.dir.name}: the most confidently wrong test images\n(true class -> predicted)"
    )
    for name, figure in [("curves.png", curves), ("mistakes.png", mistakes)]:
        with atomic_write(run.dir / name) as file:
            figure.savefig(file, format="png", dpi=100)


# --- Signals and progress: Ctrl-C or SIGTERM finish the batch; a nan loss stops the run -----------
class TrainingStopped(Exception):
    """Raised after a batch when Ctrl-C or SIGTERM asked training to stop."""


def on_stop_signal(signum, frame):
    first = stop.signal is None
    stop.signal = signum
    if not (first and stop.after_batch):
        raise KeyboardInterrupt  # outside training, or a second signal: stop at once
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    print(f"\n{name}: stopping after this batch (press Ctrl-C again to stop at once)", flush=True)


@contextmanager
def stop_after_batch():
    """While training, a first Ctrl-C or SIGTERM lets the batch finish; that epoch is dropped."""
    stop.after_batch = True
    try:
        yield
    except TrainingStopped:
        pass
    finally:
        stop.after_batch = False


class Progress:
    """The batches of a loader under a progress bar on a terminal, or a plain line every LOG_EVERY
    seconds in a log. Every SYNC_EVERY batches it reads the losses back from the device (at every
    step, the CPU would wait for the GPU) and stops the run at a nan or inf loss, naming its batch.
    After each batch it ends the pass if Ctrl-C or SIGTERM asked training to stop."""

    def __init__(self, loader, desc):
        self.desc = desc
        self.bar = tqdm(loader, desc, leave=False, disable=None, dynamic_ncols=True)
        self.losses = []
        self.checked = 0
        self.total = 0.0
        self.logged = time.monotonic()

    def __iter__(self):
        with self.bar:
            for batch in self.bar:
                yield batch
                log_due = self.bar.disable and time.monotonic() - self.logged >= LOG_EVERY
                if (
                    len(self.losses) % SYNC_EVERY == 0
                    or len(self.losses) == len(self.bar)
                    or log_due
                ):
                    self.check(log_due)
                if stop.signal is not None and stop.after_batch:
                    raise TrainingStopped

    def update(self, loss):
        self.losses.append(loss.detach())

    def check(self, log=False):
        values = torch.stack(self.losses[self.checked :]).tolist()
        for number, value in enumerate(values, start=self.checked + 1):
            if not math.isfinite(value):
                raise RunError(
                    f"training diverged: the loss became {value} in {self.desc}, batch {number}."
                    " Try a"
                    " lower learning rate (--head-lr, --backbone-lr), e.g. 10x smaller"
                )
        self.checked = len(self.losses)
        self.total += sum(values)
        mean = self.total / self.checked
        self.bar.set_postfix(loss=f"{mean:.3f}")
        if log:
            print(
                f"  {self.desc}: batch {self.checked:,} of {len(self.bar):,}, loss {mean:.3f}",
                flush=True,
            )
            self.logged = time.monotonic()


# --- The command line's entry point: every expected failure as one line and an exit code ----------
def cli(argv=None):
    """main(), with exit codes: 0 done, 1 something outside the code failed, 2 a bad setting,
    130 Ctrl-C, 143 SIGTERM. Wherever it stops, the run folder is resumable, finished, or gone."""
    stop.signal = None
    handlers = {
        number: signal.signal(number, on_stop_signal) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return main(argv)
    except SettingError as error:
        print(f"fine_tuning.py: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        return stopped_message()
    except torch.cuda.OutOfMemoryError:
        print(
            "error: the GPU ran out of memory. Try a smaller --batch-size or --image-size",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as error:
        if not str(error).startswith("DataLoader worker"):
            raise  # anything else is a bug: keep its traceback
        if stop.signal is not None:  # SIGTERM to the process group ends the workers too
            return stopped_message()
        print(
            f"error: a DataLoader worker died ({str(error).splitlines()[0]}), perhaps for lack of"
            " memory."
            " Try --num-workers 0",
            file=sys.stderr,
        )
        return 1
    finally:
        leave_run_folder()
        for number, handler in handlers.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
        sys.exit(f"error: this script needs torch 2.5 or newer (found {torch.__version__})")
    sys.exit(cli())
