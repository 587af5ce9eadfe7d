"""Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10 (Example 2 of the transfer-learning series).

README.md is the lesson and this file its code, in the same order: settings, data, model and new head,
freezing, learning rates, the training step, evaluation, early stopping, then main(), the story of a
run. On a first read, stop at the banner "The lesson ends here" and go on with the README's sections.

    python fine_tuning.py                        # the real run: downloads CIFAR-10 and the weights
    python fine_tuning.py --dry-run              # offline, in seconds: synthetic data, random weights
    python fine_tuning.py --freeze-until layer4  # any constant below as a flag; --help lists them

Comments come in two registers: `##` lines teach, `#` lines explain the code.
`sed '/^ *## /d;/^ *##$/d' fine_tuning.py` strips the lesson and leaves the code.
"""

# === Settings: the one place to edit. Each is also a flag: EPOCHS -> --epochs 3 ========================
# data
DATA_DIR = "./data"          # CIFAR-10 (about 170 MB) is downloaded here on the first run
SEED = 0                     # fixes the split, the new head's init, shuffling and augmentation
VAL_FRACTION = 0.1           # of the 50,000 training images: 45,000 train / 5,000 validation
TRAIN_PER_CLASS = "all"      # "all", or keep N training images per class: try 100 (little data)
IMAGE_SIZE = "auto"          # "auto": 224 on CUDA (ImageNet's size), 32 elsewhere (CIFAR's, fast)
# model
WEIGHTS = "IMAGENET1K_V1"    # ImageNet's; "none": random (from scratch with FREEZE_UNTIL "none"); or a file
FREEZE_UNTIL = "layer2"      # last frozen block: none, stem, layer1..layer4 (layer4 = feature
                             # extraction: only the new head trains)
UNFREEZE_SCHEDULE = {}       # gradual unfreezing: {5: "layer2", 10: "layer1"} releases layer2 at
                             # the start of epoch 5, layer1 at epoch 10
FROZEN_BN = "eval"           # BatchNorm in frozen blocks: "eval" keeps ImageNet's statistics,
                             # "train" adapts them to CIFAR-10 (the convolutions stay frozen)
# optimizer
BATCH_SIZE = 32              # images per step
EPOCHS = 15                  # at most; early stopping usually ends the run sooner
BACKBONE_LR = 1e-4           # layer4's learning rate: small steps keep what ImageNet taught
LAYER_LR_DECAY = 1.0         # each block below layer4 learns at this times the rate above it
                             # (1.0: every pretrained block at BACKBONE_LR; try 0.5)
HEAD_LR = 1e-3               # the new head starts from random weights: 10x larger steps
# early stopping
MONITOR = "val_loss"         # what early stopping watches: "val_loss" or "val_acc"
PATIENCE = 3                 # epochs without improvement before training stops
MIN_DELTA = 0.001            # smallest change that counts (loss, or accuracy as a fraction)
# system
NUM_WORKERS = "auto"         # DataLoader workers: "auto" = 0 on CPU (measured fastest), 2 on CUDA
OUTPUT_DIR = "./runs"        # each run writes OUTPUT_DIR/<run name>/: checkpoints, history, results

import argparse
import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import textwrap
import time
import urllib.error
import warnings
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

try:   # the light packages first, so that a missing one is reported at once
    import numpy as np
    from tqdm import tqdm
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset
    from torchvision import datasets, models
    from torchvision.datasets.utils import check_integrity
    from filelock import FileLock, Timeout   # installed with torch: lets processes take turns with a file
except ImportError as missing:
    sys.exit(f"error: {missing.name or missing} is not installed. Run: pip install -r requirements.txt")
except KeyboardInterrupt:   # Ctrl-C while torch loads: nothing has started yet
    sys.exit(print("\ninterrupted (while loading torch): nothing was started.", file=sys.stderr) or 130)
if tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2]) < (2, 5):
    sys.exit(f"error: this script needs torch >= 2.5 (found {torch.__version__}). Run: pip install -r requirements.txt")

BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]   # ResNet18, input to output
NUM_CLASSES = 10


# === Data: CIFAR-10, a stratified validation split, augmentation on the device =========================
## CIFAR-10 has 50,000 training and 10,000 test images of 32x32 pixels in 10
## classes. The test set is touched once, at the very end. To choose the best
## epoch and to stop early we need a third set: a validation split held out
## from the training images. "Stratified" means every class is split in the
## same proportion, so validation accuracy is not skewed by chance.
def load_data(cfg, hw):
    """Train, validation and test loaders over uint8 images held in memory, and the class names."""
    (images, labels), (test_images, test_labels), classes = (
        synthetic_cifar10(cfg.seed) if cfg.dry_run else load_cifar10(cfg.data_dir))
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed, cfg.train_per_class)
    available = len(labels) - len(val_idx)
    kept = f" (kept {cfg.train_per_class} per class, of {available:,})" if len(train_idx) < available else ""
    print(f"data: {len(train_idx):,} train{kept} / {len(val_idx):,} validation / {len(test_labels):,} test "
          f"images, {len(classes)} classes")
    common = dict(num_workers=hw.num_workers, pin_memory=hw.pin_memory,   # pinned: async copies to CUDA
                  persistent_workers=hw.num_workers > 0, worker_init_fn=ignore_stop_signals)
    ## The training set is shuffled by a generator of its own, which
    ## train_one_epoch() reseeds every epoch. drop_last avoids a last batch of
    ## one image, which BatchNorm cannot normalise in train mode.
    train_set = TensorDataset(images[train_idx], labels[train_idx])
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=RandomSampler(train_set, generator=torch.Generator()),
                              drop_last=True, generator=torch.Generator(), **common)   # workers' seeds: another one
    ## No gradients are kept during evaluation, so twice the batch fits in the same memory.
    val_loader = DataLoader(TensorDataset(images[val_idx], labels[val_idx]), 2 * cfg.batch_size, **common)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), 2 * cfg.batch_size, **common)
    return train_loader, val_loader, test_loader, classes


def stratified_split(labels, val_fraction, seed, train_per_class="all"):
    """Indices (train, val): each class gives round(val_fraction * its size) images to validation,
    and the rest, or a random `train_per_class` of them, to training."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:] if train_per_class == "all" else members[n_val:n_val + train_per_class])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


## Augmentation: a random 32x32 crop from the image padded by 4 pixels, and a
## random horizontal flip -- the classic CIFAR recipe. We apply it to whole
## batches on the device, which is far cheaper than one PIL image at a time.
## Validation and test images are never augmented.
def random_crop_flip(images, generator, padding=4):
    n, channels, height, width = images.shape
    on = images.device
    padded = F.pad(images, (padding,) * 4)   # zero (black) border, as torchvision's RandomCrop
    # Drawn where the generator lives: on CUDA the GPU itself, so there is nothing to copy.
    draw = dict(generator=generator, device=generator.device)
    top, left = torch.randint(0, 2 * padding + 1, (2, n, 1), **draw).to(on)
    flip = (torch.rand(n, 1, **draw) < 0.5).to(on)
    rows = top + torch.arange(height, device=on)                  # (n, height): the rows each crop reads
    cols = left + torch.arange(width, device=on)
    cols = torch.where(flip, cols.flip(1), cols)                  # a flip reads the columns right to left
    return padded[torch.arange(n, device=on).view(n, 1, 1, 1), torch.arange(channels, device=on).view(1, -1, 1, 1),
                  rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]


## The pretrained weights expect what they saw in training: inputs normalised
## with the mean and standard deviation of ImageNet's images, per colour
## channel (from the weights' own preset), and images near ImageNet's size:
## on a GPU we upsample 32 -> 224 pixels.
def imagenet_normalization(device):
    """ImageNet's per-channel mean and std, in pixel units (0..255), shaped to broadcast over a batch."""
    preset = models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    return [torch.tensor(values, device=device).view(1, 3, 1, 1) * 255 for values in (preset.mean, preset.std)]


def model_inputs(images, hw, augment_with=None):
    """uint8 batch -> normalised float batch of IMAGE_SIZE pixels, on the device."""
    images = images.to(hw.device, non_blocking=hw.non_blocking)   # CUDA: overlaps with GPU work
    if augment_with is not None:
        images = random_crop_flip(images, augment_with)
    x = (images.float() - hw.mean) / hw.std
    if x.shape[-1] != hw.image_size:
        # Resizing whole batches on the device: resizing 32 -> 224 in PIL would starve the GPU.
        x = F.interpolate(x, size=hw.image_size, mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=hw.memory_format)


# === Model: ResNet18 with ImageNet weights and a new 10-class head ======================================
## The pretrained network ends in a 1000-way ImageNet classifier (`fc`). We
## keep everything before it -- the feature extractor -- and replace `fc` by a
## fresh 10-way layer for CIFAR-10's classes.
def build_model(weights):
    """ResNet18 with the chosen weights and a new, randomly initialised 10-way head."""
    model = models.resnet18(weights=None)              # the architecture, with random weights
    if weights != "none":
        ## ImageNet's weights are downloaded once into torch's cache (the file
        ## and hash check of resnet18(weights="IMAGENET1K_V1")), then read there.
        backbone = pretrained_weights(model, weights)  # ImageNet's or a file's, checked before use
        model.load_state_dict(backbone, strict=False)  # strict=False: no weights for fc, replaced next
    model.fc = nn.Linear(model.fc.in_features, NUM_CLASSES)   # the new head
    return model


# === Freezing: which blocks learn =======================================================================
## Early blocks detect generic things (edges, colours, textures) that help on any
## image, so we freeze them; later blocks combine them into ImageNet-specific
## parts, so we fine-tune them. "Frozen" has two switches: requires_grad=False
## (the optimizer never changes the weights), and the mode of the block's
## BatchNorm: in train mode it normalises with each batch's statistics and
## updates its running averages (99% of ImageNet's are gone within 44 batches);
## in eval mode it keeps them. Keras keeps all BatchNorm in eval mode, fastai
## trains frozen blocks' BatchNorm: FROZEN_BN chooses, "eval" by default.
def block_modules(model):
    """The six blocks of ResNet18 that freezing and learning rates act on, input to output."""
    return {"stem": nn.ModuleList([model.conv1, model.bn1]), "layer1": model.layer1,
            "layer2": model.layer2, "layer3": model.layer3, "layer4": model.layer4, "fc": model.fc}


def is_trainable(block):
    return any(p.requires_grad for p in block.parameters())


def freeze(model, freeze_until):
    """Freeze every block up to and including `freeze_until` ('none' freezes nothing)."""
    blocks = block_modules(model)
    for name in BLOCKS[:BLOCKS.index(freeze_until) + 1] if freeze_until != "none" else []:
        blocks[name].requires_grad_(False)


def set_train_mode(model, frozen_bn="eval"):
    """model.train(), but with frozen_bn "eval", frozen blocks go back to eval mode: their statistics stay."""
    model.train()
    for block in block_modules(model).values():
        if not is_trainable(block) and frozen_bn == "eval":
            block.eval()


# === Learning rates: one parameter group per block ======================================================
## Discriminative learning rates: the pretrained blocks are already good, so
## they take small steps that adapt them without destroying what they know.
## The new head starts from random numbers and must move far, so it gets a
## 10x larger rate (HEAD_LR). LAYER_LR_DECAY adds a third tier between them:
## the earlier a block, the more generic its features, so each block below
## layer4 can learn more slowly than the one above it. Adam takes a list of
## "parameter groups", each with its own lr; frozen parameters are not given.
def block_lr(name, cfg):
    """HEAD_LR for the head; BACKBONE_LR for layer4, times LAYER_LR_DECAY per block further down."""
    if name == "fc":
        return cfg.head_lr
    return cfg.backbone_lr * cfg.layer_lr_decay ** (BLOCKS.index("layer4") - BLOCKS.index(name))


def param_groups(model, cfg):
    return [{"name": name, "params": list(block.parameters()), "lr": block_lr(name, cfg)}
            for name, block in block_modules(model).items() if is_trainable(block)]


def make_optimizer(groups, device):
    # fused=True: one kernel for all tensors on CUDA, one C++ loop on the CPU, not several ops per tensor.
    return torch.optim.Adam(groups, fused=device.type in ("cuda", "cpu"))


## Gradual unfreezing: start with the late blocks only, then release earlier
## blocks once the head has settled, so its first large, noisy gradients never
## reach the most generic features.
def unfreeze(model, optimizer, block_name, cfg):
    """Make `block_name` and any frozen block after it trainable; each joins Adam at its own rate."""
    blocks, released = block_modules(model), []
    for name in BLOCKS[BLOCKS.index(block_name):]:
        if not is_trainable(blocks[name]):
            blocks[name].requires_grad_(True)
            optimizer.add_param_group({"name": name, "params": list(blocks[name].parameters()),
                                       "lr": block_lr(name, cfg)})
            released.append(name)
    return released   # set_train_mode() now leaves their BatchNorm in train mode, whatever FROZEN_BN


# === The training step ==================================================================================
## The classic loop: forward, loss, zero_grad, backward, step. Each epoch's
## shuffle and augmentation are seeded from (SEED, epoch), so a resumed run
## sees exactly the batches an uninterrupted one would.
def train_one_epoch(model, loader, optimizer, hw, epoch, cfg):
    """One pass over the training split: (mean loss, accuracy), or None if stopped part-way."""
    set_train_mode(model, cfg.frozen_bn)   # frozen blocks' BatchNorm as FROZEN_BN says
    loader.sampler.generator.manual_seed(epoch_seed(cfg.seed, epoch, 0))
    augment_with = torch.Generator(hw.generator_device).manual_seed(epoch_seed(cfg.seed, epoch, 1))
    progress = Progress(loader, f"epoch {epoch}", cfg.max_batches, hw.device)
    for images, labels in progress:
        x, y = model_inputs(images, hw, augment_with), labels.to(hw.device, non_blocking=hw.non_blocking)
        logits = model(x)                          # forward pass
        loss = F.cross_entropy(logits.float(), y)  # loss (.float(): on a GPU, logits may be 16-bit)
        optimizer.zero_grad(set_to_none=True)      # clear the last step's gradients
        if not hw.scaler.is_enabled():
            loss.backward()                        # gradients reach only the trainable blocks
            optimizer.step()                       # each parameter group at its own learning rate
        else:   # GPU in float16 only (a T4): the same two steps through the gradient scaler (see Hardware)
            hw.scaler.scale(loss).backward()
            hw.scaler.step(optimizer)
            hw.scaler.update()
        progress.add(loss, logits, y)              # running sums; a nan or inf loss stops the run
    return progress.result()


# === Evaluation =========================================================================================
## Evaluation puts every layer in eval mode: BatchNorm uses its running
## statistics, so a prediction never depends on the other images in the batch.
@torch.inference_mode()   # no autograd bookkeeping at all: faster than no_grad
def evaluate(model, loader, hw, cfg, desc):
    """Mean loss, confusion matrix (rows: true class), each image's (prediction, probability); None if stopped."""
    model.eval()
    progress = Progress(loader, desc, cfg.max_batches, hw.device)
    confusion = torch.zeros(NUM_CLASSES ** 2, dtype=torch.int64, device=hw.device)
    predictions = []
    for images, labels in progress:
        x, y = model_inputs(images, hw), labels.to(hw.device, non_blocking=hw.non_blocking)
        logits = model(x).float()
        progress.add(F.cross_entropy(logits, y), logits, y)   # a nan or inf loss stops the run here too
        probability, predicted = logits.softmax(1).max(1)
        predictions.append(torch.stack([predicted.float(), probability], 1))
        # Counted with one_hot of a fixed size: unlike bincount, it never makes the CPU wait for the GPU.
        confusion += F.one_hot(y * NUM_CLASSES + predicted, NUM_CLASSES ** 2).sum(0)
    result = progress.result()
    return result and (result[0], confusion.view(NUM_CLASSES, NUM_CLASSES).cpu(), torch.cat(predictions).cpu())


def accuracy(confusion):
    return confusion.trace().item() / max(1, confusion.sum().item())


# === Early stopping =====================================================================================
## Training accuracy keeps rising long after the model stops getting better on
## images it has not seen. Early stopping watches the validation split, keeps
## the weights of the best epoch, and ends training once `patience` epochs in
## a row failed to improve on the best by at least `min_delta`.
class EarlyStopping:
    def __init__(self, patience, min_delta, mode="min"):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode   # mode: "min" or "max"
        self.best, self.best_epoch, self.bad_epochs = None, None, 0

    def step(self, value, epoch):
        """Record one epoch's value. Returns True when it is a new best."""
        if self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                 else value > self.best + self.min_delta):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self):
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience


def fit(model, optimizer, hw, train_loader, val_loader, stopper, run):
    """The epoch loop: unfreeze on schedule, train, validate, keep the best weights, stop early."""
    cfg = run.cfg
    print(f"{'epoch':>5}{'train loss':>12}{'train acc':>11}{'val loss':>10}{'val acc':>9}{'time':>8}")
    for epoch in range(run.next_epoch, cfg.epochs + 1):
        if stopper.should_stop:
            break
        if epoch in cfg.unfreeze_schedule:
            released = unfreeze(model, optimizer, cfg.unfreeze_schedule[epoch], cfg)
            print(f"epoch {epoch}: unfreezing {', '.join(released)} "
                  f"(lr {', '.join(f'{block_lr(name, cfg):.1e}' for name in released)})")
        started = time.perf_counter()
        trained = train_one_epoch(model, train_loader, optimizer, hw, epoch, cfg)
        validated = trained and evaluate(model, val_loader, hw, cfg, f"epoch {epoch} val")
        if not validated:   # Ctrl-C or SIGTERM: this epoch is dropped, the last saved one stands
            break
        (train_loss, train_acc), (val_loss, confusion, _) = trained, validated
        val_acc = accuracy(confusion)
        improved = stopper.step(val_loss if cfg.monitor == "val_loss" else val_acc, epoch)
        ## The best epoch's weights go to best.pt: they are what we test at the end.
        save_epoch(run, model, optimizer, hw, stopper, improved, dict(
            epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
            seconds=round(time.perf_counter() - started, 2), val_images=confusion.sum().item()))
        if stopping():
            break


# === The story of a run =================================================================================
def main(argv=None):
    """Settings -> data -> model -> freeze -> optimizer -> epochs with early stopping -> test -> report."""
    cfg = parse_settings(argv)   # the constants, as overridden by flags or by the run being resumed
    run_dir = claim_run_folder(cfg)   # OUTPUT_DIR/<run name>, this run's alone, before any data is loaded
    hw = Hardware(cfg)           # the device, its precision, ImageNet's normalisation on it
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    model = build_model(cfg.weights)
    train_loader, val_loader, test_loader, classes = load_data(cfg, hw)
    freeze(model, cfg.freeze_until)
    model = hw.prepare(model)    # on the device; on a GPU, the forward pass in mixed precision
    optimizer = make_optimizer(param_groups(model, cfg), hw.device)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, "min" if cfg.monitor == "val_loss" else "max")
    run = open_run(cfg, run_dir, hw, model, optimizer, stopper)   # config.json, or the resumed run's state
    print_blocks(model, optimizer, cfg.frozen_bn)
    with stop_after_batch():     # Ctrl-C or SIGTERM: finish the batch, keep the files, then stop
        fit(model, optimizer, hw, train_loader, val_loader, stopper, run)
    reason = stop_reason(run, stopper)
    print(f"\nstopped: {reason}")
    if stopper.best_epoch is None or stop_requested == signal.SIGTERM:
        return stop_without_test()

    ## The test set is used once, on the weights that early stopping chose on
    ## the validation split. Choosing anything by test accuracy would make it a
    ## second validation set, and the reported figure optimistic.
    model.load_state_dict(load_checkpoint(run.dir / "best.pt", "the best weights"))
    print(f"restored the weights of epoch {stopper.best_epoch} (best {cfg.monitor}) from {run.dir / 'best.pt'}")
    try:
        test_loss, confusion, predictions = evaluate(model, test_loader, hw, cfg, "test")
    except KeyboardInterrupt:
        return stop_without_test("test evaluation skipped.")
    return finish_run(run, stopper, reason, classes, test_loss, confusion, (test_loader.dataset, predictions))


# =========================================================================================================
# The lesson ends here: on a first read, stop and go on with the README. Below is plumbing: the command
# line and its checks, files, the run folder and resume, reports, signals and progress, downloads, devices.
# =========================================================================================================
SETTINGS = ("DATA_DIR SEED VAL_FRACTION TRAIN_PER_CLASS IMAGE_SIZE WEIGHTS FREEZE_UNTIL UNFREEZE_SCHEDULE FROZEN_BN "
            "BATCH_SIZE EPOCHS BACKBONE_LR LAYER_LR_DECAY HEAD_LR MONITOR PATIENCE MIN_DELTA NUM_WORKERS "
            "OUTPUT_DIR").split()
CIFAR10_TRAIN_IMAGES = 50_000   # known before any download, so the split is checked first
SYNTHETIC_SIZES = (2_000, 500)  # --dry-run: training and test images of class-tinted noise
DRY_RUN_BATCHES = 2             # --dry-run: batches per phase (train, validation, test)
DRY_RUN_EPOCHS = 3              # --dry-run: epochs, unless --epochs is given or the schedule needs more
SYNC_EVERY = 25                 # read the loss back from the device every N batches (see Progress)
LOG_EVERY = 30                  # seconds between progress lines where the output is a log, not a terminal
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)   # the errno of a write to a full disk, or past a quota
HISTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", *(f"lr_{b}" for b in BLOCKS), "trainable",
           "seconds"]   # the columns of history.csv
stop_requested = 0              # the signal that asked the run to stop: SIGINT (Ctrl-C) or SIGTERM
finishing_batch = False         # True while training: then the first signal lets the batch finish


class SettingError(Exception):
    """A bad setting: one line, exit code 2."""


class RunError(Exception):
    """Something outside the code went wrong (download, files, divergence): exit code 1."""


# --- The command line: the constants are its defaults, so one path checks both ----------------------------
def flag(name):
    return "--" + name.lower().replace("_", "-")


def checked(kind, test, expected, word=None):
    """An argparse type: kind(text) when it is not None and test() holds for it, or the word `word`."""
    def parse(text):
        if word and text.strip().lower() == word:
            return word
        with contextlib.suppress(ValueError, OverflowError, OSError, RuntimeError):   # ~nobody/: RuntimeError
            if (value := kind(text)) is not None and test(value):
                return value
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected {word + ' or ' if word else ''}{expected}")
    return parse


def one_of(*choices):   # argparse checks choices= for typed flags only, not for defaults: this checks both
    return checked(lambda text: text.strip().lower(), lambda value: value in choices, "one of " + ", ".join(choices))


def folder(text, writable=False):
    """A folder's path; None when empty, 'none', not a folder, or not writable where it must be."""
    path = Path(text.strip()).expanduser()
    nearest = next(p for p in [path, *path.absolute().parents] if p.exists())
    ok = text.strip().lower() not in ("", "none") and "\0" not in text and nearest.is_dir()   # nor under a file
    return path if ok and (not writable or os.access(nearest, os.W_OK | os.X_OK)) else None


def weights_choice(text):
    """IMAGENET1K_V1 (DEFAULT names it too), none, or a file's absolute path (checked in check_together())."""
    name = text.strip()
    if not name or "\0" in name:   # "" would name the working folder
        raise ValueError(name)
    if name.lower() == "none" or name.upper() in models.ResNet18_Weights.__members__:
        return "none" if name.lower() == "none" else models.ResNet18_Weights[name.upper()].name
    if not os.path.exists(name) and not re.search(r"[/\\.~]", name):   # a word, not a path: a misspelt name
        raise ValueError(name)
    return str(Path(name).expanduser().absolute())


def schedule(text):
    """'5:layer2,10:layer1', or a dict's text {5: 'layer2'} -> {5: 'layer2', 10: 'layer1'}; None if malformed."""
    pairs = [p.partition(":") for p in "".join(c for c in text if c not in "{}'\" ").lower().split(",") if p]
    plan = {int(epoch): block for epoch, _, block in pairs if epoch.isdigit() and block in BLOCKS[:-1]}
    return plan if len(plan) == len(pairs) or text.strip() == "none" else None


def schedule_text(plan):
    return ",".join(f"{epoch}:{block}" for epoch, block in plan.items()) or "none"


def constant_text(name):
    """A constant as the text a flag would give, so argparse checks both the same way."""
    if name not in globals():
        raise SettingError(f"{name} is missing from the settings at the top of fine_tuning.py (commented out?)")
    value = globals()[name]
    if isinstance(value, dict):
        return schedule_text(value)
    if value is None or isinstance(value, (bool, list, set, tuple)):
        raise SettingError(f"{name} ({flag(name)}) = {value!r} is not allowed: write a number or a text in quotes"
                           + (", or a dict such as {5: 'layer2'}" if name == "UNFREEZE_SCHEDULE" else ""))
    return str(value)


def settings_parser():
    parser = argparse.ArgumentParser(prog="fine_tuning.py", allow_abbrev=False, description="Fine-tune an ImageNet-"
                                     "pretrained ResNet18 on CIFAR-10. Each option overrides the constant of its name.",
                                     usage="python fine_tuning.py [--dry-run] [--resume RUN_DIR] [--SETTING VALUE ...]")
    named = {f"argument {flag(name)}:": f"{name} ({flag(name)}):" for name in SETTINGS}   # "EPOCHS (--epochs):"
    parser.error = lambda message: argparse.ArgumentParser.error(
        parser, re.sub("|".join(named), lambda match: named[match[0]], message))

    def add(name, type, help, **more):
        parser.add_argument(flag(name), dest=name, metavar=name, type=type, default=constant_text(name),
                            help=help + " (default: %(default)s)", **more)
    whole, rate, typo = "a whole number >= ", lambda x: 0 < x <= 1, " (Adam: above 1 is surely a typo)"
    add("DATA_DIR", checked(folder, lambda path: not (path / "data_batch_1").exists(), "a folder: the one that "
                            "holds (or will hold) cifar-10-batches-py, not that folder itself"),
        "holds, or receives, CIFAR-10")
    add("SEED", checked(int, lambda n: 0 <= n < 2**32, "a whole number from 0 to 4294967295"), "random seed")
    add("VAL_FRACTION", checked(float, lambda x: 0 < x < 1, "a number strictly between 0 and 1, e.g. 0.1"),
        "share of the training images held out for validation")
    add("TRAIN_PER_CLASS", checked(int, lambda n: n >= 1, whole + "1", "all"), "training images kept per class")
    add("IMAGE_SIZE", checked(int, lambda n: 32 <= n <= 512, "a whole number from 32 to 512 (CIFAR has 32 pixels, "
                              "ImageNet about 224)", "auto"), "pixels fed to the model; auto: 224 on CUDA, else 32")
    add("WEIGHTS", checked(weights_choice, bool, "one of the known names IMAGENET1K_V1 and none, or the path of a "
                           "ResNet18 state-dict file"), "IMAGENET1K_V1, none (random), or a ResNet18 state-dict file")
    add("FREEZE_UNTIL", one_of("none", *BLOCKS[:-1]), "last frozen block: %(choices)s", choices=["none", *BLOCKS[:-1]])
    add("UNFREEZE_SCHEDULE", checked(schedule, lambda plan: True, "none, or EPOCH:BLOCK pairs such as 5:layer2,"
                                     "10:layer1, each epoch once, blocks from stem to layer4"), "gradual unfreezing")
    add("FROZEN_BN", one_of("eval", "train"), "BatchNorm of frozen blocks: %(choices)s", choices=["eval", "train"])
    add("BATCH_SIZE", checked(int, lambda n: n >= 2, whole + "2 (BatchNorm in train mode needs 2 or more images "
                              "to normalise over)"), "training batch size")
    add("EPOCHS", checked(int, lambda n: n >= 1, whole + "1"), "maximum number of epochs")
    add("BACKBONE_LR", checked(float, rate, "a learning rate in (0, 1], e.g. 1e-4" + typo), "layer4's learning rate")
    add("LAYER_LR_DECAY", checked(float, lambda x: 0 < x <= 1, "a number in (0, 1], e.g. 0.5"),
        "each block below layer4 learns at this times the rate of the block above")
    add("HEAD_LR", checked(float, rate, "a learning rate in (0, 1], e.g. 1e-3" + typo), "the new head's learning rate")
    add("MONITOR", one_of("val_loss", "val_acc"), "what early stopping watches: %(choices)s",
        choices=["val_loss", "val_acc"])
    add("PATIENCE", checked(int, lambda n: n >= 0, whole + "0"), "epochs without improvement before stopping")
    add("MIN_DELTA", checked(float, lambda x: 0 <= x < math.inf, "a number >= 0"), "smallest change that counts")
    add("NUM_WORKERS", checked(int, lambda n: n >= 0, whole + "0", "auto"), "DataLoader worker processes")
    add("OUTPUT_DIR", checked(lambda text: folder(text, writable=True), bool, "a folder you can write to"),
        "where run folders are written")
    parser.add_argument("--dry-run", action="store_true", help=f"check your install offline in seconds: synthetic "
                        f"data, random weights, {DRY_RUN_BATCHES} batches per phase, {DRY_RUN_EPOCHS} epochs unless "
                        "--epochs is given; every other setting kept")
    windows = r"(?!(?i:con|prn|aux|nul|com\d|lpt\d)(\.|$))"   # names Windows reserves; no name may end in "."
    parser.add_argument("--run-name", type=checked(str, lambda name: re.fullmatch(windows + r"\w[\w.+=-]*(?<!\.)",
                        name) and name != "summary.csv", "a folder name of letters, digits and ._+=- that Windows "
                        "accepts too (not CON, NUL..., no '.' at the end), not summary.csv"),
                        help="name of the run folder (default: time and settings)")
    parser.add_argument("--resume", metavar="RUN_DIR", type=checked(folder, lambda p: (p / "config.json").is_file(),
                        "a run folder made by this script"), help="continue an interrupted run")
    return parser


def parse_settings(argv=None):
    """The checked settings, named in lower case, with the run's own options and the device."""
    argv, parser = sys.argv[1:] if argv is None else list(argv), settings_parser()
    for i in range(len(argv) - 1, 0, -1):   # argparse takes "-1e-3" (or -inf) for an option, not a flag's value
        if re.fullmatch(r"--[\w-]+", argv[i - 1]) and re.fullmatch(r"-(\d[\d.]*e[-+]?\d+|inf|nan)", argv[i], re.I):
            argv[i - 1:i + 1] = [f"{argv[i - 1]}={argv[i]}"]
    options = parser.parse_args(argv)
    if options.resume:
        if others := [a for a in argv if a.startswith("--") and not a.startswith("--resume")]:
            parser.error(f"--resume continues a run with its saved settings; drop {' '.join(others)}")
        options = parser.parse_args(argv := resume_argv(options.resume, parser))
    cfg = SimpleNamespace(**{name.lower(): value for name, value in vars(options).items()})   # dry_run, resume...
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    cfg.device = torch.device("cuda" if cuda else "mps" if mps else "cpu")
    cfg.max_batches = DRY_RUN_BATCHES if cfg.dry_run else None   # batches per phase; None: all
    if cfg.image_size == "auto":
        cfg.image_size = 224 if cuda else 32
    check_together(cfg)
    if cfg.dry_run and not any(a.startswith("--epochs") for a in argv):   # enough to reach the schedule
        cfg.epochs = min(cfg.epochs, max([DRY_RUN_EPOCHS, *cfg.unfreeze_schedule]))
    # The settings as this run uses them (config.json, summary.csv); absolute folders: it resumes from anywhere.
    cfg.settings = {name: getattr(cfg, name.lower()) for name in SETTINGS}
    cfg.settings.update(DATA_DIR=str(cfg.data_dir.absolute()), OUTPUT_DIR=str(cfg.output_dir.absolute()),
                        UNFREEZE_SCHEDULE=schedule_text(dict(sorted(cfg.unfreeze_schedule.items()))))
    if cfg.dry_run or cfg.resume:
        cfg.weights = "none"   # random weights; a resumed run loads its own from last.pt
    return cfg


def check_together(cfg):
    """The checks that need two settings; the split is checked on CIFAR-10's known size, also for a dry run."""
    frozen, released = BLOCKS[:BLOCKS.index(cfg.freeze_until) + 1] if cfg.freeze_until != "none" else [], {}
    for epoch, block in sorted(cfg.unfreeze_schedule.items()):
        if not (1 <= epoch <= cfg.epochs and block in frozen):
            raise SettingError(f"UNFREEZE_SCHEDULE (--unfreeze-schedule): {epoch}:{block} is not allowed: " + (
                f"epoch {epoch} is outside 1..{cfg.epochs} (EPOCHS)" if block in frozen else
                f"{released[block]} already released {block}: unfreezing a block releases every block after it"
                if block in released else
                f"{block} is already trainable (FREEZE_UNTIL = {cfg.freeze_until}); name a frozen block"))
        released.update(dict.fromkeys(frozen[frozen.index(block):], f"{epoch}:{block}"))
        frozen = frozen[:frozen.index(block)]   # that block and every block after it now train
    if os.path.isabs(cfg.weights) and not cfg.resume and not os.path.isfile(cfg.weights):   # resumed: last.pt
        try:
            problem = "not a regular file" if Path(cfg.weights).exists() else "no such file"
        except (OSError, ValueError) as error:   # e.g. in a folder we may not look into
            problem = getattr(error, "strerror", None) or str(error)
        raise SettingError(f"WEIGHTS (--weights) = '{cfg.weights}' is not allowed: expected IMAGENET1K_V1, none, or "
                           f"a ResNet18 state-dict file ({problem})")
    labels = torch.arange(CIFAR10_TRAIN_IMAGES) % NUM_CLASSES
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed, cfg.train_per_class)
    left, fewest = len(labels) - len(val_idx), torch.bincount(labels[train_idx], minlength=NUM_CLASSES).min()
    if not len(val_idx) or not left:
        raise SettingError(f"VAL_FRACTION (--val-fraction) = {cfg.val_fraction} leaves {left:,} training and "
                           f"{len(val_idx):,} validation images of {len(labels):,}; both must be non-empty")
    if cfg.train_per_class != "all" and fewest < cfg.train_per_class:
        raise SettingError(f"TRAIN_PER_CLASS (--train-per-class) = {cfg.train_per_class}: only {fewest} training "
                           "images per class remain after the validation split")
    if cfg.batch_size > len(train_idx):
        raise SettingError(f"BATCH_SIZE (--batch-size) = {cfg.batch_size}: the training split has only "
                           f"{len(train_idx):,} images")
    if cfg.weights == "none" and cfg.freeze_until != "none" and not cfg.resume:
        print(f"note: WEIGHTS = none with FREEZE_UNTIL = {cfg.freeze_until}: the frozen blocks keep random weights, "
              "which is almost never meant. From scratch means every block trains: add --freeze-until none.")
    if cfg.dry_run:   # it runs on what the synthetic set has, and says so
        fit_synthetic_set(cfg)


def fit_synthetic_set(cfg):
    """Fit a dry run's settings to the synthetic set (each class: 1 validation and 2 training images at least)
    and note in its line where that is less than was asked for."""
    per_class = SYNTHETIC_SIZES[0] // NUM_CLASSES
    fraction = min(max(cfg.val_fraction, 1 / per_class), 1 - 2 / per_class)
    have = len(stratified_split(torch.arange(SYNTHETIC_SIZES[0]) % NUM_CLASSES, fraction, cfg.seed)[0])
    fewer = [f"VAL_FRACTION {fraction:g}, not {cfg.val_fraction:g}"] * (fraction != cfg.val_fraction) + [
        f"{have // NUM_CLASSES} training images per class, not {cfg.train_per_class}"] * (
        cfg.train_per_class != "all" and cfg.train_per_class > have // NUM_CLASSES) + [
        f"batches of {have}, not {cfg.batch_size}"] * (cfg.batch_size > have)
    cfg.dry_run_note = f", but the synthetic set has fewer images: {'; '.join(fewer)}" if fewer else ""
    cfg.batch_size, cfg.val_fraction = min(cfg.batch_size, have), fraction


# --- Files: every write is atomic, so a crash or a full disk never leaves a broken file --------------------
def save(path, content):
    """Write into a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the new one, never half of one. .pt: torch.save; .png: a figure; .json; .csv: (columns, rows)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # one per process: concurrent runs never clash
    try:
        with open(temporary, "wb") as file:
            if path.suffix in (".pt", ".png"):
                torch.save(content, file) if path.suffix == ".pt" else content.savefig(file, format="png", dpi=100)
            elif path.suffix == ".json":
                file.write(json.dumps(content, indent=2).encode())
            else:
                writer = csv.DictWriter(text := io.StringIO(), content[0], extrasaction="ignore", lineterminator="\n")
                writer.writeheader()
                writer.writerows(content[1])
                file.write(text.getvalue().encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        cause = error if isinstance(error, OSError) else error.__context__   # torch.save wraps the write's error
        if isinstance(cause, KeyboardInterrupt):   # a second Ctrl-C during the write: stop now, old file intact
            raise cause from None
        if not isinstance(cause, OSError):
            raise   # any other RuntimeError is a bug: keep its traceback
        raise write_error(path, cause) from None   # named by its errno, never by torch's text
    finally:
        temporary.unlink(missing_ok=True)


def write_error(path, error):
    """A failed write named by its errno: a full disk or quota, a file-size limit, or what the system says."""
    if error.errno in DISK_FULL:
        return RunError(f"the disk is full: could not write {path.name} in {path.parent}; files saved before are "
                        "intact. Free some space, then run again (or --resume RUN_DIR)")
    if error.errno == errno.EFBIG:
        return RunError(f"could not write {path}: the file is larger than a file-size limit allows (`ulimit -f`, "
                        "or the file system's); files saved before are intact")
    return RunError(f"could not write {path}: {error.strerror or error}")


def add_to_summary(output_dir, row):
    """Add this run's row to OUTPUT_DIR/summary.csv, one run at a time, replacing a row of the same run (a
    resumed run that had written it); every column and row is kept. Returns every row."""
    path = Path(output_dir) / "summary.csv"
    try:
        with FileLock(path.with_name(".summary.lock")):   # on every platform; freed if the process dies
            # utf-8-sig: Excel saves a byte-order mark; newline="": its CRLF line ends are read as such.
            reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8-sig") if path.exists() else "", ""))
            rows, columns = [r for r in reader if r.get("run") != row["run"]] + [row], reader.fieldnames or []
            if len(set(columns)) < len(columns) or any(None in r for r in rows):
                raise csv.Error("a column name twice, or a row with more fields than the header")
            save(path, ([*row] + [c for c in columns if c not in row], rows))
    except OSError as error:
        raise write_error(path, error) from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise RunError(f"{path} cannot be updated without losing data ({error}): mend it, or move it away and "
                       "the next run starts a new one") from None
    return rows


def load_checkpoint(path, what):
    """torch.load that accepts only tensors and plain containers, never code; a clear error otherwise."""
    try:
        with warnings.catch_warnings():   # torch warns of TorchScript files; the error below says more
            warnings.simplefilter("ignore")
            ## weights_only=True refuses pickled Python objects: unpickling an
            ## untrusted file could otherwise run arbitrary code on your machine.
            content = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(content, torch.jit.ScriptModule):   # torch < 2.6 loads TorchScript instead of refusing it
            raise RuntimeError("a TorchScript archive")
        return content
    except Exception as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        module, _, name = found[1].rpartition(".") if found else ("", "", "")
        kind = getattr(sys.modules.get(module), name, None)   # looked up among loaded modules, never imported
        if isinstance(error, OSError):
            problem = f"cannot be read ({error.strerror or error})"
        elif "TorchScript" in str(error):
            problem = ("is a TorchScript archive (torch.jit.save), not a state dict: pass a file saved with "
                       "torch.save(model.state_dict(), path); torch.jit.load(path).state_dict() gives one")
        elif isinstance(kind, type) and issubclass(kind, nn.Module):
            problem = (f"holds a whole pickled model ({found[1]}), not a state dict: where you trust the file, "
                       "load it with weights_only=False and save model.state_dict() instead")
        elif found:
            problem = (f"was refused: it holds a Python object ({found[1]}), and unpickling it could run code. "
                       "Only use files you trust; to save weights, save model.state_dict()")
        else:
            problem = f"is corrupt: not a PyTorch file, or truncated ({type(error).__name__})"
        raise RunError(f"{what} {path} {problem}") from None


# --- The run folder: owned by one run, created or resumed, saved each epoch, finished, left ----------------
claimed = SimpleNamespace(dir=None, lock=None, made=False, wrote=False, state=None)   # the folder this process owns
RESUME_MAY_CHANGE = ("EPOCHS", "NUM_WORKERS", "DATA_DIR", "OUTPUT_DIR")   # in config.json, between stops


def claim_run_folder(cfg):
    """This run's folder, locked for as long as the process lives and before any data is loaded: a new
    OUTPUT_DIR/<name> (a default name another run took gets -2, -3...), or the folder to resume, whose last.pt
    must fit its config.json. A folder another run holds, or that this script did not make, is refused."""
    if cfg.resume:
        return claim_resumed(cfg)
    name = cfg.run_name or time.strftime("%m%d-%H%M%S_") + ("dry-run" if cfg.dry_run else "_".join(
        [cfg.freeze_until, f"{cfg.backbone_lr:.0e}", f"{cfg.head_lr:.0e}", f"{cfg.image_size}px"]
        + ["scratch" if cfg.freeze_until == "none" else "random-weights"] * (cfg.weights == "none")))
    for n in range(1, 1000):
        run_dir = cfg.output_dir / (name if n == 1 else f"{name}-{n}")
        try:
            run_dir.mkdir(parents=True)   # atomic: of two runs, one makes it
            claimed.made = True
        except FileExistsError:
            if not cfg.run_name:
                continue
            if not run_dir.is_dir():   # a file, or a symbolic link to nowhere
                raise SettingError(f"--run-name: {run_dir} exists and is not a folder; choose another name") from None
        except OSError as error:   # a name too long for the file system, a loop of symbolic links; a full disk
            raise (write_error(run_dir, error) if error.errno in DISK_FULL else SettingError(
                f"OUTPUT_DIR (--output-dir) / --run-name: cannot make {run_dir}: {error.strerror}")) from None
        if not lock_run_folder(run_dir):
            if cfg.run_name:
                raise SettingError(f"--run-name: another run is using {run_dir} now; choose another name")
            continue
        found = sorted(p.name for p in run_dir.iterdir() if p.name[0] != ".") if not claimed.made else []
        if set(found) & {"last.pt", "best.pt", "results.json"}:
            raise SettingError(f"--run-name: {run_dir} already holds a run; choose another name" + (
                f", or continue it with --resume {run_dir}" if "last.pt" in found else ""))
        if not set(found) <= {"config.json", "history.csv"} or not made_by_this_script(run_dir):
            raise SettingError(f"--run-name: {run_dir} holds files this script did not make ({', '.join(found[:3])});"
                               " choose another name")
        return run_dir
    raise SettingError(f"--run-name: {cfg.output_dir} already holds 999 runs named {name}; choose another name")


def made_by_this_script(run_dir):   # as a run of this script leaves it before its first epoch (then reused)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return isinstance(json.loads((run_dir / "config.json").read_text()).get("settings"), dict)
    return not (run_dir / "config.json").exists()


def lock_run_folder(run_dir):
    """Lock `run_dir` for this process; the system frees the lock when the process ends, however it ends."""
    lock = FileLock(run_dir / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    claimed.dir, claimed.lock = run_dir, lock
    return True


def claim_resumed(cfg):
    """Lock the run folder to resume, remove what a killed process left, and check last.pt against config.json."""
    run_dir = cfg.resume
    if not lock_run_folder(run_dir):
        raise SettingError(f"--resume {run_dir}: another run of this script is training in that folder now")
    for stale in run_dir.glob(".*.tmp"):   # a write that a killed process never finished
        stale.unlink(missing_ok=True)
    state = claimed.state = load_checkpoint(run_dir / "last.pt", "the checkpoint")
    if not (isinstance(state, dict) and {"epoch", "model", "optimizer", "scaler", "early_stopping", "history"}
            <= state.keys() and isinstance(state["epoch"], int) and isinstance(state["history"], list)
            and all(isinstance(row, dict) and {k for k in HISTORY if k[:3] != "lr_"} <= row.keys()
                    for row in state["history"])):
        raise RunError(f"the checkpoint {run_dir / 'last.pt'} is not one this script wrote (keys or history rows "
                       "missing); start a new run")
    trained = {**state.get("settings", {}), "dry_run": state.get("dry_run", cfg.dry_run)}   # older: no settings
    now = {**cfg.settings, "dry_run": cfg.dry_run}
    if changed := [n for n in now if n not in RESUME_MAY_CHANGE and n in trained and str(trained[n]) != str(now[n])]:
        raise SettingError(f"--resume {run_dir}: {changed[0]} is {now[changed[0]]!r} in its config.json, but the run "
                           f"was trained with {trained[changed[0]]!r}; only {', '.join(RESUME_MAY_CHANGE)} may change")
    if cfg.epochs < state["epoch"]:
        raise SettingError(f"--resume {run_dir}: EPOCHS is {cfg.epochs} in its config.json, but {state['epoch']} "
                           "epochs are done; EPOCHS may only be raised, to train longer")
    cfg.output_dir = run_dir.absolute().parent   # where the run is now, if its folder was moved
    cfg.settings["OUTPUT_DIR"] = str(cfg.output_dir)
    return run_dir


def leave_run_folder():
    """Unlock the run folder; a new run that completed no epoch removes the files and the folder it made."""
    run_dir, claimed.dir = claimed.dir, None
    if run_dir is None:
        return
    if claimed.wrote and not (run_dir / "last.pt").exists() and not (run_dir / "results.json").exists():
        for name in ("config.json", "history.csv"):
            (run_dir / name).unlink(missing_ok=True)
    claimed.lock.release()
    (run_dir / ".lock").unlink(missing_ok=True)
    if claimed.made:
        with contextlib.suppress(OSError):
            run_dir.rmdir()   # only if empty
    claimed.made = claimed.wrote = False
    claimed.state = None


def open_run(cfg, run_dir, hw, model, optimizer, stopper):
    """The new run's config.json and history.csv, or the resumed run's state restored from its last.pt."""
    run = SimpleNamespace(cfg=cfg, dir=run_dir, history=[], next_epoch=1, started=time.time())
    if not cfg.resume:
        claimed.wrote = True   # config.json and history.csv: leave_run_folder() removes them if no epoch ends
        save(run.dir / "config.json", dict(
            run=run.dir.name, dry_run=cfg.dry_run, settings=cfg.settings, device=str(hw.device),
            precision=str(hw.amp_dtype or torch.float32), torch=torch.__version__, python=sys.version.split()[0],
            torchvision=torchvision.__version__, started=time.strftime("%Y-%m-%dT%H:%M:%S")))
        save(run.dir / "history.csv", (HISTORY, []))
        print(f"run folder: {run.dir}")
        return run
    state, claimed.state = claimed.state, None   # copied into the model and optimizer below: not kept for the run
    try:
        for epoch, block in sorted(cfg.unfreeze_schedule.items()):
            if epoch <= state["epoch"]:
                unfreeze(model, optimizer, block, cfg)   # the same parameter groups, in the same order
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and hw.scaler.is_enabled():   # a run may resume on a GPU of another precision
            hw.scaler.load_state_dict(state["scaler"])
        vars(stopper).update(state["early_stopping"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise RunError(f"{run.dir / 'last.pt'} does not fit the settings in its config.json (were they edited?): "
                       f"{type(error).__name__}: {str(error)[:200]}") from None
    run.history, run.next_epoch = list(state["history"]), state["epoch"] + 1
    if stopper.best_epoch == state["epoch"]:   # a crash may have come between last.pt and best.pt
        save(run.dir / "best.pt", state["model"])
    save(run.dir / "history.csv", (HISTORY, run.history))
    run.started -= sum(row["seconds"] for row in run.history)   # count the epochs already run
    print(f"resuming {run.dir} after epoch {state['epoch']}")
    return run


def resume_argv(run_dir, parser):
    """An interrupted run's saved settings as flags, so they are checked as typed ones are."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        saved = dict(config["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        parser.error(f"--resume {run_dir}: its config.json cannot be read; give a run folder made by this script")
    if not isinstance(config.get("dry_run", False), bool):
        parser.error(f"--resume {run_dir}: dry_run in its config.json is {config['dry_run']!r}, not true or false")
    if missing := [name for name in SETTINGS if name not in saved]:
        parser.error(f"--resume {run_dir}: its config.json has no {', '.join(missing)} (written by an older "
                     "version of this script?); start a new run")
    if not (run_dir / "last.pt").is_file() and (run_dir / "results.json").is_file():
        parser.exit(0, f"{run_dir} has already finished: its results are in {run_dir / 'results.json'}\n")
    if not (run_dir / "last.pt").is_file():
        parser.error(f"--resume {run_dir}: no completed epoch to resume from; run the same command again")
    return ([f"{flag(name)}={saved[name]}" for name in SETTINGS] + [f"--resume={run_dir}"]
            + ["--dry-run"] * bool(config.get("dry_run")))


def save_epoch(run, model, optimizer, hw, stopper, improved, row):
    """Everything to resume from this epoch (last.pt) first, then best.pt and history.csv; print the row."""
    lrs = group_lrs(optimizer)
    run.history.append({**row, **{f"lr_{name}": lr for name, lr in lrs.items()}, "trainable": " ".join(lrs)})
    save(run.dir / "last.pt", dict(epoch=row["epoch"], model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=hw.scaler.state_dict(), early_stopping=vars(stopper), history=run.history,
                                   settings=run.cfg.settings, dry_run=run.cfg.dry_run))   # checked on resume
    if improved:
        save(run.dir / "best.pt", model.state_dict())
    save(run.dir / "history.csv", (HISTORY, run.history))
    loss = [f"{row[key]:.4f}" if abs(row[key]) < 1e4 else f"{row[key]:.2e}" for key in ("train_loss", "val_loss")]
    print(f"{row['epoch']:>5}{loss[0]:>12}{row['train_acc']:>11.2%}{loss[1]:>10}{row['val_acc']:>9.2%}"
          f"{row['seconds']:>7.1f}s{'  * best' if improved else ''}", flush=True)   # columns kept for any loss


def stop_reason(run, stopper):
    if stopper.should_stop:
        return (f"early stopping: {run.cfg.monitor} did not improve on epoch {stopper.best_epoch} by at least "
                f"{run.cfg.min_delta:g} for {stopper.bad_epochs} epoch(s) (PATIENCE = {run.cfg.patience})")
    done = run.history and run.history[-1]["epoch"] == run.cfg.epochs
    return f"all epochs ran (EPOCHS = {run.cfg.epochs})" if done else "interrupted"


def stop_without_test(why=""):
    """Stopped (by a signal, at any point): say what is kept and how to go on, or that nothing was kept."""
    run_dir = claimed.dir
    if run_dir and (run_dir / "last.pt").exists():
        print((why and f"\n{why}\n") + f"\nkept in {files_in(run_dir)}\nresume with: python fine_tuning.py --resume "
              f"{run_dir}")
    elif run_dir and not (run_dir / "results.json").exists():   # leave_run_folder() removes what it wrote
        print("no epoch was completed: there is nothing to test or to resume; run the same command again.")
    else:
        print("\ninterrupted.", file=sys.stderr)
    return 128 + (stop_requested or signal.SIGINT)


def finish_run(run, stopper, reason, classes, test_loss, confusion, tested):
    """Print and save the test results; a finished run joins summary.csv and is compared with the last."""
    cfg, test_acc, minutes = run.cfg, accuracy(confusion), (time.time() - run.started) / 60
    best = next(row for row in run.history if row["epoch"] == stopper.best_epoch)
    print(f"\ntest loss {test_loss:.4f}   test accuracy {test_acc:.2%}   "
          f"(best epoch {stopper.best_epoch}: val acc {best['val_acc']:.2%})")
    save(run.dir / "results.json", dict(
        test_loss=test_loss, test_acc=test_acc, per_class_acc=print_report(confusion, classes), classes=classes,
        confusion_matrix=confusion.tolist(), best_epoch=stopper.best_epoch, best_val_acc=best["val_acc"],
        epochs_run=run.history[-1]["epoch"], stop_reason=reason, wall_time_s=round(minutes * 60, 1)))
    for name, figure in pictures(run, stopper.best_epoch, classes, *tested).items():
        save(run.dir / name, figure)
    if cfg.dry_run or reason == "interrupted":
        print(f"\n({'dry run' if cfg.dry_run else 'interrupted run'}: not added to summary.csv)")
    else:
        print_comparison(add_to_summary(cfg.output_dir, dict(
            run=run.dir.name, **cfg.settings, best_val_acc=round(best["val_acc"], 4), test_acc=round(test_acc, 4),
            val_images=best.get("val_images"),
            epochs_run=run.history[-1]["epoch"], minutes=round(minutes, 2))))
    if reason == "interrupted":
        return stop_without_test()   # the files kept, and the resume command
    (run.dir / "last.pt").unlink(missing_ok=True)   # only needed to resume: a finished run keeps best.pt
    print(f"\nfiles in {files_in(run.dir)}")
    return 0


def files_in(folder):
    return f"{folder}: " + " ".join(sorted(path.name for path in folder.iterdir() if path.name[0] != "."))


# --- Reports: the block table, results per class, curves, the comparison of runs --------------------------
def group_lrs(optimizer):
    """{block name: learning rate} of the optimizer's parameter groups, input to output as they joined."""
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def print_blocks(model, optimizer, frozen_bn):
    lrs, counts = group_lrs(optimizer), {"trainable": 0, "frozen": 0}
    print(f"\n{'block':<8}{'status':<11}{'parameters':>12}{'lr':>9}  BatchNorm")
    for name, block in block_modules(model).items():
        size, status = sum(p.numel() for p in block.parameters()), "trainable" if is_trainable(block) else "frozen"
        counts[status] += size
        norm = "-" if name == "fc" else "train" if status == "trainable" else frozen_bn   # FROZEN_BN
        print(f"{name:<8}{status:<11}{size:>12,}{f'{lrs[name]:.1e}' if name in lrs else '-':>9}  {norm}")
    print(f"trainable parameters: {counts['trainable']:,}   frozen: {counts['frozen']:,}\n")


def print_report(confusion, classes):
    """The confusion matrix with each class's test accuracy, and the most confused pairs, in 80 columns."""
    print("\nconfusion matrix (rows: true class, columns: predicted) and accuracy per class\n" + " " * 11
          + "".join(f"{name[:5]:>6}" for name in classes) + f"{'accuracy':>9}")
    per_class = {}   # None: the class has no test image
    for c, name in enumerate(classes):
        images = confusion[c].sum().item()
        per_class[name] = confusion[c, c].item() / images if images else None
        shown = "n/a" if per_class[name] is None else f"{per_class[name]:.1%}"
        print(f"{name[:10]:<11}" + "".join(f"{v:>6}" for v in confusion[c].tolist()) + f"{shown:>9}")
    errors = sorted(((confusion[t, p].item(), t, p) for t in range(len(classes)) for p in range(len(classes))
                     if t != p and confusion[t, p] > 0), reverse=True)
    if errors:
        print("most confused: " + ", ".join(f"{classes[t]} -> {classes[p]}: {n}" for n, t, p in errors[:3]))
    return per_class


def pictures(run, best_epoch, classes, test_set, predictions):
    """curves.png: loss and accuracy per epoch, the best epoch and each unfreezing marked; mistakes.png: the 16
    test images the model got most confidently wrong. Drawn only when matplotlib (optional) is installed."""
    try:
        from matplotlib.figure import Figure   # no pyplot: works without a display
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("(no pictures: `pip install matplotlib` draws curves.png and mistakes.png)")
        return {}
    curves, epochs = Figure(figsize=(10, 4), layout="constrained"), [row["epoch"] for row in run.history]
    for axis, metric, label, scale in zip(curves.subplots(1, 2), ["loss", "acc"], ["loss", "accuracy (%)"], [1, 100]):
        for split, name in [("train", "train"), ("val", "validation")]:
            axis.plot(epochs, [scale * r[f"{split}_{metric}"] for r in run.history], "o-", label=name)
        best = scale * next(r[f"val_{metric}"] for r in run.history if r["epoch"] == best_epoch)
        axis.plot(best_epoch, best, "*", color="gold", markeredgecolor="black", markersize=16,
                  label=f"best epoch ({best_epoch})")
        colors = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]   # one per unfreezing
        for (epoch, block), color in zip(sorted(run.cfg.unfreeze_schedule.items()), colors):
            axis.axvline(epoch - 0.5, color=color, linestyle="--", label=f"unfreeze {block} (before epoch {epoch})")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))   # whole epochs
        axis.set(xlabel="epoch", ylabel=label, title=label)
        axis.legend(fontsize=8)
    curves.suptitle(f"run {run.dir.name}")
    images, labels = test_set.tensors
    predicted, confidence = predictions[:, 0].long(), predictions[:, 1]
    wrong = (predicted != labels[:len(predicted)]).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:16].tolist()
    mistakes = Figure(figsize=(8, 9), layout="constrained")
    for axis, i in zip(mistakes.subplots(4, 4).flat, worst + [None] * 16):
        axis.set_axis_off()
        if i is not None:
            axis.imshow(images[i].permute(1, 2, 0).numpy())
            axis.set_title(f"{classes[labels[i]]}\n-> {classes[predicted[i]]} ({confidence[i]:.0%})", fontsize=10)
    mistakes.suptitle(f"run {run.dir.name}: the most confidently wrong test images\n(true class -> predicted, "
                      "with the model's probability)")
    return {"curves.png": curves, "mistakes.png": mistakes}


def print_comparison(rows, limit=8, width=100):
    """The last runs of summary.csv, each with the settings in which it differs from most of them, then this run
    against the one before it by best validation accuracy, and whether that is beyond one run's noise."""
    shown, names = rows[-limit:], [name for name in SETTINGS if name not in ("DATA_DIR", "OUTPUT_DIR")]
    values = [{n: Path(str(row[n])).name for n in names if row.get(n) not in (None, "")} for row in shown]
    usual = {n: max(seen, key=seen.count) for n in names if (seen := [v[n] for v in values if n in v])}
    column = min(max(len(str(row.get("run"))) for row in shown) + 2, 40)
    print(f"\nruns so far (last {len(shown)} of {len(rows)}, from summary.csv); settings: where a run differs from "
          f"most:\n{'run':<{column}}{'val acc':>8}{'test acc':>9}{'ep':>4}{'min':>6}  settings")
    for row, known in zip(shown, values):
        name = str(row.get("run"))
        if len(name) >= column:   # a long name gets a line of its own, never cut
            print(name)
        cells = [format(float(row[key]), spec) if str(row.get(key, "")).replace(".", "").isdigit() else "?" for
                 key, spec in [("best_val_acc", ".1%"), ("test_acc", ".1%"), ("epochs_run", ".0f"), ("minutes", ".1f")]]
        lead = f"{name if len(name) < column else '':<{column}}{cells[0]:>8}{cells[1]:>9}{cells[2]:>4}{cells[3]:>6}  "
        text = " ".join(f"{n}={v}" for n, v in known.items() if v != usual[n]) if known else "(settings unknown)"
        print("\n".join(textwrap.wrap(text, width, initial_indent=lead, subsequent_indent=" " * len(lead),
                                     break_on_hyphens=False)) or lead.rstrip())
    before, now = rows[-2:] if len(rows) > 1 else ({}, {})
    with contextlib.suppress(TypeError, ValueError, KeyError, ZeroDivisionError):
        known = [name for name in SETTINGS if before.get(name) not in (None, "")]   # none: an older version's row
        changed = [f"{name} {Path(before[name]).name} -> {Path(now[name]).name}" for name in known
                   if str(before[name]) != str(now[name])]
        gap, accuracies = 100 * (float(now["best_val_acc"]) - float(before["best_val_acc"])), [
            (float(r["best_val_acc"]), float(r.get("val_images") or "nan")) for r in (before, now)]
        # Two standard errors of a difference of two accuracies, each on n validation images (binomial).
        noise = 200 * math.sqrt(sum(p * (1 - p) / n for p, n in accuracies))
        verdict = f", {'within' if abs(gap) < noise else 'beyond'} one run's noise (about ±{noise:.1f})"
        changes = ", ".join(changed) or ("same settings" if known else "settings unknown")
        print(textwrap.fill(f"vs {before['run']} ({changes}): best validation accuracy {gap:+.1f} points"
                            f"{verdict * math.isfinite(noise)}; "
                            f"{float(now['minutes']) / float(before['minutes']):.1f}x the minutes", width))


# --- Signals and progress: Ctrl-C or SIGTERM finish the batch; a nan loss stops the run -------------------
def on_stop_signal(signum, frame):
    global stop_requested
    first, stop_requested = not stop_requested, signum
    if not (first and finishing_batch):
        raise KeyboardInterrupt   # outside training, or a second signal: stop at once
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    print(f"\n{name}: stopping after this batch (press Ctrl-C again to quit at once)", flush=True)


@contextlib.contextmanager
def stop_after_batch():
    global finishing_batch
    finishing_batch = True
    try:
        yield
    finally:
        finishing_batch = False


def stopping():
    return finishing_batch and bool(stop_requested)


def ignore_stop_signals(worker_id):
    # DataLoader workers share the terminal: Ctrl-C reaches them too, and the main process alone decides how to
    # stop. SIGTERM still ends a worker, so that no worker outlives the run (multiprocessing stops them with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_seed(seed, epoch, stream):
    # Independent, reproducible seeds for each (seed, epoch, purpose): a resumed run replays them exactly.
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class Progress:
    """The batches of a loader under a progress bar, with the running loss and accuracy. The sums stay on
    the device and are read back every SYNC_EVERY batches (.item() at each step would make the CPU wait for
    the GPU); a nan or inf loss is then named at its batch. Where the output is no terminal (a log), a plain
    line every LOG_EVERY seconds replaces the bar. Iteration ends after max_batches (--dry-run), or early when
    Ctrl-C or SIGTERM asked to stop."""

    def __init__(self, loader, desc, max_batches, device):
        self.desc, self.total = desc, min(len(loader), max_batches or len(loader))
        self.losses, self.checked, self.seen = [], 0, 0   # each batch's loss; how many were checked; images
        try:   # iter(loader) starts the DataLoader's worker processes
            batches = islice(loader, self.total)
        except OSError as error:   # fork refused, e.g. under a limit on processes
            raise RunError(f"could not start {loader.num_workers} DataLoader worker processes ({error}). Try "
                           "--num-workers 0") from None
        self.bar = tqdm(batches, desc, self.total, leave=False, disable=None, dynamic_ncols=True)
        self.sums = torch.zeros(2, device=device)   # loss x images, correct predictions
        self.logged = time.monotonic()              # when the last plain progress line was printed

    def __iter__(self):
        with self.bar:
            for number, batch in enumerate(self.bar, 1):
                yield batch
                log_due = self.bar.disable and time.monotonic() - self.logged >= LOG_EVERY
                if number % SYNC_EVERY == 0 or number == self.total or stopping() or log_due:
                    self.check(log_due and number)
                if stopping():
                    break

    def add(self, loss, logits, labels):
        self.sums += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum()])
        self.losses.append(loss.detach())
        self.seen += len(labels)

    def check(self, log_at=0):   # the losses since the last check, read back in one sync
        for number, value in enumerate(torch.stack(self.losses[self.checked:]).tolist(), self.checked + 1):
            if not math.isfinite(value):
                raise RunError(f"training diverged: the loss became {value} at {self.desc}, batch {number}. Try a "
                               "lower learning rate (--head-lr, --backbone-lr), e.g. 10x smaller; completed epochs "
                               "stay saved.")
        self.checked = len(self.losses)
        loss, correct = self.sums.tolist()
        self.bar.set_postfix(loss=f"{loss / self.seen:.3f}", acc=f"{correct / self.seen:.1%}")
        if log_at:
            print(f"  {self.desc}: batch {log_at:,} of {self.total:,}, loss {loss / self.seen:.3f}, accuracy "
                  f"{correct / self.seen:.1%}", flush=True)
            self.logged = time.monotonic()

    def result(self):
        """(mean loss, accuracy), or None when the pass was stopped before its last batch."""
        loss, correct = self.sums.tolist()
        return (loss / max(self.seen, 1), correct / max(self.seen, 1)) if len(self.losses) == self.total else None


# --- Downloads and data files: CIFAR-10, the ImageNet weights, the synthetic set of --dry-run ------------
def load_cifar10(data_dir):
    """CIFAR-10 as uint8 tensors (N, 3, 32, 32) with int64 labels, and the class names. Downloaded on the
    first run; a complete, verified copy is only read, so it may live in a read-only folder."""
    root, cifar = Path(data_dir), datasets.CIFAR10
    folder, archive = root / cifar.base_folder, root / cifar.filename
    delete = (f"\n  Delete {folder} and run again to download a fresh copy." if not folder.exists() or all(
        os.access(path, os.W_OK) for path in (folder, root)) else f"\n  {folder} may not be changed (shared or "
        "read-only): set DATA_DIR (--data-dir) to a folder of your own, and the next run downloads a fresh copy there.")
    files = cifar.train_list + cifar.test_list + [[cifar.meta["filename"], cifar.meta["md5"]]]   # name, md5
    kinds = [(root, "folder"), (folder, "folder"), (archive, "file"), *((folder / name, "file") for name, _ in files)]
    for path, kind in kinds:
        if path.exists() and path.is_dir() != (kind == "folder"):   # e.g. cifar-10-batches-py as a file
            raise RunError(f"{path} is a {'file' if kind == 'folder' else 'folder'}, where CIFAR-10 needs a {kind}: "
                           "move it away, or set DATA_DIR (--data-dir) to another folder")
    try:
        for name, md5 in files:
            if folder.exists() and not check_integrity(str(folder / name), md5):
                open(folder / name, "rb").close()   # a missing or unreadable file is named as such below
                raise RunError(f"the CIFAR-10 files in {folder} are corrupted ({name} fails its md5 check).{delete}")
        if not folder.exists():
            print(f"data: downloading CIFAR-10 into {root} (about 170 MB, once)")
            cifar(root, train=True, download=True)   # torchvision checks the archive's md5
        train, test = (cifar(root, train=split) for split in (True, False))   # download=False: only reads
    except FileNotFoundError as error:
        raise RunError(f"the CIFAR-10 files in {folder} are incomplete ({error.filename} is missing).{delete}"
                       ) from None
    except PermissionError as error:
        raise RunError(f"permission denied: cannot read or write {error.filename}. Fix its permissions, or set "
                       "DATA_DIR (--data-dir) to another folder") from None
    except (urllib.error.URLError, OSError) as error:   # no network, proxy, SSL or HTTP error; a full disk
        if archive.exists() and error.errno not in DISK_FULL and not check_integrity(str(archive), cifar.tgz_md5):
            raise RunError(f"{archive} fails its md5 check (an interrupted download?), and no fresh copy could be "
                           f"downloaded ({error}). Delete it, or replace it with a complete copy.") from None
        raise download_error("CIFAR-10", cifar.url, error, "DATA_DIR (--data-dir)", f"put {archive.name} in "
                             f"{root}, or extract it there so that {folder} holds the data_batch_* files") from None
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        if not folder.exists():   # torchvision checks a download's md5 before it extracts anything
            raise RunError(f"the download of {cifar.url} failed its md5 check (a dropped connection?); run again."
                           ) from None
        raise RunError(f"the CIFAR-10 files in {folder} cannot be read ({type(error).__name__}).{delete}") from None
    return *[(torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous(),   # NHWC -> NCHW
              torch.tensor(split.targets)) for split in (train, test)], list(train.classes)


def download_error(what, url, error, folder_setting, manual):
    """A failed download named for what it is: a full disk, a folder we may not write, or no network."""
    if isinstance(error, PermissionError):
        return RunError(f"could not download {what}: permission denied for {error.filename}. Fix its permissions, "
                        f"or set {folder_setting} to another folder")
    if error.errno in DISK_FULL:
        return RunError(f"could not download {what}: the disk is full. Free some space, or set {folder_setting} "
                        "to a folder on another disk")
    return RunError(f"could not download {what} from {url}\n  ({type(error).__name__}: {error})\n  Without internet, "
                    f"download it elsewhere and {manual}.\n  `python fine_tuning.py --dry-run` works offline.")


def synthetic_cifar10(seed):
    """CIFAR-shaped images for --dry-run: class-tinted noise, so there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    tints = torch.randint(0, 256, (NUM_CLASSES, 3, 1, 1), generator=generator)
    labels = [torch.arange(n) % NUM_CLASSES for n in SYNTHETIC_SIZES]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return *[(((tints[y] + torch.randint(0, 256, (len(y), 3, 32, 32), generator=generator)) // 2).to(torch.uint8), y)
             for y in labels], names


def pretrained_weights(model, weights):
    """Every weight but the old head's, from ImageNet's file or a given one, checked against `model`."""
    imagenet = models.ResNet18_Weights.IMAGENET1K_V1 if weights in models.ResNet18_Weights.__members__ else None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name if imagenet else Path(weights)
    print(f"model: ResNet18 with {'ImageNet weights' if imagenet else 'the weights in ' + weights}, new head")
    state = None
    try:   # the same download, cache and hash check as resnet18(weights=...), loaded with weights_only=True
        if imagenet and not path.exists():
            with contextlib.redirect_stderr(sys.stdout):   # torch < 2.6 prints "Downloading: ..." to stderr
                state = imagenet.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError) as error:   # no network, proxy, SSL or HTTP error; disk, permission
        raise download_error("the ImageNet weights", imagenet.url, error, "TORCH_HOME (an environment variable)",
                             f"put {path.name} in {path.parent}, or pass its path: --weights PATH") from None
    except RuntimeError as error:   # the download's hash does not match
        raise RunError(f"the download of {imagenet.url} failed its check ({error}); run again.") from None
    what = "the cached ImageNet weights" if imagenet else "the file"
    try:
        state = load_checkpoint(path, what) if state is None else state
        if problem := state_dict_problem(model, state):
            raise RunError(f"{what} {path} {problem}")
    except RunError as error:
        detail = str(error)[len(what) + 1:]   # the message without "the file "
        raise (RunError(f"{error}.\n  Delete that file and run again to download a fresh copy.") if imagenet else
               SettingError(f"WEIGHTS (--weights) = '{weights}' is not allowed: {detail}")) from None
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def state_dict_problem(model, state):
    """What stops `state` from being ResNet18 weights with finite values, or None."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}

    def is_state_dict(d):   # names to ordinary tensors: no sparse or meta tensor, no key that is not a name
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor) and
                                                 v.layout == torch.strided and not v.is_meta for k, v in d.items())
    if not is_state_dict(state):   # a run's last.pt or a Lightning checkpoint holds one under a key
        inside = next((key for key, v in state.items() if is_state_dict(v)), None) if isinstance(state, dict) else None
        return "is not a state dict (a dict of parameter names to ordinary tensors)" + (
            f"; it holds one under {inside!r}: save that alone, or pass a run's best.pt" if inside else "")
    if all(k.startswith("module.") for k in state):
        return ("was saved from nn.DataParallel or DistributedDataParallel (every name starts with 'module.'): "
                "save model.module.state_dict() instead, or strip that prefix from the names")
    if wrong := [k for k in expected if k not in state and "num_batches" not in k] + [
            k for k in state if k not in expected and not k.startswith("fc.")]:
        return f"is not a ResNet18 state dict (missing or unexpected: {', '.join(wrong[:3])})"
    for key in expected.keys() & state.keys():
        if state[key].shape != expected[key]:
            return f"does not fit ResNet18 ({key}: {tuple(state[key].shape)}, expected {tuple(expected[key])})"
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            return f"holds nan or inf values in {key}"


# --- Devices and precision, and the exit codes ------------------------------------------------------------
class Hardware:
    """The device and what depends on it: precision, memory layout, workers, copies, input normalisation."""

    def __init__(self, cfg):
        self.device, self.image_size, cuda = cfg.device, cfg.image_size, cfg.device.type == "cuda"
        self.amp_dtype, why = choose_precision(self.device)
        ## fp16 has a narrow range: small gradients underflow to zero unless the
        ## loss is scaled up first. bf16 has fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # NHWC lets cuDNN use tensor-core kernels for convolutions; on the CPU it measured slower.
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        # On a 2-core CPU, workers only compete with training; on CUDA the CPU is otherwise idle.
        self.num_workers = (2 if cuda else 0) if cfg.num_workers == "auto" else cfg.num_workers
        # Non-blocking copies only from pinned memory to CUDA: on MPS, from unpinned memory, they have
        # silently corrupted data in several torch releases.
        self.non_blocking = self.pin_memory = cuda
        self.generator_device = self.device if cuda else torch.device("cpu")
        torch.backends.cudnn.benchmark = cuda   # fixed input sizes: time the convolution algorithms once
        self.mean, self.std = imagenet_normalization(self.device)
        gpu = (f" ({torch.cuda.get_device_name(self.device)}, compute capability {capability(self.device)})"
               if cuda else "")
        print(f"device: {self.device}{gpu}   image size: {self.image_size}px   precision: "
              f"{str(self.amp_dtype or torch.float32).replace('torch.', '')}{f' ({why})' * bool(why)}")
        if cfg.dry_run:
            print(f"dry run: synthetic data instead of CIFAR-10, random weights (WEIGHTS = {cfg.settings['WEIGHTS']}), "
                  f"{DRY_RUN_BATCHES} batches per phase, EPOCHS = {cfg.epochs} unless --epochs is given; every other "
                  f"setting as given{cfg.dry_run_note}")

    def prepare(self, model):
        """The model on the device, in its memory layout; on a GPU its forward pass runs in mixed precision."""
        model.to(self.device, memory_format=self.memory_format)
        if self.amp_dtype is not None:   # entered only when used: torch.autocast("mps", enabled=False) can fail
            model.forward = torch.autocast(self.device.type, dtype=self.amp_dtype)(model.forward)
        return model


def capability(device):
    return ".".join(map(str, torch.cuda.get_device_capability(device)))


def choose_precision(device):
    """(autocast dtype, why) by what the GPU has: bf16 from compute capability 8.0 (A100, RTX 30xx and newer);
    fp16 with a gradient scaler on 7.x (V100, T4, RTX 20xx), whose cuDNN has no bf16 convolutions although
    torch.cuda.is_bf16_supported() says True; float32 below 7.0 (no tensor cores), on the CPU and on MPS."""
    if device.type != "cuda":
        return None, ""
    major = torch.cuda.get_device_capability(device)[0]
    if major >= 8:
        return torch.bfloat16, ""
    return (torch.float16, "bf16 needs 8.0 or newer") if major == 7 else (None, "no tensor cores below 7.0")


def cli(argv=None):
    """main() with every expected failure as a one-line message and an exit code: 0 done, 1 something
    outside the code failed (or the output was closed), 2 a bad setting, 130 stopped by Ctrl-C, 143 by SIGTERM.
    Wherever it stops, the run folder is left as promised: resumable, finished, or gone if no epoch ended."""
    global stop_requested
    stop_requested, handlers = 0, {s: signal.signal(s, on_stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    stdout = sys.stdout = Output(sys.stdout)   # output to a full disk, or closed, cannot stop the run
    try:
        return main(argv)
    except SystemExit as exit:   # argparse: --help, or a bad setting (2)
        return exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except (SettingError, RunError) as error:
        print(f"{'fine_tuning.py: ' * isinstance(error, SettingError)}error: {error}", file=sys.stderr)
        return 2 if isinstance(error, SettingError) else 1
    except KeyboardInterrupt:   # a second Ctrl-C, or one outside training: stop at once, say how to go on
        return stop_without_test()
    except BrokenPipeError:   # the reader of the output went away (`| head`): stop without a traceback
        print("error: the output was closed (by `| head`?): stopped.", file=sys.stderr)
        return 1
    except RuntimeError as error:   # torch.OutOfMemoryError on CUDA; a plain RuntimeError on MPS
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error):
            print("error: the GPU ran out of memory. Try a smaller --batch-size (e.g. 16) or --image-size (e.g. 128).",
                  file=sys.stderr)
        elif str(error).startswith("CUDA error"):   # a busy GPU, or one this build of torch does not support
            print(f"error: the GPU failed ({str(error).splitlines()[0]}).\n  To train on the CPU instead, run: "
                  "CUDA_VISIBLE_DEVICES= python fine_tuning.py ...", file=sys.stderr)
        elif str(error).startswith("DataLoader worker"):   # killed (out of memory?), as a signal to the group does
            if stop_requested:
                return stop_without_test()
            print(f"error: a DataLoader worker process died ({str(error).splitlines()[0].rstrip('. ')}), perhaps "
                  "for lack of memory. Try --num-workers 0 (or fewer workers)", file=sys.stderr)
            stop_without_test() if claimed.dir and (claimed.dir / "last.pt").exists() else None
        else:
            raise   # anything else is a bug: keep its traceback
        return 1
    finally:
        leave_run_folder()
        sys.stdout = stdout.stream
        if stdout.error:
            print(f"note: the output could not be written ({stdout.error.strerror}); the run went on", file=sys.stderr)
        for number, handler in handlers.items():
            signal.signal(number, handler)


class Output:
    """stdout that a full disk cannot stop: the first failed write is kept, later output dropped. A closed pipe
    (`| head`) still raises BrokenPipeError: its reader is gone, so the run stops."""

    def __init__(self, stream):
        self.stream, self.error = stream or open(os.devnull, "w"), None   # None: stdout was closed (`>&-`)

    def write(self, text):
        self.guard(self.stream.write, text)
        return len(text)

    def flush(self):
        self.guard(self.stream.flush)

    def guard(self, call, *args):
        try:
            return None if self.error else call(*args)
        except OSError as error:   # a full disk (`> /dev/full`), or the reader went away (`| head`)
            with contextlib.suppress(OSError, ValueError):   # now /dev/null: no later flush can fail, at exit too
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            if isinstance(error, BrokenPipeError):
                raise
            self.error = error

    def __getattr__(self, name):
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.exit(cli())
