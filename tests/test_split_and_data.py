"""The validation split is stratified, disjoint, reproducible and never augmented; TRAIN_PER_CLASS keeps
a seeded subset of the training images and leaves validation alone."""
import torch

import fine_tuning as ft
from helpers import settings

CIFAR_LABELS = torch.arange(50_000) % 10


def test_default_split_is_45000_train_and_5000_validation_500_per_class():
    train, val = ft.stratified_split(CIFAR_LABELS, 0.1, seed=0)
    assert len(train) == 45_000 and len(val) == 5_000
    assert torch.bincount(CIFAR_LABELS[val]).tolist() == [500] * 10
    assert torch.bincount(CIFAR_LABELS[train]).tolist() == [4_500] * 10
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(50_000))


def test_same_seed_same_split_other_seed_other_split():
    assert torch.equal(ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1], ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1])
    assert not torch.equal(ft.stratified_split(CIFAR_LABELS, 0.1, 0)[1], ft.stratified_split(CIFAR_LABELS, 0.1, 1)[1])


def test_train_per_class_keeps_a_seeded_subset_and_the_same_validation_split():
    train_all, val_all = ft.stratified_split(CIFAR_LABELS, 0.1, 0)
    train, val = ft.stratified_split(CIFAR_LABELS, 0.1, 0, train_per_class=100)
    assert torch.equal(val, val_all)                                     # validation does not change
    assert torch.bincount(CIFAR_LABELS[train]).tolist() == [100] * 10
    assert set(train.tolist()) <= set(train_all.tolist())
    assert torch.equal(train, ft.stratified_split(CIFAR_LABELS, 0.1, 0, 100)[0])
    assert not torch.equal(train, ft.stratified_split(CIFAR_LABELS, 0.1, 1, 100)[0])
    assert train.tolist() != sorted(train_all.tolist())[:1000]           # a random subset, not the first ones


def test_validation_and_test_images_reach_the_model_unaugmented():
    hw = ft.Hardware(settings())
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(ft.model_inputs(images, hw), (images.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(ft.model_inputs(images, hw), ft.model_inputs(images, hw))      # deterministic


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
    hw = ft.Hardware(settings("--image-size", "224"))
    x = ft.model_inputs(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), hw)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32


def test_dry_run_data_is_large_enough_for_every_experiment():
    (images, labels), (test_images, test_labels), classes = ft.synthetic_cifar10(0)
    train, _ = ft.stratified_split(labels, ft.VAL_FRACTION, 0)
    assert torch.bincount(labels[train]).min() >= 100                  # --train-per-class 100 fits
    assert len(classes) == 10 and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
