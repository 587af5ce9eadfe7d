"""In-process building blocks for tests that call fine_tuning.py's functions directly."""
from types import SimpleNamespace

import torch

import fine_tuning as ft


def cfg_from_constants(**changes):
    """The script's settings as run() sees them: the constants, checked, with `changes` applied."""
    settings = ft.check_settings({name: getattr(ft, name) for name in ft.SETTINGS})
    return SimpleNamespace(**{**{name.lower(): value for name, value in settings.items()}, **changes})


def small_cfg(**changes):
    return cfg_from_constants(**{"image_size": 32, "batch_size": 16, "weights": "none", **changes})


def use_synthetic_data(monkeypatch, n_train=200, n_test=40):
    """Make the script load a small synthetic CIFAR-10 instead of the real files (for in-process runs)."""
    monkeypatch.setattr(ft, "load_cifar10", lambda data_dir: ft.synthetic_cifar10(0, n_train, n_test))


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
