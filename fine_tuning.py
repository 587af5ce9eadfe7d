"""Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10.

Example 2 of the transfer-learning series. README.md is the lesson; this file
is the code it walks through, in the same order:

    settings -> data -> model -> freezing -> learning rates -> training
    -> early stopping -> results

    python fine_tuning.py                        # 15 epochs (downloads CIFAR-10 and the weights)
    python fine_tuning.py --dry-run              # seconds, offline: checks your install
    python fine_tuning.py --freeze-until layer4  # override any constant below; --help lists them

Comments come in two registers: `##` lines teach, `#` lines explain the code.
`sed '/^ *## /d;/^ *##$/d' fine_tuning.py` strips the lesson and leaves the code.

Measured (README "Speed", `python tests/benchmark_speed.py`): on a 2-core CPU at the defaults
(32 px, batch 32), training ran at 790-985 images/s in three runs, 0.93-0.97 of the same model's
compute bound. CIFAR-10 accuracy with the ImageNet weights has not been measured yet; the
tutorial's author expects 85-90% test accuracy (an expectation, not a measurement).
"""

# =============================================================================
# Settings: the one place to edit. Every constant can also be set on the
# command line, named after it: EPOCHS -> --epochs 3, FREEZE_UNTIL -> --freeze-until.
# =============================================================================
# data
DATA_DIR = "./data"          # CIFAR-10 (about 170 MB) is downloaded here on the first run
SEED = 0                     # fixes the split, the new head's init, shuffling and augmentation
VAL_FRACTION = 0.1           # of the 50,000 training images: 45,000 train / 5,000 validation
IMAGE_SIZE = "auto"          # "auto": 224 on CUDA (ImageNet's size), 32 elsewhere (CIFAR's, fast)
# model
WEIGHTS = "IMAGENET1K_V1"    # ImageNet weights; "none" = from scratch; or a state-dict file
FREEZE_UNTIL = "layer2"      # last frozen block: none, stem, layer1..layer4 (layer4 = feature
                             # extraction: only the new head trains)
UNFREEZE_SCHEDULE = {}       # gradual unfreezing: {5: "layer2", 10: "layer1"} releases layer2 at
                             # the start of epoch 5, layer1 at epoch 10
# optimizer
BATCH_SIZE = 32              # images per step
EPOCHS = 15                  # at most; early stopping usually ends the run sooner
BACKBONE_LR = 1e-4           # pretrained blocks: small steps keep what ImageNet taught them
HEAD_LR = 1e-3               # the new head starts from random weights: 10x larger steps
# early stopping
MONITOR = "val_loss"         # what early stopping watches: "val_loss" or "val_acc"
PATIENCE = 3                 # epochs without improvement before training stops
MIN_DELTA = 0.001            # smallest change that counts (loss, or accuracy as a fraction)
# system
NUM_WORKERS = "auto"         # DataLoader workers: "auto" = 0 on CPU (measured fastest), 2 on CUDA
OUTPUT_DIR = "./runs"        # each run writes OUTPUT_DIR/<run name>/: checkpoints, history, results

import argparse
import csv
import io
import json
import math
import os
import pickle
import platform
import signal
import sys
import tarfile
import time
import urllib.error
from datetime import datetime
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision import datasets, models
    from torchvision.datasets.utils import check_integrity
    from tqdm import tqdm
except ImportError as missing:
    sys.exit(f"error: {missing.name or missing} is not installed. Run: pip install -r requirements.txt")
if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
    sys.exit(f"error: this script needs torch >= 2.5 (found {torch.__version__}). "
             "Run: pip install -r requirements.txt")

SETTINGS = ["DATA_DIR", "SEED", "VAL_FRACTION", "IMAGE_SIZE", "WEIGHTS", "FREEZE_UNTIL",
            "UNFREEZE_SCHEDULE", "BATCH_SIZE", "EPOCHS", "BACKBONE_LR", "HEAD_LR", "MONITOR",
            "PATIENCE", "MIN_DELTA", "NUM_WORKERS", "OUTPUT_DIR"]
BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]   # ResNet18, input to output
DRY_RUN_BATCHES = 4          # --dry-run: batches per phase (train, validation, test)
SYNC_EVERY = 25              # read the loss back from the device every N batches (see train_one_epoch)


class SettingError(Exception):
    """A bad setting. Reported in one line, exit code 2."""


class RunError(Exception):
    """Something outside the code went wrong (download, files, divergence). Exit code 1."""


# =============================================================================
# Data: CIFAR-10, a stratified validation split, augmentation on the device
# =============================================================================
## CIFAR-10 has 50,000 training and 10,000 test images of 32x32 pixels in 10
## classes. The test set is touched once, at the very end. To choose the best
## epoch and to stop early we need a third set: a validation split held out
## from the training images. "Stratified" means every class is split in the
## same proportion, so validation accuracy is not skewed by chance.

def cifar10_intact(folder):
    files = datasets.CIFAR10.train_list + datasets.CIFAR10.test_list
    files = files + [[datasets.CIFAR10.meta["filename"], datasets.CIFAR10.meta["md5"]]]
    return all(check_integrity(os.path.join(folder, name), md5) for name, md5 in files)


def download_help(what, url, error, manual):
    return (f"could not download {what} from {url}\n  ({type(error).__name__}: {error})\n"
            f"  On a machine without internet, download it elsewhere and {manual}\n"
            f"  `python fine_tuning.py --dry-run` works offline to check the rest of your setup.")


def load_cifar10(data_dir):
    """CIFAR-10 as uint8 tensors (N, 3, 32, 32) with int64 labels, plus the class names."""
    folder = Path(data_dir) / datasets.CIFAR10.base_folder
    archive = Path(data_dir) / datasets.CIFAR10.filename
    delete = " and ".join(str(p) for p in (folder, archive) if p.exists()) or str(folder)
    corrupted = (f"the CIFAR-10 files in {folder} are incomplete or corrupted (they fail torchvision's "
                 f"md5 check).\n  Delete {delete} and run again to download a fresh copy.")
    # A damaged copy is reported, not silently re-downloaded on every run.
    if folder.exists() and not cifar10_intact(folder):
        raise RunError(corrupted)
    try:
        train = datasets.CIFAR10(data_dir, train=True, download=True)
        test = datasets.CIFAR10(data_dir, train=False, download=True)
    except (urllib.error.URLError, OSError) as error:   # no network, proxy, SSL or HTTP error
        raise RunError(download_help(
            "CIFAR-10", datasets.CIFAR10.url, error,
            f"put {archive.name} in {data_dir},\n  or extract it so that {folder} holds the "
            "data_batch_* files.")) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, tarfile.TarError):
        raise RunError(corrupted) from None

    def tensors(split):
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()   # NHWC -> NCHW
        return images, torch.tensor(split.targets, dtype=torch.int64)

    return tensors(train), tensors(test), list(train.classes)


def synthetic_cifar10(seed, n_train=500, n_test=200):
    """CIFAR-shaped random images for --dry-run. Each class has its own tint, so there is something to learn."""
    generator = torch.Generator().manual_seed(seed)
    tints = torch.randint(0, 256, (10, 3, 1, 1), generator=generator).float()

    def split(n):
        labels = torch.arange(n) % 10
        noise = torch.randint(0, 256, (n, 3, 32, 32), generator=generator).float()
        return (0.5 * tints[labels] + 0.5 * noise).to(torch.uint8), labels

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return split(n_train), split(n_test), names   # CIFAR-10's class names, for realistic output


def stratified_split(labels, val_fraction, seed):
    """Indices (train, val): each class contributes round(val_fraction * its size) to validation."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(len(members) * val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def make_loaders(train_data, test_data, cfg, device):
    """Train, validation and test DataLoaders over uint8 tensors held in memory."""
    (images, labels), (test_images, test_labels) = train_data, test_data
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0 or len(train_idx) == 0:
        raise bad("VAL_FRACTION", cfg.val_fraction, f"it leaves {len(train_idx)} training and "
                  f"{len(val_idx)} validation images out of {len(labels)}; both must be non-empty")
    if cfg.batch_size > len(train_idx):
        raise bad("BATCH_SIZE", cfg.batch_size, f"the training split has only {len(train_idx)} images")
    workers = cfg.num_workers
    if workers == "auto":
        ## Measured on a 2-core CPU: workers only compete with training for the
        ## same cores, and indexing in-memory tensors costs microseconds anyway.
        ## On CUDA the CPU is otherwise idle, so two workers prepare batches ahead.
        workers = 2 if device.type == "cuda" else 0
    common = dict(num_workers=workers, pin_memory=device.type == "cuda",   # pinned: async copies
                  persistent_workers=workers > 0, worker_init_fn=ignore_ctrl_c if workers else None)
    ## The training loader shuffles with its own generator, reseeded every
    ## epoch from (SEED, epoch); workers are seeded from it too. drop_last
    ## avoids a final batch of 1, which BatchNorm cannot normalise in train mode.
    train_loader = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), cfg.batch_size,
                              shuffle=True, drop_last=True, generator=torch.Generator(), **common)
    ## No gradients are kept during evaluation, so twice the batch fits in the same memory.
    val_loader = DataLoader(TensorDataset(images[val_idx], labels[val_idx]), 2 * cfg.batch_size, **common)
    test_loader = DataLoader(TensorDataset(test_images, test_labels), 2 * cfg.batch_size, **common)
    return train_loader, val_loader, test_loader


## Augmentation: a random 32x32 crop from the image padded by 4 pixels, and a
## random horizontal flip -- the classic CIFAR recipe. We apply it to whole
## batches on the device, which is far cheaper than one PIL image at a time.
## Validation and test images are never augmented.
def random_crop_flip(images, generator, padding=4):
    n, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)                 # zero (black) border, as torchvision's RandomCrop
    # Drawn where the generator lives (on CUDA: the GPU, so no copy makes the CPU wait).
    draw = dict(generator=generator, device=generator.device)
    top = torch.randint(0, 2 * padding + 1, (n, 1), **draw).to(images.device, non_blocking=True)
    left = torch.randint(0, 2 * padding + 1, (n, 1), **draw).to(images.device, non_blocking=True)
    flip = (torch.rand(n, 1, **draw) < 0.5).to(images.device, non_blocking=True)
    rows = top + torch.arange(height, device=images.device)            # (n, height)
    cols = left + torch.arange(width, device=images.device)            # (n, width)
    cols = torch.where(flip, cols.flip(1), cols)          # a flip reads the columns right to left
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[batch, channel, rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]


class Hardware:
    """Everything that depends on the device: precision, memory layout, and model inputs."""

    def __init__(self, device, image_size, mean, std):
        self.device = device
        self.image_size = image_size
        self.amp_dtype = choose_precision(device)
        ## fp16 has a narrow range: small gradients underflow to zero unless the
        ## loss is scaled up first. bf16 has fp32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        # NHWC lets cuDNN use tensor-core kernels for convolutions; on the CPU it measured slower.
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def inputs(self, images, augment_with=None):
        """uint8 batch -> normalised float batch at image_size, on the device."""
        images = images.to(self.device, non_blocking=True)   # non-blocking: overlaps with GPU work
        if augment_with is not None:
            images = random_crop_flip(images, augment_with)
        x = (images.float() - self.mean) / self.std
        if x.shape[-1] != self.image_size:
            # Upsampling whole batches on the device: resizing 32 -> 224 in PIL would starve the GPU.
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=self.memory_format)


def choose_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def choose_precision(device):
    """Mixed precision on CUDA: bf16 where the GPU supports it, else fp16. Full fp32 elsewhere."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# =============================================================================
# Model: ResNet18 with ImageNet weights and a new 10-class head
# =============================================================================
## The pretrained network ends in a 1000-way ImageNet classifier (`fc`). We
## keep everything before it -- the feature extractor -- and replace `fc` by a
## fresh 10-way layer for CIFAR-10's classes.

def error_summary(error):
    """The informative last line of a (possibly long) exception message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()
             and not line.strip().startswith(("Check the documentation", "Please file", "Weights only load"))]
    return f"{type(error).__name__}: {lines[-1][:200] if lines else ''}"


def safe_load(path):
    """torch.load that only accepts tensors and plain containers, never code."""
    try:
        ## weights_only=True refuses pickled Python objects: unpickling an
        ## untrusted file could otherwise run arbitrary code on your machine.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RunError(f"refused to load {path}: it holds more than tensors and plain containers, and "
                       f"unpickling it fully could run code. Only use files you trust; to save weights "
                       f"yourself, save model.state_dict(), not the model. ({error_summary(error)})") from None
    except Exception as error:   # truncated, empty, or not a PyTorch file at all
        raise RunError(f"could not read {path}: not a PyTorch file, or truncated or corrupted "
                       f"({error_summary(error)})") from None


def imagenet_state_dict():
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        # The same download and cache as resnet18(weights=...), but loaded with weights_only=True,
        # which resnet18() does not ask for.
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (urllib.error.URLError, OSError) as error:   # no network, proxy, SSL or HTTP error
        if not cached.exists():
            raise RunError(download_help(
                "the ImageNet weights", weights.url, error,
                f"put {cached.name} in {cached.parent},\n  or pass its path: --weights PATH.")) from None
        problem = error
    except Exception as error:   # a truncated, corrupted or booby-trapped file, or a failed hash check
        problem = error
    if cached.exists():
        raise RunError(f"the cached weights {cached} could not be loaded safely ({error_summary(problem)}).\n"
                       f"  Delete that file and run again to download a fresh copy.")
    raise RunError(f"the download of {weights.url} failed its check ({error_summary(problem)}); run again.")


def build_model(weights, num_classes=10):
    """ResNet18 with the chosen weights and a new, randomly initialised `num_classes`-way head."""
    model = models.resnet18(weights=None)
    if weights != "none":
        if weights in models.ResNet18_Weights.__members__:
            state = imagenet_state_dict()
        else:
            try:
                state = safe_load(weights)
            except RunError as error:
                raise SettingError(f"WEIGHTS (--weights): {error}") from None
        load_backbone(model, state, weights)
    model.fc = nn.Linear(model.fc.in_features, num_classes)   # the new head
    return model


def load_backbone(model, state, source):
    """Load every weight except the old head; complain clearly if the file is not a ResNet18."""
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise bad("WEIGHTS", source, "the file is not a state dict (a dict of parameter names to tensors)")
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as error:   # a shape mismatch
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise bad("WEIGHTS", source, f"its shapes do not fit ResNet18 ({detail})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise bad("WEIGHTS", source, f"not a ResNet18 state dict (missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]})")


# =============================================================================
# Freezing: which blocks learn
# =============================================================================
## Early blocks detect generic things (edges, colours, textures) that help on
## any image, so we freeze them; later blocks combine them into ImageNet-
## specific parts, so we fine-tune them. "Frozen" takes two switches:
##   1. requires_grad=False: the optimizer never changes the weights;
##   2. eval mode for the block's BatchNorm layers: in train mode BatchNorm
##      normalises with each batch's statistics and keeps updating its running
##      averages -- so a "frozen" block would still drift. model.train() puts
##      every layer back into train mode, so set_train_mode() re-applies eval
##      mode to frozen blocks every epoch.

def block_modules(model):
    """The six blocks of ResNet18 that freezing and learning rates act on, input to output."""
    return {"stem": nn.ModuleList([model.conv1, model.bn1]), "layer1": model.layer1,
            "layer2": model.layer2, "layer3": model.layer3, "layer4": model.layer4, "fc": model.fc}


def is_trainable(block):
    return any(p.requires_grad for p in block.parameters())


def freeze(model, freeze_until):
    """Freeze every block up to and including `freeze_until` ('none' freezes nothing)."""
    if freeze_until == "none":
        return
    blocks = block_modules(model)
    for name in BLOCKS[:BLOCKS.index(freeze_until) + 1]:
        blocks[name].requires_grad_(False)


def set_train_mode(model):
    """model.train(), but frozen blocks stay in eval mode so their BatchNorm statistics never change."""
    model.train()
    for block in block_modules(model).values():
        if not is_trainable(block):
            block.eval()


# =============================================================================
# Learning rates: one parameter group per block
# =============================================================================
## Discriminative learning rates: the pretrained blocks are already good, so
## they take small steps (BACKBONE_LR) that adapt them without destroying what
## they know. The new head starts from random numbers and must move far, so it
## gets a 10x larger rate (HEAD_LR). Adam accepts a list of "parameter groups",
## each with its own lr; frozen parameters are simply not given to it.

def param_groups(model, backbone_lr, head_lr):
    return [{"name": name, "params": list(block.parameters()),
             "lr": head_lr if name == "fc" else backbone_lr}
            for name, block in block_modules(model).items() if is_trainable(block)]


def group_lrs(optimizer):
    """{block name: learning rate} of the optimizer's parameter groups."""
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def make_optimizer(groups, device):
    # fused=True runs Adam's update as one kernel: measured about 18 ms -> 5 ms per step on a 2-core CPU.
    return torch.optim.Adam(groups, fused=device.type in ("cuda", "cpu"))


## Gradual unfreezing: start with the late blocks only, then release earlier
## blocks once the head has settled, so its first large, noisy gradients never
## reach the most generic features.
def unfreeze(model, optimizer, block_name, lr):
    """Make `block_name` and any frozen block after it trainable; each joins Adam as a new group."""
    blocks = block_modules(model)
    released = []
    for name in BLOCKS[BLOCKS.index(block_name):]:
        if not is_trainable(blocks[name]):
            blocks[name].requires_grad_(True)
            optimizer.add_param_group({"name": name, "params": list(blocks[name].parameters()), "lr": lr})
            released.append(name)
    return released   # set_train_mode() now leaves their BatchNorm in train mode


# =============================================================================
# Training and evaluation
# =============================================================================
stop_requested = False   # set by the first Ctrl-C; the training loop stops after the current batch


def on_ctrl_c(signum, frame):
    global stop_requested
    stop_requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a second Ctrl-C stops at once
    print("\nCtrl-C: stopping after this batch (press Ctrl-C again to quit at once)", flush=True)


def ignore_ctrl_c(worker_id):
    # DataLoader workers share the terminal: the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Diverged(Exception):
    def __init__(self, epoch, batch):
        super().__init__(f"epoch {epoch}, batch {batch}")
        self.epoch, self.batch = epoch, batch


## One training step: forward pass, loss, clear last step's gradients,
## backward pass (gradients reach only the trainable blocks), optimizer
## update (each parameter group with its own learning rate).
def train_one_epoch(model, loader, optimizer, hw, augment_with, epoch, max_batches=None):
    """One pass over the training split. Returns (mean loss, accuracy, finished: bool)."""
    set_train_mode(model)   # frozen blocks stay in eval mode
    n_batches = min(len(loader), max_batches or len(loader))
    loss_sum = torch.zeros((), device=hw.device)
    correct = torch.zeros((), dtype=torch.int64, device=hw.device)
    seen, pending = 0, []
    bar = tqdm(total=n_batches, desc=f"epoch {epoch}", leave=False, disable=None, dynamic_ncols=True)
    for batch, (images, labels) in enumerate(islice(loader, n_batches), start=1):
        x, y = hw.inputs(images, augment_with), labels.to(hw.device, non_blocking=True)
        with hw.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        hw.scaler.scale(loss).backward()   # the scaler is a no-op unless training in fp16
        hw.scaler.step(optimizer)
        hw.scaler.update()
        # Keep the running sums on the device: .item() would make the CPU wait for the GPU.
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        pending.append(loss.detach())
        bar.update()
        if len(pending) == SYNC_EVERY or batch == n_batches or stop_requested:
            for offset, value in enumerate(torch.stack(pending).tolist()):   # one sync per window
                if not math.isfinite(value):
                    raise Diverged(epoch, batch - len(pending) + 1 + offset)
            pending.clear()
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.1%}")
        if stop_requested:
            break
    bar.close()
    return loss_sum.item() / seen, correct.item() / seen, batch == n_batches


## Evaluation puts every layer in eval mode: BatchNorm uses its running
## statistics, so a prediction never depends on the other images in the batch.
@torch.inference_mode()   # no autograd bookkeeping at all: faster than no_grad, and nothing to leak
def evaluate(model, loader, hw, num_classes=10, desc="val", max_batches=None):
    """Mean loss and the confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    n_batches = min(len(loader), max_batches or len(loader))
    loss_sum = torch.zeros((), device=hw.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=hw.device)
    for images, labels in tqdm(islice(loader, n_batches), total=n_batches, desc=desc, leave=False,
                               disable=None, dynamic_ncols=True):
        x, y = hw.inputs(images), labels.to(hw.device, non_blocking=True)
        with hw.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return loss_sum.item() / max(1, confusion.sum().item()), confusion


def accuracy(confusion):
    return confusion.trace().item() / max(1, confusion.sum().item())


# =============================================================================
# Early stopping
# =============================================================================
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

    def state_dict(self):
        return dict(best=self.best, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


# =============================================================================
# Files: every write is atomic, so an interrupted run never leaves a broken file
# =============================================================================

def write_atomic(path, write):
    """Write into path.tmp, then rename it over `path`: readers see the old or the new file, never half."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_torch(obj, path):
    write_atomic(path, lambda file: torch.save(obj, file))


def save_text(text, path):
    write_atomic(path, lambda file: file.write(text.encode()))


def save_json(obj, path):
    save_text(json.dumps(obj, indent=2) + "\n", path)


def csv_text(rows, columns):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


HISTORY_COLUMNS = (["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
                   + [f"lr_{name}" for name in BLOCKS] + ["trainable", "seconds"])


def save_history(history, run_dir):
    save_text(csv_text(history, HISTORY_COLUMNS), Path(run_dir) / "history.csv")


SUMMARY_COLUMNS = ["run", "freeze_until", "backbone_lr", "head_lr", "image_size", "weights",
                   "unfreeze_schedule", "best_val_acc", "test_acc", "epochs", "minutes"]


# =============================================================================
# Results: per-class accuracy, confusion matrix, curves, comparison with earlier runs
# =============================================================================

def print_report(confusion, classes):
    """Test accuracy per class, the confusion matrix and the most confused pairs, in 80 columns."""
    totals = confusion.sum(1)
    print(f"\n{'class':<12}{'accuracy':>9}{'correct':>10}{'images':>8}")
    for c, (name, acc) in enumerate(per_class_accuracy(confusion, classes).items()):
        shown = "n/a" if acc is None else f"{acc:.1%}"   # n/a: no test image of this class
        print(f"{name[:12]:<12}{shown:>9}{confusion[c, c].item():>10}{totals[c].item():>8}")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    print(" " * 11 + "".join(f"{name[:5]:>6}" for name in classes))
    for c, name in enumerate(classes):
        print(f"{name[:10]:<11}" + "".join(f"{v:>6}" for v in confusion[c].tolist()))
    errors = [(confusion[t, p].item(), t, p) for t in range(len(classes))
              for p in range(len(classes)) if t != p and confusion[t, p] > 0]
    if errors:
        print("most confused: " + ", ".join(f"{classes[t]} -> {classes[p]}: {n}"
                                            for n, t, p in sorted(errors, reverse=True)[:3]))


def per_class_accuracy(confusion, classes):
    totals = confusion.sum(1)
    return {name: (confusion[c, c].item() / totals[c].item() if totals[c] else None)
            for c, name in enumerate(classes)}


def plot_curves(history, best_epoch, events, path):
    """Loss and accuracy per epoch, best epoch and unfreezing marked. Needs matplotlib (optional)."""
    try:
        from matplotlib.figure import Figure   # no pyplot: works without a display
    except ImportError:
        print("(curves.png skipped: matplotlib is not installed -- `pip install matplotlib` to get it)")
        return None
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axis, metric, label in zip(figure.subplots(1, 2), ["loss", "acc"], ["loss", "accuracy"]):
        axis.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="validation")
        if best_epoch:
            axis.axvline(best_epoch, color="green", linestyle="--", label=f"best (epoch {best_epoch})")
        for epoch, block in events.items():
            axis.axvline(epoch, color="gray", linestyle=":", label=f"unfreeze {block}")
        axis.set(xlabel="epoch", ylabel=label, title=label)
        axis.legend()
    figure.suptitle(f"run {Path(path).parent.name}")
    figure.savefig(path, dpi=100)
    return path


def update_summary(output_dir, row):
    """Add this run to OUTPUT_DIR/summary.csv (rewritten atomically) and return all rows."""
    path = Path(output_dir) / "summary.csv"
    rows = []
    if path.exists():
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    rows.append(row)
    save_text(csv_text(rows, SUMMARY_COLUMNS), path)
    return rows


def print_comparison(rows, limit=8):
    print(f"\nruns so far (last {min(limit, len(rows))} of {len(rows)}, from summary.csv):")
    print(f"{'run':<22}{'freeze':>7}{'bb lr':>7}{'head lr':>8}{'weights':>9}{'val acc':>8}"
          f"{'test acc':>9}{'ep':>4}{'min':>6}")
    for row in rows[-limit:]:
        print(f"{row['run'][:21]:<22}{row['freeze_until']:>7}{float(row['backbone_lr']):>7.0e}"
              f"{float(row['head_lr']):>8.0e}{row['weights'][:8]:>9}{float(row['best_val_acc']):>8.1%}"
              f"{float(row['test_acc']):>9.1%}{row['epochs']:>4}{float(row['minutes']):>6.1f}")


# =============================================================================
# Command line and settings checks: every mistake gets a one-line error
# =============================================================================
HELP = {
    "DATA_DIR": "folder that holds (or receives) cifar-10-batches-py",
    "SEED": "random seed for the split, the head's init, shuffling and augmentation",
    "VAL_FRACTION": "fraction of the training images held out for validation, in (0, 1)",
    "IMAGE_SIZE": "'auto' (224 on CUDA, 32 elsewhere) or a size in pixels from 32 to 512",
    "WEIGHTS": "IMAGENET1K_V1, none (random init), or a path to a ResNet18 state dict",
    "FREEZE_UNTIL": "last frozen block: none, stem, layer1, layer2, layer3, layer4",
    "UNFREEZE_SCHEDULE": "gradual unfreezing as EPOCH:BLOCK,... e.g. '5:layer2,10:layer1'",
    "BATCH_SIZE": "training batch size",
    "EPOCHS": "maximum number of epochs",
    "BACKBONE_LR": "learning rate of the pretrained blocks being fine-tuned",
    "HEAD_LR": "learning rate of the new classifier head",
    "MONITOR": "what early stopping watches: val_loss or val_acc",
    "PATIENCE": "epochs without improvement before stopping",
    "MIN_DELTA": "smallest change that counts as an improvement",
    "NUM_WORKERS": "DataLoader worker processes, or 'auto'",
    "OUTPUT_DIR": "where run folders are written",
}


def flag(name):
    return "--" + name.lower().replace("_", "-")


def parse_args(argv=None):
    """Command-line options, one per constant. Returns (options, overrides given)."""
    parser = argparse.ArgumentParser(
        prog="fine_tuning.py", description="Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10. "
                    "Every option overrides the constant of the same name at the top of the file.")
    for name in SETTINGS:
        default = globals()[name]
        shown = schedule_text(default) if name == "UNFREEZE_SCHEDULE" else default
        # SUPPRESS: an option not given stays out of the result, so we know what was overridden.
        parser.add_argument(flag(name), dest=name, metavar=name, default=argparse.SUPPRESS,
                            help=f"{HELP[name]} (default: {shown})")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the install offline in seconds: synthetic data, random "
                             f"weights, 2 epochs of {DRY_RUN_BATCHES} batches per phase")
    parser.add_argument("--run-name", help="name of the run folder (default: time and key settings)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last completed epoch")
    options = parser.parse_args(argv)
    overrides = {name: getattr(options, name) for name in SETTINGS if hasattr(options, name)}
    return options, overrides


def given_flags(options, overrides):
    """The options typed on the command line besides --resume, as flags."""
    return [flag(name) for name in overrides] + [
        f for f, given in [("--dry-run", options.dry_run), ("--run-name", options.run_name)] if given]


def bad(name, value, allowed):
    return SettingError(f"{name} ({flag(name)}) = {value!r} is not allowed: {allowed}")


def as_int(name, value, minimum, alternative="", why="", maximum=None):
    allowed = f"expected {alternative}a whole number >= {minimum}{why}"
    if maximum is not None:
        allowed = f"expected {alternative}a whole number from {minimum} to {maximum}{why}"
    try:
        number = int(str(value).strip())
    except ValueError:
        raise bad(name, value, allowed) from None
    if number < minimum or (maximum is not None and number > maximum):
        raise bad(name, value, allowed)
    return number


def as_float(name, value, allowed, ok):
    try:
        number = float(str(value).strip())
    except ValueError:
        raise bad(name, value, allowed) from None
    if not (math.isfinite(number) and ok(number)):
        raise bad(name, value, allowed)
    return number


def as_choice(name, value, choices):
    if str(value).strip().lower() not in choices:
        raise bad(name, value, "choose one of " + ", ".join(choices))
    return str(value).strip().lower()


def as_folder(name, value):
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise bad(name, str(value), "it is a file; give a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise bad(name, str(value), f"{existing} is not writable; choose a folder you can write to")
    return str(path)


def as_weights(value):
    text = str(value).strip()
    if text.lower() == "none":
        return "none"
    if text.upper() in models.ResNet18_Weights.__members__:   # IMAGENET1K_V1, or its alias DEFAULT
        return models.ResNet18_Weights[text.upper()].name
    path = Path(text).expanduser()
    if path.is_file():
        return str(path)
    if path.exists():
        raise bad("WEIGHTS", text, "it is not a regular file; give a state-dict file")
    if os.sep in text or "/" in text or path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise bad("WEIGHTS", text, "no such file")
    raise bad("WEIGHTS", text, "use IMAGENET1K_V1, none, or the path of a ResNet18 state-dict file")


def schedule_text(schedule):
    return ",".join(f"{epoch}:{block}" for epoch, block in sorted(schedule.items())) or "none"


def as_schedule(value, freeze_until, epochs):
    """'5:layer2,10:layer1' or {5: 'layer2'} -> {5: 'layer2', 10: 'layer1'}, checked."""
    name = "UNFREEZE_SCHEDULE"
    if isinstance(value, dict):
        items = list(value.items())
    else:
        text = "".join(c for c in str(value) if c not in "{}'\" ")   # also accepts {5: "layer2"}
        items = [] if text.lower() in ("", "none") else [
            part.split(":", 1) if ":" in part else (part, "") for part in text.split(",")]
    schedule = {}
    for epoch, block in items:
        try:
            epoch = int(str(epoch).strip())
        except ValueError:
            raise bad(name, value, "write EPOCH:BLOCK pairs, e.g. 5:layer2,10:layer1") from None
        block = str(block).strip().lower()
        if not 1 <= epoch <= epochs:
            raise bad(name, value, f"epoch {epoch} is outside 1..{epochs} (EPOCHS)")
        if block not in BLOCKS[:-1]:
            raise bad(name, value, f"unknown block {block!r}; blocks are {', '.join(BLOCKS[:-1])}")
        if epoch in schedule:
            raise bad(name, value, f"epoch {epoch} appears twice")
        schedule[epoch] = block
    frozen = BLOCKS[:BLOCKS.index(freeze_until) + 1] if freeze_until != "none" else []
    for epoch, block in sorted(schedule.items()):
        if block not in frozen:
            raise bad(name, value, f"{block} is already trainable at epoch {epoch} "
                                   f"(FREEZE_UNTIL={freeze_until}); name a block that is still frozen")
        frozen = frozen[:frozen.index(block)]   # that block and every block after it now train
    return schedule


def check_settings(raw):
    """Turn raw settings (constants or command-line text) into checked values, or raise SettingError."""
    epochs = as_int("EPOCHS", raw["EPOCHS"], 1)
    freeze_until = as_choice("FREEZE_UNTIL", raw["FREEZE_UNTIL"], ["none"] + BLOCKS[:-1])
    image_size = str(raw["IMAGE_SIZE"]).strip().lower()
    workers = str(raw["NUM_WORKERS"]).strip().lower()
    return dict(
        DATA_DIR=as_folder("DATA_DIR", raw["DATA_DIR"]),
        SEED=as_int("SEED", raw["SEED"], 0, maximum=2**32 - 1),
        VAL_FRACTION=as_float("VAL_FRACTION", raw["VAL_FRACTION"],
                              "expected a number strictly between 0 and 1, e.g. 0.1", lambda x: 0 < x < 1),
        IMAGE_SIZE="auto" if image_size == "auto" else as_int(
            "IMAGE_SIZE", image_size, 32, "auto or ", maximum=512,
            why=" (CIFAR's images have 32 pixels; ImageNet features expect about 224)"),
        WEIGHTS=as_weights(raw["WEIGHTS"]),
        FREEZE_UNTIL=freeze_until,
        UNFREEZE_SCHEDULE=as_schedule(raw["UNFREEZE_SCHEDULE"], freeze_until, epochs),
        BATCH_SIZE=as_int("BATCH_SIZE", raw["BATCH_SIZE"], 2,
                          why=" (BatchNorm in train mode needs 2 or more images to normalise over)"),
        EPOCHS=epochs,
        BACKBONE_LR=as_float("BACKBONE_LR", raw["BACKBONE_LR"],
                             "expected a positive number, e.g. 1e-4", lambda x: x > 0),
        HEAD_LR=as_float("HEAD_LR", raw["HEAD_LR"], "expected a positive number, e.g. 1e-3", lambda x: x > 0),
        MONITOR=as_choice("MONITOR", raw["MONITOR"], ["val_loss", "val_acc"]),
        PATIENCE=as_int("PATIENCE", raw["PATIENCE"], 0),
        MIN_DELTA=as_float("MIN_DELTA", raw["MIN_DELTA"], "expected a number >= 0", lambda x: x >= 0),
        NUM_WORKERS="auto" if workers == "auto" else as_int("NUM_WORKERS", workers, 0, "auto or "),
        OUTPUT_DIR=as_folder("OUTPUT_DIR", raw["OUTPUT_DIR"]),
    )


# =============================================================================
# The run: set up, train with early stopping, test, report
# =============================================================================

def print_blocks(model, optimizer):
    lrs = group_lrs(optimizer)
    print(f"\n{'block':<8}{'status':<11}{'parameters':>12}{'lr':>9}")
    counts = {"trainable": 0, "frozen": 0}
    for name, block in block_modules(model).items():
        count = sum(p.numel() for p in block.parameters())
        status = "trainable" if is_trainable(block) else "frozen"
        counts[status] += count
        lr = f"{lrs[name]:.0e}" if name in lrs else "-"
        print(f"{name:<8}{status:<11}{count:>12,}{lr:>9}")
    print(f"trainable parameters: {counts['trainable']:,}   frozen: {counts['frozen']:,}\n")


def epoch_seed(seed, epoch, stream):
    # Independent, reproducible seeds for each (seed, epoch, purpose): a resumed run replays them exactly.
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def new_run_dir(cfg, run_name, dry_run):
    """OUTPUT_DIR/<run name>, checked before anything is downloaded; created later."""
    if run_name is None:
        stamp = datetime.now().strftime("%m%d-%H%M%S")
        if dry_run:
            run_name = f"{stamp}_dry-run"
        else:   # e.g. 1128-093012_layer2_1e-04_1e-03_32px
            extras = {"none": "_scratch", "IMAGENET1K_V1": ""}.get(cfg.weights, "_file")
            extras += "_gradual" if cfg.unfreeze_schedule else ""
            run_name = (f"{stamp}_{cfg.freeze_until}_{cfg.backbone_lr:.0e}_{cfg.head_lr:.0e}_"
                        f"{cfg.image_size}px{extras}")
    if not run_name or Path(run_name).name != run_name or run_name in (".", ".."):
        raise SettingError(f"--run-name {run_name!r} is not allowed: use a plain folder name")
    run_dir = Path(cfg.output_dir) / run_name
    if run_dir.exists():
        raise SettingError(f"--run-name: {run_dir} already exists; choose another name, "
                           f"or continue it with --resume {run_dir}")
    return run_dir


def load_resume(run_dir, overrides):
    """Settings and state of an interrupted run."""
    run_dir = Path(run_dir)
    if overrides:
        raise SettingError(f"--resume continues a run with its saved settings; drop "
                           f"{', '.join(overrides)} or start a new run")
    try:
        config = json.loads((run_dir / "config.json").read_text())
        # "auto" became a size on the first run's machine; keep it, wherever we resume.
        settings = {**config["settings"], "IMAGE_SIZE": config["image_size_used"]}
        dry_run = config["dry_run"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SettingError(f"--resume {run_dir}: no readable config.json there; "
                           "give a run folder made by this script") from None
    if not (run_dir / "last.pt").is_file():
        raise SettingError(f"--resume {run_dir}: no completed epoch to resume from (no last.pt); "
                           "start a new run")
    return settings, dry_run, safe_load(run_dir / "last.pt")


def write_config(run_dir, settings, cfg, dry_run, hw):
    schedule = {str(epoch): block for epoch, block in cfg.unfreeze_schedule.items()}   # JSON keys are text
    save_json({"run": run_dir.name, "dry_run": dry_run, "settings": {**settings, "UNFREEZE_SCHEDULE": schedule},
               "image_size_used": cfg.image_size, "device": str(hw.device),
               "precision": str(hw.amp_dtype or torch.float32), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "python": platform.python_version(),
               "started": datetime.now().isoformat(timespec="seconds")}, run_dir / "config.json")


def restore(state, model, optimizer, hw, stopper, cfg):
    """Put an interrupted run back as it was after its last completed epoch. Returns (history, next epoch)."""
    for epoch, block in sorted(cfg.unfreeze_schedule.items()):
        if epoch <= state["epoch"]:
            unfreeze(model, optimizer, block, cfg.backbone_lr)   # the same parameter groups, same order
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    hw.scaler.load_state_dict(state["scaler"])
    stopper.load_state_dict(state["early_stopping"])
    torch.set_rng_state(state["torch_rng"])
    return state["history"], state["epoch"] + 1


def main(argv=None):
    options, overrides = parse_args(argv)
    try:
        return run(options, overrides)
    except SettingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:   # torch.OutOfMemoryError on CUDA; a plain RuntimeError on MPS
        if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)):
            raise   # anything else is a bug: show its traceback
        print("error: the GPU ran out of memory. Try a smaller --batch-size (e.g. 16) "
              "or --image-size (e.g. 128).", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted.", file=sys.stderr)
        return 130
    except OSError as error:   # e.g. the disk is full
        print(f"error: {error}", file=sys.stderr)
        return 1


def run(options, overrides):
    global stop_requested
    started = time.time()
    stop_requested = False

    # --- settings ------------------------------------------------------------
    resumed = None
    if options.resume:
        raw, dry_run, resumed = load_resume(options.resume, given_flags(options, overrides))
        run_dir = Path(options.resume)
    else:
        raw, dry_run = {**{name: globals()[name] for name in SETTINGS}, **overrides}, options.dry_run
    settings = check_settings(raw)
    if dry_run:
        settings.update(EPOCHS=2, WEIGHTS="none", UNFREEZE_SCHEDULE={})
    cfg = SimpleNamespace(**{name.lower(): value for name, value in settings.items()})
    device = choose_device()
    # Fixed input sizes: cuDNN may time its convolution algorithms once and keep the fastest.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    if cfg.image_size == "auto":
        cfg.image_size = 224 if device.type == "cuda" else 32
    max_batches = DRY_RUN_BATCHES if dry_run else None
    if not resumed:
        run_dir = new_run_dir(cfg, options.run_name, dry_run)
    ## Normalise inputs the way the pretrained weights saw ImageNet during
    ## their training. For --weights none we keep the same numbers, so a
    ## comparison changes one thing only.
    preset = models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    hw = Hardware(device, cfg.image_size, preset.mean, preset.std)
    print(f"device: {device}   image size: {cfg.image_size}px   precision: "
          f"{str(hw.amp_dtype or torch.float32).replace('torch.', '')}"
          f"{'   (dry run: synthetic data, random weights)' if dry_run else ''}")

    # --- model (the weights file is checked before any data is downloaded) ---
    print(f"model: ResNet18, weights {cfg.weights}, new 10-class head")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.weights)

    # --- data ----------------------------------------------------------------
    if not dry_run:
        print(f"data: CIFAR-10 in {cfg.data_dir} (downloaded on the first run, about 170 MB)")
    train_data, test_data, classes = (synthetic_cifar10(cfg.seed) if dry_run
                                      else load_cifar10(cfg.data_dir))
    train_loader, val_loader, test_loader = make_loaders(train_data, test_data, cfg, device)
    print(f"data: {len(train_loader.dataset):,} train / {len(val_loader.dataset):,} validation / "
          f"{len(test_loader.dataset):,} test images, {len(classes)} classes")

    # --- freezing and learning rates -----------------------------------------
    freeze(model, cfg.freeze_until)
    model.to(device, memory_format=hw.memory_format)
    optimizer = make_optimizer(param_groups(model, cfg.backbone_lr, cfg.head_lr), device)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, "min" if cfg.monitor == "val_loss" else "max")
    history, start_epoch = [], 1

    # --- the run folder, or the state of the run we resume -------------------
    if resumed:
        try:
            history, start_epoch = restore(resumed, model, optimizer, hw, stopper, cfg)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise RunError(f"{run_dir / 'last.pt'} does not fit the settings in {run_dir / 'config.json'} "
                           f"(were they edited?): {error_summary(error)}") from None
        started -= sum(row["seconds"] for row in history)   # count the epochs already run
        if start_epoch > cfg.epochs or stopper.should_stop:
            results = run_dir / "results.json"
            print(f"{run_dir} has already finished training ({len(history)} epochs): nothing to resume."
                  + (f" Its results are in {results}." if results.exists() else ""))
            return 0
        print(f"resuming {run_dir} after epoch {start_epoch - 1}")
    else:
        run_dir.mkdir(parents=True)
        write_config(run_dir, settings, cfg, dry_run, hw)
        save_history(history, run_dir)   # header only; fit() rewrites it after every epoch
    print_blocks(model, optimizer)

    # --- train with early stopping -------------------------------------------
    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        reason = fit(model, optimizer, hw, train_loader, val_loader, cfg, stopper, history,
                     start_epoch, run_dir, max_batches)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    print(f"\nstopped: {reason}")
    resume_hint = f"resume with: python fine_tuning.py --resume {run_dir}"
    if stopper.best_epoch is None:   # interrupted during the first epoch
        print("no epoch was completed: there is nothing to test or to resume; start the run again.")
        return 130

    # --- test the best epoch's weights ---------------------------------------
    ## The test set is used once, on the weights that early stopping chose on
    ## the validation split. Choosing anything by test accuracy would make it a
    ## second validation set, and the reported figure optimistic.
    try:
        model.load_state_dict(safe_load(run_dir / "best.pt"))
        print(f"restored the weights of epoch {stopper.best_epoch} (best {cfg.monitor}) from "
              f"{run_dir / 'best.pt'}")
        test_loss, confusion = evaluate(model, test_loader, hw, len(classes), "test", max_batches)
    except KeyboardInterrupt:
        print(f"\ntest evaluation skipped.\n{resume_hint}")
        return 130
    finish(cfg, run_dir, history, stopper, classes, test_loss, confusion, reason, started, dry_run)
    if reason == "interrupted":
        print(resume_hint)
        return 130
    return 0


def fit(model, optimizer, hw, train_loader, val_loader, cfg, stopper, history, start_epoch,
        run_dir, max_batches):
    """The epoch loop: unfreeze on schedule, train, validate, checkpoint, stop early. Returns why it ended."""
    augment_with = torch.Generator(hw.device if hw.device.type == "cuda" else "cpu")
    print(f"{'epoch':>5}{'train loss':>12}{'train acc':>11}{'val loss':>10}{'val acc':>9}{'time':>8}")
    for epoch in range(start_epoch, cfg.epochs + 1):
        if epoch in cfg.unfreeze_schedule:
            released = unfreeze(model, optimizer, cfg.unfreeze_schedule[epoch], cfg.backbone_lr)
            print(f"epoch {epoch}: unfreezing {', '.join(released)} (lr {cfg.backbone_lr:.0e})")
        train_loader.generator.manual_seed(epoch_seed(cfg.seed, epoch, 0))
        augment_with.manual_seed(epoch_seed(cfg.seed, epoch, 1))
        started = time.perf_counter()
        try:
            train_loss, train_acc, finished = train_one_epoch(
                model, train_loader, optimizer, hw, augment_with, epoch, max_batches)
        except Diverged as where:   # history.csv already holds every completed epoch
            kept = (f"The best checkpoint so far (epoch {stopper.best_epoch}) is kept in "
                    f"{run_dir / 'best.pt'}." if stopper.best_epoch else "")
            raise RunError(f"training diverged: the loss became nan or inf at {where}. Try a lower "
                           f"learning rate (--head-lr, --backbone-lr), e.g. 10x smaller. {kept}") from None
        if not finished:
            return "interrupted"
        val_loss, confusion = evaluate(model, val_loader, hw, desc="val", max_batches=max_batches)
        val_acc = accuracy(confusion)
        improved = stopper.step(val_loss if cfg.monitor == "val_loss" else val_acc, epoch)
        if improved:
            save_torch(model.state_dict(), run_dir / "best.pt")
        lrs = group_lrs(optimizer)
        history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                            val_acc=val_acc, **{f"lr_{name}": lr for name, lr in lrs.items()},
                            trainable=" ".join(lrs), seconds=round(time.perf_counter() - started, 2)))
        # Everything needed to continue exactly from here (see --resume).
        save_torch(dict(epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scaler=hw.scaler.state_dict(), early_stopping=stopper.state_dict(),
                        history=history, torch_rng=torch.get_rng_state()), run_dir / "last.pt")
        save_history(history, run_dir)
        print(f"{epoch:>5}{train_loss:>12.4f}{train_acc:>11.2%}{val_loss:>10.4f}{val_acc:>9.2%}"
              f"{history[-1]['seconds']:>7.1f}s{'  * best' if improved else ''}", flush=True)
        if stop_requested:
            return "interrupted"
        if stopper.should_stop:
            return (f"early stopping: {cfg.monitor} did not improve on epoch {stopper.best_epoch} "
                    f"by at least {cfg.min_delta:g} for {stopper.bad_epochs} epoch(s) "
                    f"(PATIENCE = {cfg.patience})")
    return f"all epochs ran (EPOCHS = {cfg.epochs})"


def finish(cfg, run_dir, history, stopper, classes, test_loss, confusion, reason, started, dry_run):
    """Print and save the test results, the curves and the comparison with earlier runs."""
    test_acc = accuracy(confusion)
    best = next(row for row in history if row["epoch"] == stopper.best_epoch)
    minutes = (time.time() - started) / 60
    print(f"\ntest loss {test_loss:.4f}   test accuracy {test_acc:.2%}   "
          f"(best epoch {stopper.best_epoch}: val acc {best['val_acc']:.2%})")
    print_report(confusion, classes)
    save_json(dict(test_loss=test_loss, test_acc=test_acc,
                   per_class_acc=per_class_accuracy(confusion, classes), classes=classes,
                   confusion_matrix=confusion.tolist(), best_epoch=stopper.best_epoch,
                   best_val_acc=best["val_acc"], epochs_run=history[-1]["epoch"],
                   stop_reason=reason, wall_time_s=round(minutes * 60, 1)), run_dir / "results.json")
    curves = plot_curves(history, stopper.best_epoch, cfg.unfreeze_schedule, run_dir / "curves.png")
    if dry_run or reason == "interrupted":
        print(f"\n({'dry run' if dry_run else 'interrupted run'}: not added to summary.csv)")
    else:
        weights = cfg.weights if cfg.weights in ("none", "IMAGENET1K_V1") else Path(cfg.weights).name
        rows = update_summary(cfg.output_dir, dict(
            run=run_dir.name, freeze_until=cfg.freeze_until, backbone_lr=cfg.backbone_lr,
            head_lr=cfg.head_lr, image_size=cfg.image_size, weights=weights,
            unfreeze_schedule=schedule_text(cfg.unfreeze_schedule), best_val_acc=round(best["val_acc"], 4),
            test_acc=round(test_acc, 4), epochs=history[-1]["epoch"], minutes=round(minutes, 2)))
        print_comparison(rows)
    print(f"\nfiles in {run_dir}: config.json history.csv best.pt last.pt results.json"
          f"{' curves.png' if curves else ''}")


if __name__ == "__main__":
    sys.exit(main())
