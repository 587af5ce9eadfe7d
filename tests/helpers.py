"""In-process building blocks for the tests that call fine_tuning.py's functions directly."""
from types import SimpleNamespace

import torch

import fine_tuning as ft


def settings(*args):
    """The settings as main() sees them: the constants, checked by the real parser, with flags applied."""
    return ft.parse_settings(["--image-size", "32", "--weights", "none", *map(str, args)])


def small_setup(*args, n_train=200):
    """A ResNet18 (random weights), frozen as the settings say, with its optimizer and loaders on the CPU."""
    cfg = settings("--batch-size", "16", *args)
    hw = ft.Hardware(cfg)
    torch.manual_seed(cfg.seed)
    model = ft.build_model("none")
    ft.freeze(model, cfg.freeze_until)
    optimizer = ft.make_optimizer(ft.param_groups(model, cfg), hw.device)
    images, labels = ft.synthetic_cifar10(0)[0]
    train_idx, val_idx = ft.stratified_split(labels[:n_train], cfg.val_fraction, cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[train_idx], labels[train_idx]), cfg.batch_size,
                                         sampler=torch.utils.data.RandomSampler(train_idx, generator=torch.Generator()))
    return SimpleNamespace(cfg=cfg, hw=hw, model=model, optimizer=optimizer, loader=loader)


def snapshot(module):
    """Copies of every parameter and buffer (BatchNorm running statistics included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_epochs(setup, epochs=1, max_batches=3, start=1):
    setup.cfg.max_batches = max_batches
    for epoch in range(start, start + epochs):
        ft.train_one_epoch(setup.model, setup.loader, setup.optimizer, setup.hw, epoch, setup.cfg)
