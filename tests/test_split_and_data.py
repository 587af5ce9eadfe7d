"""The validation split is stratified, disjoint, reproducible, and never augmented."""
import torch

import fine_tuning as ft
from helpers import small_setup

CIFAR_LABELS = torch.arange(50_000) % 10


def test_default_split_is_45000_train_and_5000_validation_500_per_class():
    train, val = ft.stratified_split(CIFAR_LABELS, 0.1, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert torch.bincount(CIFAR_LABELS[val]).tolist() == [500] * 10
    assert torch.bincount(CIFAR_LABELS[train]).tolist() == [4_500] * 10


def test_split_parts_are_disjoint_and_cover_the_training_set():
    train, val = ft.stratified_split(CIFAR_LABELS, 0.1, seed=0)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(50_000))


def test_same_seed_same_split_other_seed_other_split():
    assert torch.equal(ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1], ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1])
    assert not torch.equal(ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1], ft.stratified_split(CIFAR_LABELS, 0.1, 1)[1])


def test_validation_and_test_images_reach_the_model_unaugmented():
    setup = small_setup()
    train_loader, val_loader, test_loader = setup.loaders
    (images, labels), _, _ = ft.synthetic_cifar10(0, n_train=200, n_test=40)
    _, val_idx = ft.stratified_split(labels, setup.cfg.val_fraction, setup.cfg.seed)
    seen = torch.cat([batch for batch, _ in val_loader])
    assert torch.equal(seen, images[val_idx])                   # the raw images, in order
    hw = setup.hw
    expected = (seen[:8].float() / 255 - 0.5) / 0.25             # normalised, nothing else
    assert torch.allclose(hw.inputs(seen[:8]), expected, atol=1e-5)
    assert torch.equal(hw.inputs(seen[:8]), hw.inputs(seen[:8]))  # deterministic


def test_training_augmentation_is_a_padded_random_crop_with_random_flip():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = ft.random_crop_flip(images, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    assert out.shape == images.shape and out.dtype == torch.uint8
    flips = 0
    for i in range(len(images)):
        crops = [(padded[i, :, t:t + 32, l:l + 32], flip) for t in range(9) for l in range(9) for flip in (0, 1)]
        matches = [flip for crop, flip in crops if torch.equal(out[i], crop.flip(2) if flip else crop)]
        assert matches, f"image {i} is not a crop of the padded original"
        flips += matches[0]
    assert 10 < flips < 54     # about half are flipped
    assert not torch.equal(out, images)


def test_resize_to_imagenet_size_happens_on_the_batch():
    hw = ft.Hardware(torch.device("cpu"), 224, [0.5] * 3, [0.25] * 3)
    x = hw.inputs(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
