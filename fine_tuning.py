"""Fine-tune an ImageNet-pretrained ResNet18 on CIFAR-10, or on a folder of your own images
(Example 2 of a transfer-learning series).

Read it from the top, beside README.md, down to the banner "The lesson ends here": the settings,
the data, the model and its new head, freezing, learning rates, precision and the training step,
evaluation, early stopping, and main(), the story of a run. Below the banner is plumbing.

    python fine_tuning.py --dry-run              # offline check in seconds: synthetic data
    python fine_tuning.py                        # the real run: downloads CIFAR-10 and the weights
    python fine_tuning.py --dataset my_photos    # your own images: a subfolder of images per class
    python fine_tuning.py --freeze-until layer4  # any constant below as a flag; --help lists them

`##` comments teach, `#` comments explain the code: `sed '/^ *##/d' fine_tuning.py` keeps the code.
"""

# === Settings: the one place to edit. Each is also a flag: EPOCHS -> --epochs 3 ===================
# data
DATASET = "CIFAR10"  # or a folder of your images, a subfolder per class (README): r"C:\photos"
DATA_DIR = "./data"  # CIFAR-10 (about 170 MB) is downloaded here on the first run
SEED = 0  # fixes the new head's first weights, the shuffle and the augmentation (not the split)
VAL_FRACTION = 0.1  # of each class's training images: CIFAR-10's 50,000 -> 45,000 + 5,000
TRAIN_PER_CLASS = "all"  # "all", or keep N training images per class: try 100 (little data)
IMAGE_SIZE = "auto"  # pixels the model sees: "auto" = 224 on CUDA, else the images' own, <= 224
# model
WEIGHTS = "IMAGENET1K_V1"  # ImageNet's; "none": random (from scratch); or a ResNet18 weights file
FREEZE_UNTIL = "layer2"  # last frozen block: none, stem, layer1..layer4 (layer4: head only)
UNFREEZE_SCHEDULE = {}  # gradual unfreezing: {5: "layer2"} releases layer2 at the start of epoch 5
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
MIN_DELTA = 0.001  # an improvement must be larger than this (loss, or accuracy as a fraction)
# system
NUM_WORKERS = "auto"  # DataLoader processes: "auto" = 2 on CUDA (0 pasted in a cell), 0 elsewhere
OUTPUT_DIR = "./runs"  # each run writes OUTPUT_DIR/<run name>/; finished runs add to summary.csv

import argparse
import collections
import csv
import difflib
import errno
import functools
import importlib.metadata
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

if sys.version_info < (3, 10):  # a Mac's own python3 is 3.9: said before torch is installed for it
    python = ".".join(str(part) for part in sys.version_info[:3])
    sys.exit(f"error: this script needs Python 3.10 or newer, not {python} ({sys.executable})")

try:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset
    from torchvision import datasets, models
    from torchvision.transforms import v2
    from tqdm import tqdm
except ImportError as missing:
    sys.exit(f"error: {missing.name} is not installed. Run: pip install -r requirements.txt")
except RuntimeError as mismatch:
    # "operator torchvision::nms does not exist": this torchvision was built for another torch
    versions = {name: importlib.metadata.version(name) for name in ("torch", "torchvision")}
    install = "pip install --upgrade torch torchvision"
    if not torch.cuda.is_available():
        install += " --index-url https://download.pytorch.org/whl/cpu"  # the CPU-only builds
    sys.exit(
        f"error: torchvision {versions['torchvision']} does not match torch {versions['torch']}"
        f" ({mismatch}). Install them together: {install}"
    )

BLOCKS = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]  # ResNet18's, input to output
IMAGENET = models.ResNet18_Weights.IMAGENET1K_V1


# === 1. Data: CIFAR-10 or your images, a validation split, augmentation ===========================
## CIFAR-10 has 50,000 training and 10,000 test images of 32x32 pixels in 10 classes; your own
## images come as a folder with a subfolder per class. Either way the images stay in memory as one
## uint8 tensor (N, 3, height, width): the DataLoader only indexes it, with no file to read and no
## PIL image per sample, and the pixels become floats on the device, a batch at a time.
def load_cifar10(data_dir):
    """CIFAR-10's training and test sets as TensorDatasets of uint8 images, and the class names."""
    ## torchvision downloads CIFAR-10 once, checks its md5 sums, and from then on only reads it.
    train = datasets.CIFAR10(data_dir, train=True, download=True)
    test = datasets.CIFAR10(data_dir, train=False, download=True)
    sets = []
    for split in (train, test):
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        sets.append(TensorDataset(images, torch.tensor(split.targets)))
    return sets[0], sets[1], train.classes


def load_image_folder(folder, size):
    """The images of a folder of class folders (folder/cat/1.jpg, folder/dog/2.png, ...) as a
    TensorDataset of uint8 images (N, 3, size, size), and the class names."""
    ## Photos come in every size: each is opened as RGB (grayscale and RGBA too), its shorter side
    ## resized to `size` and its centre cropped to a square, so that they stack into one tensor.
    to_tensor = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    ## A big JPEG is decoded at 1/2, 1/4 or 1/8 scale if that still covers `size`: 4x faster.
    loader = functools.partial(open_rgb, size=size)
    ## torchvision's ImageFolder takes each subfolder for a class, in sorted order (the label is
    ## the index), and in it the files is_image_file() accepts: an image's extension, not hidden.
    ## Ours, below the banner, skips hidden folders too (Jupyter's .ipynb_checkpoints).
    found = ImageFolder(folder, transform=to_tensor, loader=loader, is_valid_file=is_image_file)
    images = torch.empty(len(found), 3, size, size, dtype=torch.uint8)
    for i, (image, _) in enumerate(progress_bar(found, f"reading {folder}")):
        images[i] = image
    return TensorDataset(images, torch.tensor(found.targets)), found.classes


## The test set is used once, at the very end. To choose the best epoch and to stop early we hold
## out a validation split from the training images: the same share of every class ("stratified"),
## and the same images in every run, whatever its SEED, so that runs are compared on one set.
def stratified_split(labels, fraction, train_per_class="all"):
    """Indices (kept, held_out): each class gives round(fraction x its size) images to held_out,
    and the rest, or a random `train_per_class` of them, to kept."""
    generator = torch.Generator().manual_seed(0)  # not SEED: one split for every run
    kept_parts, held_out_parts = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_held_out = round(len(members) * fraction)
        held_out_parts.append(members[:n_held_out])
        if train_per_class == "all":
            kept_parts.append(members[n_held_out:])
        else:
            kept_parts.append(members[n_held_out : n_held_out + train_per_class])
    return torch.cat(kept_parts).sort().values, torch.cat(held_out_parts).sort().values


def split_off(dataset, fraction, train_per_class="all"):
    """(kept, held_out) TensorDatasets, by stratified_split()."""
    images, labels = dataset.tensors
    kept, held_out = stratified_split(labels, fraction, train_per_class)
    kept_set = TensorDataset(images[kept], labels[kept])
    return kept_set, TensorDataset(images[held_out], labels[held_out])


def make_loaders(train_set, val_set, test_set, batch_size, num_workers, seed):
    """The three DataLoaders. The training loader shuffles with a generator of its own, seeded
    with `seed`: last.pt saves its state, so a resumed run draws what an unbroken one would."""
    options = dict(
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),  # page-locked memory: copies to the GPU run alongside
    )
    sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    ## drop_last drops the last, smaller batch (45,000 = 1,406 x 32 + 8): every step has the same
    ## size, and no batch can be a single image, which BatchNorm cannot normalise in train mode.
    train_loader = DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, **options)
    ## Evaluation keeps no gradients, so twice the batch fits in the same memory.
    val_loader = DataLoader(val_set, 2 * batch_size, **options)
    test_loader = DataLoader(test_set, 2 * batch_size, **options)
    return train_loader, val_loader, test_loader


## Augmentation shows the model a slightly different version of each training image every epoch,
## so that it learns the classes rather than the images. Each image is flipped left to right half
## of the time, and cropped at random, by a recipe that depends on its size:
## - small images (CIFAR-10's 32 px, up to 64): the classic crop of the image padded by 4 black
##   pixels, what transforms.v2.RandomCrop(32, padding=4) does;
## - photos: a crop of 35% to 100% of the image, 3:4 to 4:3 in shape, resized back to the full
##   size, as v2.RandomResizedCrop(size, scale=(0.35, 1)) does. torchvision's ImageNet recipe
##   keeps as little as 8%, for 90 epochs from scratch; fastai fine-tunes with 35%.
## Both run on a batch, on the device: v2's transforms image by image on the CPU cost 134 us an
## image, this 16 us (tests/benchmark_speed.py), and CPU work per image can starve a fast GPU.
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


def random_resized_crop_flip(images, generator, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    n, _, size, _ = images.shape
    areas = torch.empty(n).uniform_(*scale, generator=generator) * size * size
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    heights = (areas / log_ratio.exp()).sqrt().round().clamp(1, size).long()
    widths = (areas * log_ratio.exp()).sqrt().round().clamp(1, size).long()
    tops = (torch.rand(n, generator=generator) * (size - heights + 1)).long()
    lefts = (torch.rand(n, generator=generator) * (size - widths + 1)).long()
    boxes = torch.stack([tops, lefts, heights, widths], 1).tolist()
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    crops = []
    for image, (top, left, height, width), flip in zip(images, boxes, flips, strict=True):
        crop = image[None, :, top : top + height, left : left + width]
        crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0]
        if flip:
            crop = crop.flip(-1)
        crops.append(crop)
    return torch.stack(crops)


## The pretrained weights expect what they saw in training: pixels from 0 to 1, normalised with
## ImageNet's mean and standard deviation per colour channel, at about ImageNet's size. Like the
## augmentation layers of Keras's guide, this module augments in train mode only.
class ModelInput(nn.Module):
    """Images (uint8, or floats from 0 to 1) -> the network's input: augmented in train mode, at
    `image_size`, normalised."""

    def __init__(self, image_size, seed):
        super().__init__()
        self.image_size = image_size
        self.generator = torch.Generator().manual_seed(seed)  # last.pt saves its state too
        preset = IMAGENET.transforms()
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1))

    def forward(self, images):
        x = images
        if images.dtype == torch.uint8:
            x = images.float() / 255  # floats (a ToTensor loader's, 0 to 1) are taken as they are
        if self.training and x.shape[-1] <= 64:
            x = random_crop_flip(x, self.generator)
        elif self.training:
            x = random_resized_crop_flip(x, self.generator)
        if x.shape[-1] != self.image_size:
            ## 32 -> 224 pixels for a whole batch at once, on the device.
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # cuDNN's fastest layout
        return x


# === 2. The model: ResNet18 with ImageNet weights and a new head ==================================
## The pretrained network ends in ImageNet's 1000-way classifier, `fc`. We keep everything before
## it, the feature extractor, and replace `fc` by a new layer with one output per class.
def build_model(num_classes, weights="IMAGENET1K_V1"):
    """ResNet18 with the given weights and a new, randomly initialised head."""
    if weights == "IMAGENET1K_V1":
        ## Downloaded once into torch's cache (45 MB), checked against its hash, then read there.
        model = models.resnet18(weights=models.ResNet18_Weights.IMAGENET1K_V1)
    else:
        model = models.resnet18()  # random weights
        if weights != "none":  # a file: ImageNet's weights, or a best.pt of an earlier run
            load_backbone(model, weights)
    model.fc = nn.Linear(512, num_classes)  # 512 features come out of layer4
    return model


def load_backbone(model, path):
    """Every weight but the head's from a ResNet18 state dict, whatever the size of its head."""
    ## weights_only=True refuses pickled Python objects: unpickling a file can run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = {key: value for key, value in state.items() if not key.startswith("fc.")}
    model.fc = nn.Identity()  # no head, so the strict load expects none; build_model() adds one
    model.load_state_dict(backbone)  # strict: a missing, unknown or misshapen weight is an error


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


# === 5. Precision and the training step ===========================================================
## On an NVIDIA GPU, torch.autocast runs the forward pass in 16-bit floats: twice the speed, half
## the memory. bfloat16 from compute capability 8.0 (A100, RTX 30xx and newer); float16 on 7.x
## (V100, T4, RTX 20xx), whose cuDNN has no bfloat16 convolutions. float16 also needs the gradient
## scaler, which scales the loss up so that small gradients do not underflow to zero. Below 7.0,
## on a Mac's GPU (MPS) and on the CPU: float32, where the scaler is disabled.
def choose_device():
    """The device, and the autocast dtype its hardware supports (None: float32)."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    amp_dtype = None
    name = ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            amp_dtype = torch.bfloat16
        elif major == 7:
            amp_dtype = torch.float16
        name = f" ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
        torch.backends.cudnn.benchmark = True  # fixed input sizes: time the algorithms once
    precision = str(amp_dtype or torch.float32).replace("torch.", "")
    print(f"device: {device}{name}   precision: {precision}")
    return device, amp_dtype


## The classic loop: forward pass, loss, zero_grad, backward, step. With the scaler disabled, its
## three calls are plain loss.backward() and optimizer.step().
def train_one_epoch(model, loader, optimizer, scaler, inputs, amp_dtype=None):
    """One pass over the training split, augmented: (mean loss, accuracy). The model's mode is the
    caller's: set_train_mode() keeps the frozen blocks' BatchNorm in eval mode."""
    device = next(model.parameters()).device
    inputs.train()  # augment
    total_loss = torch.zeros((), device=device)  # sums stay on the device: no waiting for the GPU
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    total_images = 0
    progress = progress_bar(loader, "train")
    for batch, (images, labels) in enumerate(progress, start=1):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = inputs(images)
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
        ## .item() makes the CPU wait until the GPU has caught up: read the loss every 25 batches.
        if batch % 25 == 0:
            progress.set_postfix(loss=f"{total_loss.item() / total_images:.3f}", refresh=False)
    mean_loss = total_loss.item() / total_images
    ## A nan or inf loss means training diverged: every step after it would be wasted.
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"training diverged: the loss became {mean_loss}. Try a lower learning rate"
            " (--head-lr, --backbone-lr), e.g. 10x smaller"
        )
    return mean_loss, total_correct.item() / total_images


# === 6. Evaluation ================================================================================
## eval mode for every layer: BatchNorm uses its running statistics, so a prediction never depends
## on the other images in the batch. inference_mode() keeps no autograd records at all.
@torch.inference_mode()
def evaluate(model, loader, inputs, amp_dtype=None, desc="val"):
    """Mean loss, confusion matrix (rows: true class), each image's (prediction, probability)."""
    device = next(model.parameters()).device
    model.eval()
    inputs.eval()  # no augmentation
    total_loss = torch.zeros((), device=device)
    all_labels, predictions = [], []
    for images, labels in progress_bar(loader, desc):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs(images)).float()
        total_loss += F.cross_entropy(logits, labels) * len(labels)
        probability, predicted = logits.softmax(1).max(1)
        predictions.append(torch.stack([predicted.float(), probability], 1))
        all_labels.append(labels)
    predictions = torch.cat(predictions).cpu()
    num_classes = logits.shape[1]  # a logit per class, whatever the model calls its head
    ## The confusion matrix: how many images of each true class (row) got each prediction (column).
    pairs = torch.cat(all_labels).cpu() * num_classes + predictions[:, 0].long()
    confusion = torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)
    return total_loss.item() / len(pairs), confusion, predictions


def accuracy(confusion):
    return confusion.trace().item() / confusion.sum().item()


# === 7. Early stopping ============================================================================
## Training accuracy keeps rising long after the model stops getting better on images it has not
## seen. Early stopping watches the validation split, keeps the weights of the best epoch, and
## ends training once `patience` epochs in a row failed to beat the best by more than `min_delta`.
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


# === 8. The story of a run ========================================================================
def main(argv=()):
    """Settings, data, model, freezing, optimizer; epochs with early stopping; the test."""
    cfg = parse_settings(argv)  # the constants above, overridden by flags, or a run's to --resume
    device, amp_dtype = choose_device()
    train_set, val_set, test_set, classes = load_data(cfg)  # CIFAR-10 or your folder, split
    train_loader, val_loader, test_loader = make_loaders(
        train_set, val_set, test_set, cfg.batch_size, cfg.num_workers, cfg.seed
    )
    torch.manual_seed(cfg.seed)  # the new head's first weights
    model = build_model(len(classes), cfg.weights)
    freeze(model, cfg.freeze_until)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else None)
    inputs = ModelInput(cfg.image_size, cfg.seed).to(device)
    lrs = block_lrs(cfg.backbone_lr, cfg.layer_lr_decay, cfg.head_lr)
    ## fused=True: one kernel (GPU) or one C++ loop (CPU) updates every tensor, not a loop of ops.
    optimizer = torch.optim.Adam(param_groups(model, lrs), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta, cfg.monitor)
    run = Run(cfg, model, optimizer, scaler, stopper, train_loader, inputs)  # its folder, or resume
    try:
        for epoch in range(run.next_epoch, cfg.epochs + 1):
            if epoch in cfg.unfreeze_schedule:
                unfreeze(model, optimizer, cfg.unfreeze_schedule[epoch], lrs)
            started = time.perf_counter()
            set_train_mode(model, cfg.frozen_bn)
            train_loss, train_acc = train_one_epoch(
                model, train_loader, optimizer, scaler, inputs, amp_dtype
            )
            val_loss, confusion, _ = evaluate(model, val_loader, inputs, amp_dtype)
            improved = stopper.step(val_loss, accuracy(confusion), epoch)
            if improved:  ## the best epoch's weights: the ones the test will use
                save(model.state_dict(), run.dir / "best.pt")
            run.log_epoch(epoch, train_loss, train_acc, val_loss, confusion, started, improved)
            save(run.checkpoint(epoch), run.dir / "last.pt")  # what a resume needs: epoch complete
            if stopper.should_stop:
                break
    except KeyboardInterrupt as interrupt:
        ## Ctrl-C or SIGTERM drops the epoch under way (last.pt holds the last complete one).
        run.interrupted = interrupt  # the best weights so far are tested, then how to resume
        if run.best_epoch is None:
            raise  # not one epoch complete: nothing to test
    ## The test set is used once, on the weights early stopping chose: never choose by it.
    model.load_state_dict(torch.load(run.dir / "best.pt", map_location=device, weights_only=True))
    test_loss, confusion, predictions = evaluate(model, test_loader, inputs, amp_dtype, "test")
    return run.finish(test_loss, confusion, test_set, predictions)


# ==================================================================================================
# The lesson ends here: on a first read, stop and go on with the README. Below is plumbing: the
# command line, data files and downloads, the run folder and resume, files, reports, pictures.
# ==================================================================================================
SETTINGS = [
    "DATASET", "DATA_DIR", "SEED", "VAL_FRACTION", "TRAIN_PER_CLASS", "IMAGE_SIZE", "WEIGHTS",
    "FREEZE_UNTIL", "UNFREEZE_SCHEDULE", "FROZEN_BN", "BATCH_SIZE", "EPOCHS", "BACKBONE_LR",
    "LAYER_LR_DECAY", "HEAD_LR", "MONITOR", "PATIENCE", "MIN_DELTA", "NUM_WORKERS", "OUTPUT_DIR",
]  # fmt: skip
WHERE = ["DATA_DIR", "OUTPUT_DIR", "NUM_WORKERS"]  # where and how fast, not what: free on --resume
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_PER_CLASS = 5_000  # training images per class: the splits are checked before any download
CIFAR10_HOME = "https://www.cs.toronto.edu/~kriz/cifar.html"
DRY_RUN_BATCHES = 1  # --dry-run: batches per phase (train, validation, test)
DRY_RUN_EPOCHS = 2  # --dry-run: epochs, unless --epochs is given or the schedule needs more
HISTORY = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
HISTORY += [f"lr_{name}" for name in BLOCKS] + ["seconds"]  # the columns of history.csv
active = SimpleNamespace(run=None)  # the run this process works on, for cli()'s last word
PASTED = "__file__" not in globals()  # pasted into a notebook's cell: no file, no command line
IN_A_KERNEL = "ipykernel" in sys.modules  # pasted, %run in a notebook, or Spyder's console
NOTEBOOK_BACKEND = os.environ.get("MPLBACKEND") == "module://matplotlib_inline.backend_inline"
NOTEBOOK_SHELL = NOTEBOOK_BACKEND and not IN_A_KERNEL  # a cell's `!python`: ipykernel's setting
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota used up
COLAB_DRIVE = Path("/content/drive")  # where Colab mounts Google Drive: drive.mount()
PYTHON_ORG = f"/Applications/Python {sys.version_info[0]}.{sys.version_info[1]}"  # on a Mac
MAC_CERTIFICATES = Path(PYTHON_ORG, "Install Certificates.command")  # python.org's Python only
IMAGE_FILES = (*datasets.folder.IMG_EXTENSIONS, ".jfif")  # .jfif: a JPEG as Windows saves one
if ".avif" in Image.registered_extensions():  # where this Pillow reads AVIF, as browsers save
    IMAGE_FILES += (".avif",)
UPRIGHT = {  # EXIF's Orientation -> the turn that shows the photo upright
    2: Image.FLIP_LEFT_RIGHT,
    3: Image.ROTATE_180,
    4: Image.FLIP_TOP_BOTTOM,
    5: Image.TRANSPOSE,
    6: Image.ROTATE_270,
    7: Image.TRANSVERSE,
    8: Image.ROTATE_90,
}


class SettingError(Exception):
    """A bad setting: one line, exit code 2."""


class RunError(Exception):
    """Something outside the code went wrong (a download, a file): one line, exit code 1."""


def command(*args):
    """A command to paste: python fine_tuning.py ARGS, each quoted for the shell, named by the
    interpreter that runs it (python3, say), or by its path where that name runs another (a venv
    not activated, Windows' py launcher). In a notebook's cell, as the script ran there: with
    `!` before it, as %run fine_tuning.py ARGS, or, pasted into a cell, as cli([ARGS])."""
    words = [str(arg) for arg in args]
    if PASTED:
        return f"cli({words!r})"
    script = os.path.abspath(__file__)  # normalised: `python ./fine_tuning.py` gives /x/./
    if os.path.dirname(script) == os.getcwd():  # else run by its path from elsewhere: that path
        script = "fine_tuning.py"
    executable = re.sub(r"pythonw(\.exe)?$", r"python\1", sys.executable)  # IDLE's: no console
    python = os.path.basename(executable).removesuffix(".exe") or "python"  # python3, say
    runs = shutil.which(python) or ""  # the Python that name runs here: this one, or another
    if executable and os.path.normcase(runs) != os.path.normcase(executable):
        python = executable
    if IN_A_KERNEL:
        python = "%run"
    words = [python, script, *words]
    line = shlex.join(words)
    if os.name == "nt":
        line = subprocess.list2cmdline(words)  # double quotes: Windows' cmd knows no others
    if NOTEBOOK_SHELL:
        line = "!" + line
    return line


def works_offline():
    return f"`{command('--dry-run')}` works offline."  # the hint of a failed download


def download_reason(error):
    """Why a download failed: a URLError's reason (no network, a proxy, a certificate) or a cut
    connection's. Python from python.org on a Mac can check no server's certificate until its
    Install Certificates.command has run: where that is the cause, the command."""
    reason = getattr(error, "reason", error.strerror or error)  # RemoteDisconnected: no strerror
    if isinstance(reason, ssl.SSLCertVerificationError) and MAC_CERTIFICATES.exists():
        fix = shlex.quote(str(MAC_CERTIFICATES))
        return f"{reason}; Python from python.org needs its certificates installed: run {fix}"
    return reason


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
    """A path as given (~ expanded); on Colab, one on Google Drive only once Drive is mounted."""
    path = Path(text).expanduser()
    if path.absolute().is_relative_to(COLAB_DRIVE) and not os.path.ismount(COLAB_DRIVE):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not allowed: Google Drive is not mounted at {COLAB_DRIVE} (what is"
            " written there now stays on this runtime, and goes with it). Mount it first, in a"
            " cell: from google.colab import drive; drive.mount('/content/drive')"
        )
    return path


def dataset_setting(text):
    if text.upper() == "CIFAR10":
        return "CIFAR10"
    path = folder(text)  # relative to the working folder, which may not be the photos'
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"'{text}' is not allowed: expected CIFAR10 or a folder, and there is no folder"
            f" {path.absolute()}"
        )
    return str(path)  # as given: a relative path moves with its project


def schedule(text):
    """'5:layer2,10:layer1' as {5: 'layer2', 10: 'layer1'}."""
    plain = text.lower().replace(" ", "")
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
    """IMAGENET1K_V1, none, or a file that load_backbone() takes: a ResNet18 state dict."""
    if text.lower() == "none":
        return "none"
    if text.upper() == "IMAGENET1K_V1":
        return "IMAGENET1K_V1"
    not_weights = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, AttributeError)
    not_weights += (IndexError, KeyError)  # a text file ("error code: 1020"), read as a pickle
    try:
        load_backbone(models.resnet18(), folder(text))
    except not_weights as error:
        # no such file; the strict load's missing, unknown or misshapen weights; pickled objects
        # (which could run code) or a damaged file; a list or a tensor (it has no .items())
        raise argparse.ArgumentTypeError(
            f"'{text}' is not allowed: expected IMAGENET1K_V1, none, or a file saved by torch.save("
            f"model.state_dict(), path) of a ResNet18, as a run's best.pt ({brief(error)})"
        ) from None
    return str(folder(text))


def brief(error):
    """What an exception says, in one line: torch's can take a paragraph. Of a weights-only load's
    refusal, what it found (a ResNet object: the whole model saved), not its advice to load the
    file unsafely."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(\.\s|\n|$)", text)
    if found:
        text = found[1]
    return textwrap.shorten(f"{type(error).__name__}: {text}", 240, placeholder=" ...")


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
        raise SettingError(message)  # one line: --help has the usage


def settings_parser():
    parser = SettingsParser(
        allow_abbrev=False,
        description=(__doc__ or "").split("\n\n")[0],  # None: python -OO, or IDLE's `idle -r`
        epilog="Each flag sets the constant of its name at the top of fine_tuning.py, whose comment"
        " says what it does (and README.md, Settings).",
    )
    whole = "a whole number >= "
    rate = "a learning rate in (0, 1], e.g. "
    holds_cifar = "the folder that holds cifar-10-batches-py, not that folder itself"
    types = {
        "DATASET": dataset_setting,
        "DATA_DIR": checked(folder, lambda path: path.name != "cifar-10-batches-py", holds_cifar),
        "SEED": checked(int, lambda n: 0 <= n < 2**32, "a whole number from 0 to 4294967295"),
        "VAL_FRACTION": checked(float, lambda x: 0 < x < 1, "a number between 0 and 1, e.g. 0.1"),
        "TRAIN_PER_CLASS": checked(number_or("all"), lambda n: n == "all" or n >= 1, "all or 1+"),
        "IMAGE_SIZE": checked(
            number_or("auto"), lambda n: n == "auto" or 1 <= n <= 512, "auto or 1 to 512"
        ),
        "WEIGHTS": weights_setting,
        "FREEZE_UNTIL": one_of("none", *BLOCKS[:-1]),
        "UNFREEZE_SCHEDULE": checked(
            schedule, lambda plan: True, "none, or EPOCH:BLOCK pairs such as 5:layer2,10:layer1"
        ),
        "FROZEN_BN": one_of("eval", "train"),
        "BATCH_SIZE": checked(int, lambda n: n >= 2, whole + "2 (BatchNorm needs 2 images)"),
        "EPOCHS": checked(int, lambda n: n >= 1, whole + "1"),
        "BACKBONE_LR": checked(float, lambda x: 0 < x <= 1, rate + "1e-4 (above 1 is a typo)"),
        "LAYER_LR_DECAY": checked(float, lambda x: 0 < x <= 1, "a number in (0, 1], e.g. 0.5"),
        "HEAD_LR": checked(float, lambda x: 0 < x <= 1, rate + "1e-3 (above 1 is a typo)"),
        "MONITOR": one_of("val_loss", "val_acc"),
        "PATIENCE": checked(int, lambda n: n >= 1, whole + "1"),
        "MIN_DELTA": checked(float, lambda x: 0 <= x < math.inf, "a number >= 0"),
        "NUM_WORKERS": checked(number_or("auto"), lambda n: n == "auto" or n >= 0, "auto or 0+"),
        "OUTPUT_DIR": checked(folder, lambda path: not path.is_file(), "a folder"),
    }
    for name in SETTINGS:
        default = constant_text(name)
        parser.add_argument(
            flag(name), type=types[name], default=default, help=f"default: {default}"
        )
    parser.add_argument("--dry-run", action="store_true", help="offline check in seconds")
    name = checked(str, lambda text: re.fullmatch(r"\w[\w.+=-]*", text), "letters, digits, ._+=-")
    parser.add_argument("--run-name", type=name, help="default: the time and the settings")
    parser.add_argument("--resume", metavar="RUN_DIR", type=folder, help="go on with a run")
    return parser


def parse_settings(argv=()):
    """The checked settings, named in lower case (cfg.epochs), as main() uses them: the constants,
    and the flags in argv. Not sys.argv: main() called in a notebook would read the kernel's."""
    argv = [str(arg) for arg in argv]
    cfg, unknown = settings_parser().parse_known_args(argv)
    if unknown:
        known = [flag(name) for name in SETTINGS] + ["--dry-run", "--run-name", "--resume"]
        nearest = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        hint = f": did you mean {nearest[0]}?" if nearest else ""
        if Path(unknown[0]).expanduser().is_dir():  # python fine_tuning.py my_photos
            hint = f": a folder is given with --dataset: {command('--dataset', unknown[0])}"
        raise SettingError(f"unrecognized argument {unknown[0]}{hint} (--help lists them all)")
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if cfg.num_workers == "auto":  # resolved at each start: a resume elsewhere gets its own
        cfg.num_workers = 0
        if torch.cuda.is_available() and not PASTED:  # spawned workers cannot import a cell
            cfg.num_workers = 2
    cfg.checkpoint = None
    cfg.resume_flags = []  # the settings a resume gives anew, as flags: ["--epochs", 20, ...]
    if cfg.resume:
        read_saved_settings(cfg, given)
    elif cfg.dry_run and "--epochs" not in given:
        cfg.epochs = min(cfg.epochs, max([DRY_RUN_EPOCHS, *cfg.unfreeze_schedule]))
    check_together(cfg)
    if cfg.dry_run:
        cfg.weights = "none"  # random weights: a dry run downloads nothing
    cfg.weights_setting = cfg.weights  # for the records
    if cfg.resume:
        cfg.weights = "none"  # last.pt holds every weight: nothing to download or to read
    return cfg


def read_saved_settings(cfg, given):
    """A stopped run's settings, from its last.pt: where it runs, and how long, may change."""
    free = {"--resume", "--epochs", "--dataset", *(flag(name) for name in WHERE)}
    if given - free:
        raise SettingError(
            "--resume goes on with the run's own settings; only --epochs, --dataset, --data-dir,"
            f" --output-dir and --num-workers may change, not {', '.join(sorted(given - free))}"
        )
    cfg.resume = run_to_resume(cfg.resume)
    try:
        state = torch.load(cfg.resume / "last.pt", map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as error:  # a copy cut short, say
        raise SettingError(
            f"--resume: cannot read {cfg.resume / 'last.pt'} ({brief(error)}); copy it again, whole"
        ) from None
    for name, value in state["settings"].items():
        if flag(name) not in given and name not in ("NUM_WORKERS", "OUTPUT_DIR"):
            setattr(cfg, name.lower(), value)
    cfg.data_dir = Path(cfg.data_dir)
    if "--output-dir" not in given:
        cfg.output_dir = cfg.resume.parent  # summary.csv beside the run folder, wherever it is
    if "--epochs" in given and cfg.epochs < state["epoch"]:  # as many as done: on to the test
        raise SettingError(
            f"EPOCHS (--epochs) = {cfg.epochs} is not allowed: the run has done {state['epoch']}"
            f" epochs; give {state['epoch']} to go on to the test, or more to train on"
        )
    for name in ("EPOCHS", "DATASET", "DATA_DIR"):  # resume commands repeat them: resume_command()
        value = getattr(cfg, name.lower())
        if str(value) != str(state["settings"][name]):
            cfg.resume_flags += [flag(name), value]
    if "--output-dir" in given:  # last.pt's is not read back (a moved run's): repeat it too
        cfg.resume_flags += ["--output-dir", cfg.output_dir]
    cfg.dry_run = state["dry_run"]
    cfg.checkpoint = state


def run_to_resume(path):
    """The folder of a stopped run, given as runs/x or, as PyTorch's examples take a checkpoint,
    runs/x/last.pt; or one line on why it cannot resume."""
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise SettingError(f"--resume: there is no folder {path}")
    if (path / "last.pt").exists():
        return path
    if (path / "best.pt").exists():  # a finished run removes its last.pt
        raise SettingError(
            f"--resume: {path} finished (and removed its last.pt). A new run can start from its"
            f" weights: {command('--weights', path / 'best.pt')}"
        )
    raise SettingError(f"--resume: {path} is not a run folder: it has no last.pt")  # runs/, say


def check_together(cfg):
    """The checks that need two settings; CIFAR-10's splits too, whose sizes are known."""
    frozen = []
    if cfg.freeze_until != "none":
        frozen = BLOCKS[: BLOCKS.index(cfg.freeze_until) + 1]
    for epoch, block in cfg.unfreeze_schedule.items():
        pair = f"UNFREEZE_SCHEDULE (--unfreeze-schedule): {epoch}:{block} is not allowed"
        if not 1 <= epoch <= cfg.epochs and cfg.resume is None:  # a resume may end before it
            raise SettingError(f"{pair}: epoch {epoch} is outside 1..{cfg.epochs} (EPOCHS)")
        if block not in frozen:
            raise SettingError(f"{pair}: {block} is trainable by then; name a frozen block")
        frozen = frozen[: frozen.index(block)]  # that block and every block after it now train
    if cfg.dataset == "CIFAR10":
        labels = torch.arange(10 * CIFAR10_PER_CLASS) % 10
        check_splits(labels, CIFAR10_CLASSES, cfg, test_held_out=False)


def check_splits(labels, classes, cfg, test_held_out):
    """Whether the splits stratified_split() makes of these labels each keep images."""
    if test_held_out:
        labels = labels[stratified_split(labels, cfg.val_fraction)[0]]
    kept, held_out = stratified_split(labels, cfg.val_fraction)
    per_class = torch.bincount(labels[kept], minlength=len(classes)).tolist()  # ints of any size
    fraction = f"VAL_FRACTION (--val-fraction) = {cfg.val_fraction}"
    if len(held_out) == 0:
        raise SettingError(f"{fraction} leaves 0 validation images; both splits must keep some")
    if min(per_class) == 0:
        raise SettingError(f"{fraction} leaves {classes[per_class.index(0)]} no training image")
    if cfg.train_per_class != "all" and cfg.train_per_class > max(per_class):
        raise SettingError(
            f"TRAIN_PER_CLASS (--train-per-class) = {cfg.train_per_class} is not allowed: only"
            f" {max(per_class):,} training images per class remain after the validation split"
        )
    if cfg.train_per_class != "all":
        per_class = [min(n, cfg.train_per_class) for n in per_class]
    if cfg.batch_size > sum(per_class):
        raise SettingError(
            f"BATCH_SIZE (--batch-size) = {cfg.batch_size} is not allowed: the training split"
            f" has only {sum(per_class):,} images"
        )


def settings_record(cfg):
    """The settings as this run uses them: config.json, last.pt and summary.csv."""
    record = {name: getattr(cfg, name.lower()) for name in SETTINGS}
    record["WEIGHTS"] = cfg.weights_setting
    record["DATA_DIR"] = str(cfg.data_dir)  # as given: relative paths move with the project
    record["OUTPUT_DIR"] = str(cfg.output_dir)
    return record


# --- Data: CIFAR-10 and its download, a folder of images ------------------------------------------
def load_data(cfg):
    """CIFAR-10 (with --dry-run, its synthetic twin) or a folder of images, in three splits. What
    the data decides goes into cfg: the size IMAGE_SIZE "auto" stands for, the class names."""
    held_out = ""
    if cfg.dataset != "CIFAR10":
        full_train_set, test_set, held_out = read_folder(cfg)
    elif cfg.dry_run:
        print(f"dry run: synthetic images, random weights, batches per phase: {DRY_RUN_BATCHES}")
        full_train_set, test_set, cfg.classes = synthetic_cifar10(cfg.seed)
    else:
        full_train_set, test_set, cfg.classes = read_cifar10(cfg)
    stored = full_train_set.tensors[0].shape[-1]
    if cfg.image_size == "auto":
        cfg.image_size = auto_image_size(stored)
    train_set, val_set = split_off(full_train_set, cfg.val_fraction, cfg.train_per_class)
    cfg.val_images = len(val_set)
    kept = ""
    if cfg.train_per_class != "all":
        kept = f" ({cfg.train_per_class} per class)"
    seen = ""
    if cfg.image_size != stored:
        seen = f", the model sees {cfg.image_size} px"
    print(
        f"data: {len(train_set):,} train{kept} / {len(val_set):,} validation / {len(test_set):,}"
        f" test{held_out} images, {len(cfg.classes)} classes, {stored} px{seen}"
    )
    if cfg.dry_run:  # a few batches of each set
        train_set = some_images(train_set, DRY_RUN_BATCHES * cfg.batch_size)
        val_set = some_images(val_set, DRY_RUN_BATCHES * 2 * cfg.batch_size)
        test_set = some_images(test_set, DRY_RUN_BATCHES * 2 * cfg.batch_size)
    return train_set, val_set, test_set, cfg.classes


def read_cifar10(cfg):
    """load_cifar10(), with each way its download can fail as one line."""
    archive = cfg.data_dir / datasets.CIFAR10.filename
    copied = archive.exists()  # put there by hand: torchvision downloads anew if its md5 is wrong
    try:
        return load_cifar10(cfg.data_dir)
    except (urllib.error.URLError, ConnectionError) as error:  # no network, a proxy, an SSL or
        # HTTP error (URLError); a connection cut mid-download, even after torchvision's retry
        where = f"Without internet, put {archive.name} (from {CIFAR10_HOME}) in {cfg.data_dir}"
        if copied:  # and torchvision tried to download it: the copy is damaged, or cut short
            where = f"The copy {archive} is damaged (its md5 sum is wrong): replace it, whole"
        raise RunError(
            f"could not download CIFAR-10 ({download_reason(error)}). {where}. {works_offline()}"
        ) from None
    except RuntimeError as error:  # torchvision's md5 check failed
        raise RunError(
            f"the download of CIFAR-10 failed its check ({error}): delete {archive}, run again"
        ) from None
    except OSError as error:  # DATA_DIR cannot take it: read-only, or a file in its path
        if error.filename is None or error.errno in DISK_FULL:
            raise  # a full disk: cli() says how much room the downloads need
        raise SettingError(f"DATA_DIR (--data-dir): {error.strerror}: {error.filename}") from None


def auto_image_size(own_size):
    """IMAGE_SIZE "auto": ImageNet's 224 px on CUDA; elsewhere the images' own size, up to 224
    (CIFAR-10 at 224 px costs a CPU 10 times the time of 32 px, or more: README, Speed)."""
    if torch.cuda.is_available():
        return 224
    return min(224, own_size)


def some_images(dataset, n):
    """n images spread over the set: a folder's come class by class."""
    every = max(1, len(dataset) // n)
    return TensorDataset(*(tensor[::every][:n] for tensor in dataset.tensors))


def synthetic_cifar10(seed):
    """Class-tinted noise of CIFAR-10's size (50,000 + 10,000 images): something to learn. The
    classes come in a random order, as in CIFAR-10's files."""
    generator = torch.Generator().manual_seed(seed)
    tints = torch.randint(0, 128, (10, 3, 1, 1), generator=generator, dtype=torch.uint8)
    sets = []
    for n in (10 * CIFAR10_PER_CLASS, 10_000):
        labels = (torch.arange(n) % 10)[torch.randperm(n, generator=generator)]
        noise = torch.randint(0, 128, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
        sets.append(TensorDataset(noise + tints[labels], labels))
    return sets[0], sets[1], CIFAR10_CLASSES


def read_folder(cfg):
    """A folder with train/ (and test/, or else a test split is held out), or with the class
    folders alone: checked, then read by load_image_folder()."""
    root = Path(cfg.dataset)
    if not root.is_dir():  # a resumed run's, moved since (a new run's is checked by its flag)
        moved = command("--resume", cfg.resume, "--dataset", "FOLDER", *cfg.resume_flags)
        raise SettingError(f"DATASET (--dataset): there is no folder {root}. Moved? {moved}")
    train_root, test_root = split_folders(root)
    for split in (train_root, test_root):  # python fine_tuning.py --dataset . beside the classes
        if split is not None and cfg.output_dir.resolve().is_relative_to(split.resolve()):
            raise SettingError(
                f"OUTPUT_DIR (--output-dir): {cfg.output_dir} is inside {split.absolute()}, whose"
                " folders are the classes: the next run would take it for one. Give a folder"
                f" outside it, such as {split.absolute().parent / 'runs'}"
            )
    listing = list_images(train_root)
    cfg.classes = listing.classes
    # Named before the images are read: given a level too high (PlantVillage's color/, grayscale/
    # around the class folders), ImageFolder takes the folders there for the classes
    print(textwrap.shorten(f"classes: {', '.join(cfg.classes)}", 100, placeholder=" ..."))
    files = [path for path, _ in listing.samples]
    if test_root is not None:
        files += [path for path, _ in list_images(test_root, listing.classes).samples]
    try:
        ## Photos are stored at IMAGE_SIZE, smaller images at their own size (the median of 9 or
        ## so): a 32 px image upsampled in memory would take 49x the room for nothing.
        every = max(1, len(listing) // 9)
        sides = [min(open_rgb(path).size) for path, _ in listing.samples[::every]]
        own_size = int(statistics.median(sides))
        if cfg.image_size == "auto":
            cfg.image_size = auto_image_size(own_size)
        stored = min(cfg.image_size, own_size)
        check_memory(len(files), stored, root)
        check_splits(torch.tensor(listing.targets), listing.classes, cfg, test_root is None)
        if cfg.dry_run:
            print(f"dry run: your images, random weights, batches per phase: {DRY_RUN_BATCHES}")
        full_train_set, _ = load_image_folder(train_root, stored)
        if test_root is None:
            full_train_set, test_set = split_off(full_train_set, cfg.val_fraction)
            return full_train_set, test_set, " (held out)"
        test_set, _ = load_image_folder(test_root, stored)
        return full_train_set, test_set, f" ({test_root.name}/)"
    except RunError as error:  # open_rgb(): an image that cannot be read. Are there more?
        raise unreadable_images(files, error) from None


def unreadable_images(files, error):
    """The first image that cannot be read stops the reading. Of a folder with more (a scraper's
    web pages saved as .jpg, downloads cut short), up to 50 are printed: one run names them."""
    failed = []
    for path in progress_bar(files, "checking every image"):
        try:
            open_rgb(path, size=32)  # a JPEG at 1/8 scale: quick, and still decoded whole
        except RunError as unreadable:
            failed.append(unreadable)
    if len(failed) < 2:
        return error
    shown = failed[:50]  # not thousands: a repository cloned without Git LFS has no image
    for unreadable in shown:
        print(unreadable)
    many = f"cannot read {len(failed):,} of the {len(files):,} images ({len(shown)} listed above)"
    return RunError(f"{many}: delete or replace them")


def split_folders(root):
    """(training folder, test folder): root's train/ and test/ (or else val/, valid/, validation/),
    in any case, as Fruits 360's Training/ and Test/; or (root, None), for class folders alone.
    A test/ of images alone, as a competition's (the images to predict), or in one folder that is
    no class of train/, as Tiny ImageNet's test/images/, has no labels: a note says it is not
    used. A train/ without class folders is no split: a class (buses, cars, trains), or photos
    labelled by their names alone (Kaggle's Dogs vs. Cats: train/cat.1.jpg), one line says."""
    held_out = ("val", "valid", "validation", "test", "testing")  # the last one found is the test
    subfolders = {path.name.lower(): path for path in sorted(root.iterdir()) if path.is_dir()}
    train_root = subfolders.get("train", subfolders.get("training"))
    if train_root is not None and not class_folders(train_root):  # a class named train, or photos
        train_root = None
    if train_root is None:  # class folders, unless named as splits: Kaggle's seg_train/, test_set/
        names = ["train", "training", *held_out]
        split = rf"(^|[_ -])({'|'.join(names)})([_ -]|$)"
        splits = [name for name in subfolders if re.search(split, name)]  # in lower case
        if len(splits) > 1 or set(splits) & set(names):
            raise SettingError(
                f"DATASET (--dataset): {root} holds {', '.join(splits)}: splits, not classes? Name"
                " them train/ and test/, each with a folder per class (README, Your own images),"
                " or rename a class so named"
            )
        return root, None
    splits = []
    for name in held_out:
        if name not in subfolders:
            continue
        split = subfolders[name]
        folders = class_folders(split)
        if len(folders) > 1 or any((train_root / path.name).is_dir() for path in folders):
            splits.append(split)
        else:
            print(f"note: {split.name}/ not used: its images are in no class folder, so unlabelled")
    if len(splits) > 1:  # Kaggle's train/, valid/, test/: the lesson holds out its own
        unused = "/, ".join(split.name for split in splits[:-1])
        print(f"note: {unused}/ not used: validation images come from {train_root.name}/")
    if not splits:
        return train_root, None
    return train_root, splits[-1]  # test/, or else the tutorials' name for it


def class_folders(folder):
    return [path for path in folder.iterdir() if path.is_dir() and not is_hidden(path.name)]


def list_images(folder, classes=None):
    """ImageFolder's listing (no image is read yet), or one line on what is wrong with it."""
    note_unused_files(folder)  # first: a class of .heic photos alone is an error below
    try:
        listing = ImageFolder(folder, loader=open_rgb, is_valid_file=is_image_file)
    except FileNotFoundError as error:  # no class folder, or a class folder without images
        types = " ".join(IMAGE_FILES)
        problem = str(error).strip()  # torchvision ends some with a space
        raise SettingError(f"DATASET (--dataset): {problem} (image files: {types})") from None
    if len(listing.classes) < 2:
        raise SettingError(
            f"DATASET (--dataset): {folder} has one class folder, {listing.classes[0]}; a"
            f" classifier needs two or more (if {listing.classes[0]}/ holds the class folders,"
            f" give that folder: --dataset {folder / listing.classes[0]})"
        )
    if classes is not None and listing.classes != classes:
        raise SettingError(
            f"DATASET (--dataset): the class folders of {folder} ({', '.join(listing.classes)})"
            f" must be those of train/ ({', '.join(classes)})"
        )
    return listing


def note_unused_files(folder):
    """One line on the files ImageFolder leaves out without a word, by their extension: an
    iPhone's .heic photos, say, or a .gif. Hidden files and folders are not counted."""
    unused = collections.Counter()
    for _, subfolders, files in os.walk(folder, followlinks=True):  # as ImageFolder walks
        subfolders[:] = [name for name in subfolders if not is_hidden(name)]
        for name in files:
            if not is_hidden(name) and not is_image_file(name):
                unused[os.path.splitext(name)[1].lower() or name] += 1
    if unused:
        kinds = ", ".join(f"{count:,} {kind}" for kind, count in sorted(unused.items()))
        kinds = textwrap.shorten(kinds, 200, placeholder=" ...")  # extensionless files: each named
        print(f"note: {folder}: not used, not images by their extension: {kinds}")


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, whose class folders are not hidden: as is_image_file() skips a
    hidden file, this skips Jupyter's .ipynb_checkpoints, and __MACOSX, a Mac zip's metadata."""

    def find_classes(self, directory):
        classes = sorted(path.name for path in class_folders(Path(directory)))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}


def is_image_file(path):
    """ImageFolder's test, an image file's extension, for a file that is not hidden: copied by a
    Mac (tar, a USB stick), photo.jpg may come with ._photo.jpg, its metadata, which is no image."""
    name = os.path.basename(path)
    is_image = datasets.folder.has_file_allowed_extension(name, IMAGE_FILES)
    return is_image and not is_hidden(name)


def is_hidden(name):
    return name.startswith(".") or name == "__MACOSX"  # __MACOSX: a Mac zip's metadata folder


def open_rgb(path, size=None):
    """ImageFolder's loader: the image in RGB, or one line naming a file that is not an image.
    With `size`, a JPEG is decoded at the smallest scale whose sides are both `size` or more."""
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("RGB", (size, size))  # a phone's 12 MP photo: 1/8 scale, 504x378
            # A phone's photo, upright: the turn ImageOps.exif_transpose() makes, without its
            # rewriting of the EXIF, which fails on some apps' odd tags (viewers show the photo)
            turn = UPRIGHT.get(image.getexif().get(0x0112))  # EXIF's tag 0x0112: Orientation
            if turn is not None:
                image = image.transpose(turn)
            if image.mode.startswith("I"):  # 16-bit grayscale, 0..65535: convert() clips at 255
                image = image.convert("I").point(lambda value: value / 256)
            if image.mode == "P":  # a palette: through RGBA, as PIL asks (with a warning)
                image = image.convert("RGBA")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # not an image, truncated; broken (PIL's SyntaxError); metadata or pixels over PIL's limits
        raise RunError(f"cannot read the image {path} ({error}): delete or replace it") from None


def check_memory(count, size, root):
    """A folder whose images, at `size` px, would fill more than half of the memory: one line."""
    if "SC_PHYS_PAGES" not in getattr(os, "sysconf_names", {}):
        return  # Windows does not say
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed = count * 3 * size * size
    if needed > memory / 2:
        fits = math.isqrt(int(memory / 2 / (count * 3)))
        raise SettingError(
            f"DATASET (--dataset): the {count:,} images of {root} need {needed / 1e6:,.0f} MB at"
            f" {size} px, more than half of this machine's {memory / 1e6:,.0f} MB. Set a smaller"
            f" IMAGE_SIZE (--image-size): {fits} px fits"
        )


# --- The run: its folder, made or resumed, a row per epoch, the checkpoint, the results -----------
class Run:
    """A run's folder and what it keeps: config.json, history.csv, best.pt, last.pt, results."""

    def __init__(self, cfg, model, optimizer, scaler, stopper, train_loader, inputs):
        """Make this run's folder (or take the stopped run's, and restore its state), write
        config.json, print the block table, and draw inputs.png."""
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.stopper = stopper
        self.train_set = train_loader.dataset
        self.shuffle = train_loader.sampler.generator
        self.inputs = inputs
        self.device = next(model.parameters()).device.type
        self.history = []
        self.best_epoch = None  # of the completed epochs: the one whose weights best.pt holds
        self.next_epoch = 1
        self.interrupted = None  # the KeyboardInterrupt that stopped training, if one did
        self.new = cfg.resume is None  # made by this process: removed if no epoch completes
        self.dir = cfg.resume or make_run_folder(cfg)
        active.run = self
        if cfg.checkpoint is not None:
            self.restore(cfg.checkpoint)
            cfg.checkpoint = None  # copied into the model and optimizer: not kept for the run
        config = dict(run=self.dir.name, dry_run=cfg.dry_run, settings=settings_record(cfg))
        config.update(classes=cfg.classes, device=self.device, torch=torch.__version__)
        write_text(self.dir / "config.json", json.dumps(config, indent=2))
        print(f"run folder: {self.dir}")
        starts = {"IMAGENET1K_V1": "ImageNet weights (IMAGENET1K_V1)", "none": "random weights"}
        start = starts.get(cfg.weights_setting, f"the weights in {cfg.weights_setting}")
        print(f"model: ResNet18, {start}, new {len(cfg.classes)}-class head")
        print_blocks(model, optimizer, cfg.frozen_bn)
        if self.new:
            draw_inputs(self)

    def restore(self, state):
        cfg = self.cfg
        if state["classes"] != cfg.classes:
            raise SettingError(
                f"--resume: the run learned the classes {', '.join(state['classes'])};"
                f" DATASET (--dataset) {cfg.dataset} has {', '.join(cfg.classes)}"
            )
        lrs = block_lrs(cfg.backbone_lr, cfg.layer_lr_decay, cfg.head_lr)
        for epoch, block in cfg.unfreeze_schedule.items():
            if epoch <= state["epoch"]:  # the same parameter groups, in the same order
                unfreeze(self.model, self.optimizer, block, lrs)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:  # it may resume on another precision
            self.scaler.load_state_dict(state["scaler"])
        vars(self.stopper).update(state["early_stopping"])
        self.shuffle.set_state(state["shuffle"])
        self.inputs.generator.set_state(state["augment"])
        self.history = state["history"]
        self.best_epoch = self.stopper.best_epoch
        self.next_epoch = state["epoch"] + 1
        if self.stopper.should_stop:  # it stopped early, then was interrupted during its test
            self.next_epoch = cfg.epochs + 1
        print(f"resuming {self.dir} after epoch {state['epoch']}")
        if state["device"] != self.device:
            print(
                f"note: this run trained on {state['device']}; here, on {self.device}, it keeps its"
                f" image size ({cfg.image_size} px) and takes this device's precision (above). Its"
                f" last epoch took {self.history[-1]['seconds']:.0f} s there."
            )

    def log_epoch(self, epoch, train_loss, train_acc, val_loss, confusion, started, improved):
        """A row of history.csv, and of the epoch table."""
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss)
        row["val_acc"] = accuracy(confusion)
        for group in self.optimizer.param_groups:
            row[f"lr_{group['name']}"] = group["lr"]
        row["seconds"] = round(time.perf_counter() - started, 2)
        self.history.append(row)
        if improved:
            self.best_epoch = epoch  # not the stopper's: Ctrl-C may have cut best.pt's writing
        write_text(self.dir / "history.csv", csv_text(HISTORY, self.history))
        if epoch == self.next_epoch:  # the first epoch of this process: the header
            print(f"{'epoch':>5}{'train loss':>12}{'train acc':>11}{'val loss':>10}", end="")
            print(f"{'val acc':>9}{'time':>8}")
        losses = f"{train_loss:>12.4f}{train_acc:>11.2%}{val_loss:>10.4f}{row['val_acc']:>9.2%}"
        best = "  * best" if improved else ""
        print(f"{epoch:>5}{losses}{row['seconds']:>7.1f}s{best}", flush=True)

    def checkpoint(self, epoch):
        """last.pt: what a resume needs to go on as if never stopped (on the CPU, exactly)."""
        return dict(
            epoch=epoch,
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            early_stopping=dict(vars(self.stopper)),
            shuffle=self.shuffle.get_state(),
            augment=self.inputs.generator.get_state(),
            history=self.history,
            settings=settings_record(self.cfg),
            classes=self.cfg.classes,
            dry_run=self.cfg.dry_run,
            device=self.device,
        )

    def stop_reason(self):
        cfg = self.cfg
        if self.interrupted is not None:
            return f"interrupted ({(self.interrupted.args or ['Ctrl-C'])[0]})"
        reason = f"all epochs ran (EPOCHS = {cfg.epochs})"
        if self.stopper.should_stop:
            reason = (
                f"early stopping: {cfg.monitor} did not improve on epoch {self.stopper.best_epoch}"
                f" by more than {cfg.min_delta:g} since then (PATIENCE = {cfg.patience})"
            )
        done = self.history[-1]["epoch"]
        later = {epoch: block for epoch, block in cfg.unfreeze_schedule.items() if epoch > done}
        if later:
            reason += f"; the scheduled unfreezing {schedule_text(later)} did not happen"
        return reason

    def finish(self, test_loss, confusion, test_set, predictions):
        """Print and save the test results; a finished run joins summary.csv and is compared."""
        cfg = self.cfg
        best = next(row for row in self.history if row["epoch"] == self.best_epoch)
        results = dict(test_loss=test_loss, test_acc=accuracy(confusion))
        results.update(best_epoch=best["epoch"], best_val_acc=best["val_acc"])
        results.update(epochs_run=self.history[-1]["epoch"], stop_reason=self.stop_reason())
        results["minutes"] = round(sum(row["seconds"] for row in self.history) / 60, 2)
        print(f"\nstopped: {results['stop_reason']}")
        print(
            f"test loss {test_loss:.4f}   test accuracy {results['test_acc']:.2%}   (the weights"
            f" of epoch {best['epoch']}, the best {cfg.monitor}, from best.pt; their validation"
            f" accuracy: {best['val_acc']:.2%})"
        )
        results["per_class_acc"] = print_report(confusion, cfg.classes)
        results.update(confusion_matrix=confusion.tolist(), classes=cfg.classes)
        write_text(self.dir / "results.json", json.dumps(results, indent=2))
        save_pictures(self, test_set, predictions)
        if self.interrupted is not None:
            print("\n(interrupted run: not added to summary.csv)" + next_step())
            return exit_code(self.interrupted)
        if cfg.dry_run:
            print("\n(dry run: not added to summary.csv)")
        else:
            row = dict(run=self.dir.name, **settings_record(cfg), val_images=cfg.val_images)
            row["UNFREEZE_SCHEDULE"] = schedule_text(cfg.unfreeze_schedule)  # as the flag reads
            for key in ("best_val_acc", "test_acc", "epochs_run", "minutes"):
                row[key] = round(results[key], 4)
            print_runs(add_to_summary(cfg.output_dir, row))
        (self.dir / "last.pt").unlink()  # only needed to resume: a finished run keeps best.pt
        print(f"\nfiles in {files_in(self.dir)}")
        return 0


def make_run_folder(cfg):
    """OUTPUT_DIR/<run name>, made by this process: mkdir is atomic, so of two runs started in the
    same second each gets a folder of its own (-2, -3...)."""
    name = cfg.run_name or default_run_name(cfg)
    run_dir = cfg.output_dir / name
    number = 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            if cfg.run_name:
                raise SettingError(f"--run-name: {run_dir} exists; choose another name") from None
        except OSError as error:
            raise SettingError(
                f"OUTPUT_DIR (--output-dir): cannot make {run_dir}: {error}"
            ) from None
        number += 1
        run_dir = cfg.output_dir / f"{name}-{number}"


def default_run_name(cfg):
    if cfg.dry_run:
        return time.strftime("%m%d-%H%M%S_dry-run")
    settings = f"{cfg.freeze_until}_{cfg.backbone_lr:.0e}_{cfg.head_lr:.0e}_{cfg.image_size}px"
    return time.strftime("%m%d-%H%M%S_") + settings


def files_in(folder):
    names = sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
    return f"{folder}: {' '.join(names)}"


def resume_command(run, *more):
    """The command that goes on with a run from its last.pt. A resume given a new EPOCHS, DATASET
    or DATA_DIR repeats them: until an epoch of this process completes, last.pt holds the old ones,
    and a pasted `--resume RUN` alone would train to the old EPOCHS, or look for the data where it
    was. An OUTPUT_DIR given is repeated too: last.pt's is not read back; summary.csv is there."""
    return command("--resume", run.dir, *more, *run.cfg.resume_flags)


def next_step():
    """What a stop keeps, and the command that goes on from it."""
    run = active.run
    if run is None:  # in the settings, the data or the model: a resumed run's folder is as it was
        return "\nstopped before training began: run the same command again."
    if (run.dir / "last.pt").exists():
        return f"\nkept in {files_in(run.dir)}\nresume with: {resume_command(run)}"
    return "\nno epoch was completed and saved, so nothing to resume: run the same command again."


def exit_code(interrupt):
    return 128 + (signal.SIGTERM if interrupt.args == ("SIGTERM",) else signal.SIGINT)


# --- Files: every write is atomic, so a crash, Ctrl-C or a full disk never leaves half a file -----
def save(obj, path):
    """torch.save into memory, then written() to the file. Not torch.save(obj, file): it wraps a
    full disk's error in its own ("unexpected pos"), and if Ctrl-C cuts it short, its writer ends
    the file as Python exits, after written() closed it: an abort. This buffer stays open."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with written(path) as file:
        file.write(buffer.getbuffer())


def write_text(path, text):
    with written(path) as file:
        file.write(text.encode())


@contextmanager
def written(path):
    """A file to write under a temporary name, renamed over `path` once complete: readers see the
    old file or the new one, never half of one. A full disk is one line, wherever it fills."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        replace(temporary, path)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        temporary.unlink(missing_ok=True)


def replace(source, target):
    """os.replace, tried again for a second when refused, as pip does: on Windows an antivirus
    scan, the search indexer or OneDrive may hold a file just written for a moment."""
    for _ in range(4):
        try:
            os.replace(source, target)
            return
        except PermissionError:  # "Access is denied", or a file in use (WinError 5, 32)
            time.sleep(0.25)
    os.replace(source, target)  # a file held longer (open in Excel, say): write_error() tells


def write_error(path, error):
    """One line: the file not written, what is kept, and the command that goes on once the cause
    is gone."""
    kept = "No epoch was saved"  # and the new run's folder is removed: remove_unfinished_folder()
    then = "then run the same command again"
    run = active.run
    if run is not None and (run.dir / "last.pt").exists():
        kept = "The files of the last completed epoch are intact"
        then = f"then resume: {resume_command(run)}"
    cause = f"could not write {path} ({error.strerror})"  # Colab's Drive gone: not connected
    if isinstance(error, PermissionError):  # Excel on Windows holds the file, or it is read-only
        cause = f"could not write {path} ({error.strerror}: open in another program? read-only?)"
    action = "fix that"
    if error.errno in DISK_FULL:
        cause = f"the disk is full: could not write {path}"
        action = "free some space"
    return RunError(f"{cause}. {kept}: {action}, {then}")


def csv_text(columns, rows, dialect="excel", header=True):
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="", dialect=dialect, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


# --- summary.csv: a row per finished run, in a file that is the learner's too ---------------------
def add_to_summary(output_dir, row):
    """Append this run's row to OUTPUT_DIR/summary.csv in one write, so that runs finishing
    together lose none, in the file's own layout (a spreadsheet's semicolons, say). A file this
    cannot read is moved aside. Returns the file's rows."""
    path = output_dir / "summary.csv"
    row = {key: str(value) for key, value in row.items()}  # as read back: text
    rows, columns, dialect, text = read_summary(path, row)
    added = csv_text(columns or list(row), [row], dialect, header=not columns)
    if text and not text.endswith("\n"):  # a spreadsheet may leave out the last line's end
        added = "\n" + added
    try:
        output_dir.mkdir(parents=True, exist_ok=True)  # a resume's --output-dir may be new
        with open(path, "a", encoding="utf-8", newline="") as file:
            file.write(added)
    except OSError as error:
        raise write_error(path, error) from None
    return rows + [row]


def read_summary(path, row):
    """summary.csv's (rows, columns, dialect, text), with a byte-order mark, semicolons or tabs.
    A file without a column this run fills is moved aside, never overwritten, with one line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: the byte-order mark Excel writes
        if not text:  # none yet, or another run is writing its first row
            return [], [], "excel", ""
        dialect = csv.Sniffer().sniff(text.partition("\n")[0], delimiters=",;\t")
        reader = csv.DictReader(io.StringIO(text), restval="", dialect=dialect)
        rows = list(reader)
        problems = [f"no column {name}" for name in row if name not in reader.fieldnames]
    except FileNotFoundError:
        return [], [], "excel", ""
    except (UnicodeDecodeError, csv.Error) as error:
        problems = [str(error)]
    if problems:
        aside = path.with_name(f"summary.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        path.rename(aside)
        print(f"note: could not read {path} ({problems[0]}): moved it to {aside.name}")
        return [], [], "excel", ""
    return rows, reader.fieldnames, dialect, text


def number(text):
    """A figure as a spreadsheet may save it: '0.853', '85.3%', '0,853'. None if it is none."""
    text = (text or "").strip().replace(",", ".")
    scale = 1
    if text.endswith("%"):
        text = text[:-1]
        scale = 100
    try:
        return float(text) / scale
    except ValueError:
        return None


def print_runs(rows, shown=8):
    """The last runs of summary.csv, each with the settings where it differs from this one; then
    this run against the earlier run on the same data that differs from it least."""
    runs = [row for row in rows if number(row.get("best_val_acc")) is not None]  # no notes rows
    now = runs[-1]
    names = [name for name in SETTINGS if name not in WHERE]
    changes = [[name for name in names if row.get(name) != now[name]] for row in runs]
    last = f"the last {min(shown, len(runs))} of {len(runs)} runs in summary.csv"
    if len(runs) == 1:
        last = "the first run in summary.csv"  # not "the last 1 of 1 runs"
    print(f"\n{last} (val acc: the best epoch's, on the validation split)")
    print(f"{'val acc':>8}{'test acc':>9}{'epochs':>7}{'minutes':>8}  run: where it differs")
    for row, changed in zip(runs[-shown:], changes[-shown:], strict=True):
        figures = f"{percent(row, 'best_val_acc'):>8}{percent(row, 'test_acc'):>9}"
        figures += f"{row.get('epochs_run'):>7}{row.get('minutes'):>8}"
        differs = " ".join(f"{name}={row.get(name)}" for name in changed) or "the same settings"
        if row is now:
            differs = "this run"
        print(f"{figures}  {row['run']}: {differs}")
    earlier = [i for i, row in enumerate(runs[:-1]) if row.get("DATASET") == now["DATASET"]]
    if earlier:
        fewest = min(len(changes[i]) for i in earlier)
        nearest = max(i for i in earlier if len(changes[i]) == fewest)  # the latest on a tie
        print_comparison(runs[nearest], now, changes[nearest])


def percent(row, key):
    value = number(row.get(key))
    if value is None:
        return "?"
    return f"{value:.1%}"


def print_comparison(before, now, changed):
    """This run against an earlier one, by the validation accuracy of their best epochs, with the
    sampling error of the validation set named as such."""
    changes = [f"{name} {before.get(name)} -> {now[name]}" for name in changed]
    gap = 100 * (number(now["best_val_acc"]) - number(before["best_val_acc"]))
    minutes = ""
    before_minutes = number(before["minutes"]) or 0  # 0 for a run under 0.3 s, or a cleared cell
    if before_minutes > 0:
        minutes = f", {number(now['minutes']) / before_minutes:.1f}x the minutes"
    images = int(now["val_images"])
    # Two standard errors of an accuracy on n images, with Agresti and Coull's 2 right and 2 wrong
    # added: a small validation set at 100% (or 0%) still has an error, not ±0.0
    p = (number(now["best_val_acc"]) * images + 2) / (images + 4)
    error = 200 * math.sqrt(p * (1 - p) / (images + 4))
    text = (
        f"vs {before['run']} ({', '.join(changes) or 'the same settings'}): validation accuracy of"
        f" the best epoch {gap:+.1f} points{minutes}. Each figure is ±{error:.1f} points: the"
        f" sampling error of the {images:,} validation images (two standard errors). Runs with"
        " another --seed show how much runs differ."
    )
    print("\n" + textwrap.fill(text, 100))


# --- Reports and pictures: the block table, the test per class, inputs, curves, mistakes ----------
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
    """Each class's test accuracy, and the class it is most often taken for: a line a class, for
    any number of classes (results.json keeps the whole confusion matrix)."""
    width = max([14] + [len(name) + 1 for name in classes])  # a folder's names may be long
    print(f"\n{'class':<{width}}{'test images':>11}{'accuracy':>10}  most often taken for (images)")
    per_class = {}
    for c, name in enumerate(classes):
        images = confusion[c].sum().item()
        per_class[name] = None  # no test image
        shown = "n/a"
        if images:
            per_class[name] = confusion[c, c].item() / images
            shown = f"{per_class[name]:.1%}"
        mistakes = confusion[c].clone()
        mistakes[c] = 0
        taken_for = "-"
        if mistakes.max() > 0:
            taken_for = f"{classes[mistakes.argmax()]} ({mistakes.max()})"
        print(f"{name:<{width}}{images:>11,}{shown:>10}  {taken_for}")
    return per_class


def new_figure(**options):
    """A matplotlib Figure (no pyplot: it works without a display), or None: it is optional."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(layout="constrained", **options)


def save_figure(figure, path):
    with written(path) as file:
        figure.savefig(file, format="png", dpi=100)


def image_grid(figure, images, titles, title, path):
    """A picture of up to 16 images (N, height, width, 3), each with its title."""
    for axis in figure.subplots(4, 4).flat:
        axis.set_axis_off()
    for axis, image, text in zip(figure.axes, images, titles, strict=False):
        axis.imshow(image.numpy())
        lines = [textwrap.fill(line, 22) for line in text.splitlines()]  # long class names
        axis.set_title("\n".join(lines), fontsize=10, parse_math=False)  # a class named $5
    figure.suptitle(f"{path.parent.name}: {title}")
    save_figure(figure, path)


def draw_inputs(run):
    """inputs.png: 16 training images as the model gets them: augmented, at IMAGE_SIZE."""
    figure = new_figure(figsize=(8, 9))
    if figure is None:
        return
    images, labels = run.train_set.tensors
    every = max(1, len(labels) // 16)  # spread out: a folder's images come class by class
    state = run.inputs.generator.get_state()  # the picture must not change what training draws
    run.inputs.train()
    with torch.no_grad():
        x = run.inputs(images[::every][:16].to(run.inputs.mean.device))
    run.inputs.generator.set_state(state)
    pixels = (x * run.inputs.std + run.inputs.mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()
    titles = [run.cfg.classes[label] for label in labels[::every][:16]]
    title = "training inputs as the model sees them"
    image_grid(figure, pixels, titles, title, run.dir / "inputs.png")


def save_pictures(run, test_set, predictions):
    """curves.png: loss and accuracy per epoch; mistakes.png: the 16 test images the model got
    most confidently wrong. Drawn only where matplotlib (optional) is installed."""
    curves = new_figure(figsize=(10, 4))
    if curves is None:
        print("(no pictures: `pip install matplotlib` draws inputs.png, curves.png, mistakes.png)")
        return
    epochs = [row["epoch"] for row in run.history]
    best = next(row for row in run.history if row["epoch"] == run.best_epoch)
    for axis, metric in zip(curves.subplots(1, 2), ["loss", "acc"], strict=True):
        axis.plot(epochs, [row[f"train_{metric}"] for row in run.history], "o-", label="train")
        axis.plot(epochs, [row[f"val_{metric}"] for row in run.history], "o-", label="validation")
        axis.plot(best["epoch"], best[f"val_{metric}"], "*", markersize=16, label="best epoch")
        for epoch, block in run.cfg.unfreeze_schedule.items():
            if epoch <= epochs[-1]:  # not an unfreezing that early stopping came before
                axis.axvline(epoch - 0.5, color="grey", linestyle="--", label=f"unfreeze {block}")
        axis.set(xlabel="epoch", title=metric.replace("acc", "accuracy"))
        axis.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # whole epochs
        axis.legend(fontsize=8)
    curves.suptitle(f"run {run.dir.name}")
    save_figure(curves, run.dir / "curves.png")
    images, labels = test_set.tensors
    predicted = predictions[:, 0].long()
    confidence = predictions[:, 1]
    wrong = (predicted != labels).nonzero().flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:16]
    classes = run.cfg.classes
    titles = [
        f"{classes[labels[i]]}\n-> {classes[predicted[i]]} ({confidence[i]:.0%})" for i in worst
    ]
    pixels = images[worst].permute(0, 2, 3, 1)
    title = "the most confidently wrong test images"
    image_grid(new_figure(figsize=(8, 9)), pixels, titles, title, run.dir / "mistakes.png")


# --- Progress, signals, and the command line's entry point ----------------------------------------
def progress_bar(iterable, desc):
    """tqdm's bar: live on a terminal (Colab's `!python` runs in one, a pseudo-terminal) and in a
    notebook's cell; in a log (`> log`, `| tee`) and IDLE's shell, drawn every 30 seconds, and only
    for a pass that takes longer."""
    interval = 0.1
    live = sys.stderr.isatty() or IN_A_KERNEL  # a kernel's cell draws the bar as a terminal does
    if not live or "idlelib" in sys.modules:  # IDLE's shell says it is one, but piles bars up
        interval = 30
    return tqdm(
        iterable, desc, leave=False, mininterval=interval, maxinterval=interval, delay=interval
    )


def sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt("SIGTERM")  # a scheduler's stop, or `timeout`: handled as Ctrl-C


def cli(argv=()):
    """main(), with exit codes: 0 done, 1 something outside the code failed, 2 a bad setting,
    130 Ctrl-C, 143 SIGTERM. Wherever it stops, the run folder is resumable, finished, or gone."""
    previous = signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)
    try:
        return main(argv)
    except SettingError as error:
        return fail(f"fine_tuning.py: error: {error}", 2)
    except (RunError, FloatingPointError) as error:  # FloatingPointError: a nan or inf loss
        return fail(f"error: {error}", 1)
    except KeyboardInterrupt as interrupt:  # before an epoch completed, or a second Ctrl-C
        return say(next_step(), exit_code(interrupt))
    except BrokenPipeError:  # a line to print, whose reader is gone: output_gone()
        return output_gone(next_step(), 1)
    except (EOFError, pickle.UnpicklingError) as error:  # torch.load() of a damaged file
        return weights_not_readable(error)
    except (urllib.error.URLError, ConnectionError) as error:  # the weights' (CIFAR-10's: its own)
        if active.run is not None:
            raise  # the downloads are done: a DataLoader worker's pipe, say
        return weights_not_downloaded(download_reason(error))
    except OSError as error:  # a download, or CIFAR-10's unpacking; the run's files: write_error()
        return disk_full(error)
    except RuntimeError as error:
        return known_runtime_error(error)
    finally:
        remove_unfinished_folder()
        signal.signal(signal.SIGTERM, previous)


def disk_full(error):
    """One line for a disk that filled during a download, with the room the downloads need. Any
    other OSError keeps its traceback, which names the file and the cause."""
    if error.errno not in DISK_FULL:
        raise error
    weights = cached_weights().parent
    room = f"CIFAR-10 takes about 355 MB in DATA_DIR, the ImageNet weights 45 MB in {weights}"
    full = f"the disk is full ({error.strerror}): {room}"
    return fail(f"error: {full}. Free some space, then run the same command again", 1)


def cached_weights():
    """Where torchvision keeps the ImageNet weights it downloads: torch's hub checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET.url).name


def known_runtime_error(error):
    """One line for torch's RuntimeErrors that are no bug; anything else keeps its traceback."""
    message = str(error)
    mac_gpu_full = "MPS backend out of memory" in message  # a RuntimeError, not CUDA's class
    ram_full = "DefaultCPUAllocator" in message  # Windows says so; Linux mostly kills the process
    if isinstance(error, torch.cuda.OutOfMemoryError) or mac_gpu_full or ram_full:
        device = "this machine" if ram_full else "the GPU"
        return fail(
            f"error: {device} ran out of memory. Try a smaller --batch-size or --image-size", 1
        )
    if message.startswith("invalid hash value"):  # torch.hub's check of the weights' file
        return weights_not_downloaded("the file arrived damaged: its hash is wrong")
    if message.startswith("PytorchStreamReader failed"):  # torch.load() of a cut zip file
        return weights_not_readable(error)
    if message.startswith("DataLoader worker"):
        return worker_died(error)
    if "no kernel image is available" in message:  # CUDA: this torch has none for this GPU
        return no_kernels_for_this_gpu()
    raise error


def no_kernels_for_this_gpu():
    """One line: torch is built for a list of GPU generations (compute capabilities), and this GPU
    is not on it: too old for this build (a Kaggle P100, a GTX 1080), or too new for an old one."""
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    built = " ".join(torch.cuda.get_arch_list())
    return fail(
        f"error: this torch ({torch.__version__}) has no kernels for this GPU ({name}, compute"
        f" capability {major}.{minor}), only for {built}. Install a torch built for it (torch's"
        " warning above may name one: https://pytorch.org/get-started/locally/), or another GPU",
        1,
    )


def weights_not_downloaded(reason):
    """One line: the ImageNet weights' download failed (no network, cut short), and where a copy
    goes. torch.hub keeps no part of the file, so the next run downloads it anew."""
    file = cached_weights()
    where = f"put {file.name} ({IMAGENET.url}) in {file.parent}, or pass its path: --weights"
    reason = f"could not download the ImageNet weights ({reason})"
    return fail(f"error: {reason}. Without internet, {where} PATH. {works_offline()}", 1)


def weights_not_readable(error):
    """One line for a damaged file where torchvision reads the ImageNet weights: a copy put there
    by hand, as the line above asks (torch.hub downloads under another name until it has the
    whole file), cut short or a web page. Anywhere else, such an error keeps its traceback."""
    file = cached_weights()
    if active.run is not None or not file.exists():
        raise error
    return fail(
        f"error: cannot read the ImageNet weights {file}: the copy is damaged, or another file."
        f" Replace it, whole ({IMAGENET.url}), or delete it: the next run downloads it anew",
        1,
    )


def worker_died(error):
    """A DataLoader worker killed (out of memory, say): one line, and the command to go on."""
    if "Terminated" in str(error):  # SIGTERM to the process group ended the workers first
        return say(next_step(), 128 + signal.SIGTERM)
    then = "Try --num-workers 0"
    if active.run is not None and (active.run.dir / "last.pt").exists():
        then = f"Go on without workers: {resume_command(active.run, '--num-workers', 0)}"
    worker = str(error).splitlines()[0]
    return fail(
        f"error: a DataLoader worker died ({worker}), perhaps for lack of memory. {then}", 1
    )


def remove_unfinished_folder():
    """A run folder this process made, in which no epoch completed, holds nothing to keep."""
    run = active.run
    active.run = None  # the next cli() starts afresh; in a notebook, the run's memory is freed
    if run is None or not run.new or (run.dir / "last.pt").exists():
        return
    if not (run.dir / "results.json").exists():
        shutil.rmtree(run.dir)


def say(text, code):
    """print(text), or where the output's reader is gone, output_gone(). Returns code."""
    try:
        print(text)
    except BrokenPipeError:
        return output_gone(text, code)
    return code


def output_gone(text, code):
    """`python fine_tuning.py | tee log`, then Ctrl-C, which ends tee too: the lines left to print
    go to stderr, the terminal, saying so; stdout to nowhere, where Python's last flush succeeds."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    gone = "the output's reader is gone (Ctrl-C ends `| tee` too; `| tee -i` lives on)"
    return fail(f"error: {gone}{text}", code)


def fail(message, code):
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if torch_version < (2, 5):
        sys.exit(f"error: this script needs torch 2.5 or newer, not {torch.__version__}")
    if PASTED:  # sys.argv is the notebook kernel's, and sys.exit() would show an exception
        cli()
    elif IN_A_KERNEL:  # %run fine_tuning.py ARGS: the kernel's stdout; no sys.exit(), as above
        cli(sys.argv[1:])
    else:
        if isinstance(sys.stdout, io.TextIOWrapper):  # not IDLE's shell, nor pythonw's None
            # To a log or `| tee`: each line as it is printed, and what the log's encoding lacks
            # (a class name's ł in Windows' cp1252) escaped, \u0142, as Python's stderr does
            sys.stdout.reconfigure(line_buffering=True, errors="backslashreplace")
        if NOTEBOOK_SHELL:  # the kernel's matplotlib backend, inline, which this Python may lack
            os.environ["MPLBACKEND"] = "agg"  # (`import matplotlib` fails): files need agg alone
        sys.exit(cli(sys.argv[1:]))
