"""In-process building blocks for tests that call fine_tuning.py's functions directly."""
import hashlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import fine_tuning as ft


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_images(n, rng, labels):
    """Noise plus a colour per class, so a few steps of training can learn something."""
    tints = np.random.default_rng(123).integers(0, 256, size=(10, 3, 1, 1))
    noise = rng.integers(0, 256, size=(n, 3, 32, 32))
    return ((tints[labels] + noise) // 2).astype(np.uint8).reshape(n, 3072)


def write_cifar10(root, per_batch=40, n_test=50, test_labels=None):
    """Write a small CIFAR-10 in the official cifar-10-batches-py pickle layout; return md5 sums."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(1, 6):
        labels = np.arange(per_batch) % 10
        files[f"data_batch_{i}"] = {"batch_label": f"training batch {i} of 5", "labels": labels.tolist(),
                                    "data": tiny_images(per_batch, rng, labels),
                                    "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
    labels = np.arange(n_test) % 10 if test_labels is None else np.asarray(test_labels)
    files["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                           "data": tiny_images(len(labels), rng, labels),
                           "filenames": [f"test_{j}.png" for j in range(len(labels))]}
    files["batches.meta"] = {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    sums = {}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return sums


def small_cfg(**changes):
    settings = ft.check_settings({name: getattr(ft, name) for name in ft.SETTINGS})
    cfg = SimpleNamespace(**{name.lower(): value for name, value in settings.items()})
    cfg.image_size, cfg.batch_size, cfg.weights = 32, 16, "none"
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def small_setup(freeze_until="layer2", n_train=200, **changes):
    """A ResNet18 (random weights), frozen as asked, with its optimizer and loaders on the CPU."""
    cfg = small_cfg(freeze_until=freeze_until, **changes)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = ft.build_model("none")
    ft.freeze(model, freeze_until)
    optimizer = ft.make_optimizer(ft.param_groups(model, cfg.backbone_lr, cfg.head_lr), device)
    hw = ft.Hardware(device, 32, [0.5] * 3, [0.25] * 3)
    train_data, test_data, classes = ft.synthetic_cifar10(0, n_train=n_train, n_test=40)
    loaders = ft.make_loaders(train_data, test_data, cfg, device)
    return SimpleNamespace(cfg=cfg, model=model, optimizer=optimizer, hw=hw, loaders=loaders,
                           classes=classes)


def snapshot(module):
    """Copies of every parameter and buffer (BatchNorm running statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_epochs(setup, epochs=1, max_batches=3, start=1):
    generator = torch.Generator().manual_seed(0)
    for epoch in range(start, start + epochs):
        ft.train_one_epoch(setup.model, setup.loaders[0], setup.optimizer, setup.hw, generator,
                           epoch, max_batches)


def trust_test_md5(sums):
    """Replace CIFAR-10's expected md5 sums by those of files we wrote (verification still runs)."""
    from torchvision import datasets
    datasets.CIFAR10.train_list = [[name, sums[name]] for name, _ in datasets.CIFAR10.train_list]
    datasets.CIFAR10.test_list = [[name, sums[name]] for name, _ in datasets.CIFAR10.test_list]
    datasets.CIFAR10.meta = {**datasets.CIFAR10.meta, "md5": sums[datasets.CIFAR10.meta["filename"]]}
