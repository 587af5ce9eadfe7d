"""The lesson's claims, on its own functions: the split, the augmentation, the inputs, freezing,
frozen BatchNorm, the learning rates, gradual unfreezing, early stopping and mixed precision."""

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torchvision.transforms.v2 import functional as TF

import fine_tuning as ft


def small_model(freeze_until="layer2"):
    torch.manual_seed(0)
    model = ft.build_model("none")
    ft.freeze(model, freeze_until)
    return model


def small_loader(n=64, batch_size=16):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    dataset = TensorDataset(images, torch.arange(n) % 10)
    sampler = RandomSampler(dataset, generator=torch.Generator())
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=True)


def train(model, optimizer, frozen_bn="eval", amp_dtype=None, scaler=None, n=64):
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    prepare = ft.ImageNetInput(32)
    loader = small_loader(n)
    return ft.train_one_epoch(model, loader, optimizer, scaler, prepare, 0, frozen_bn, amp_dtype)


def adam(model, backbone_lr=1e-4, layer_lr_decay=1.0, head_lr=1e-3):
    lrs = ft.block_lrs(backbone_lr, layer_lr_decay, head_lr)
    return torch.optim.Adam(ft.param_groups(model, lrs), fused=True), lrs


def snapshot(module):
    """Copies of every parameter and buffer (BatchNorm's running statistics included)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def changed(before, module):
    return {
        key for key, value in module.state_dict().items() if not torch.equal(before[key], value)
    }


# --- Data -----------------------------------------------------------------------------------------
def test_the_default_split_is_45000_train_and_5000_validation_500_of_each_class():
    labels = torch.arange(50_000) % 10
    train_idx, val_idx = ft.stratified_split(labels, 0.1, seed=0)
    assert len(train_idx) == 45_000 and len(val_idx) == 5_000
    assert torch.bincount(labels[val_idx]).tolist() == [500] * 10
    assert not set(train_idx.tolist()) & set(val_idx.tolist())


def test_the_seed_fixes_the_split_and_train_per_class_keeps_the_same_validation_split():
    labels = torch.arange(50_000) % 10
    first = ft.stratified_split(labels, 0.1, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(first, ft.stratified_split(labels, 0.1, 0), strict=True)
    )
    assert not torch.equal(first[1], ft.stratified_split(labels, 0.1, seed=1)[1])
    few_train, few_val = ft.stratified_split(labels, 0.1, seed=0, train_per_class=100)
    assert torch.bincount(labels[few_train]).tolist() == [100] * 10
    assert torch.equal(few_val, first[1]) and set(few_train.tolist()) <= set(first[0].tolist())


def test_augmentation_is_randomcrop_32_padding_4_and_a_horizontal_flip():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augmented = ft.random_crop_flip(images, torch.Generator().manual_seed(0))
    flipped = 0
    for image, out in zip(images, augmented, strict=True):
        padded = TF.pad(image, [4])  # what transforms.v2.RandomCrop(32, padding=4) crops from
        crops = [TF.crop(padded, top, left, 32, 32) for top in range(9) for left in range(9)]
        plain = any(torch.equal(out, crop) for crop in crops)
        mirrored = any(torch.equal(out, TF.horizontal_flip(crop)) for crop in crops)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 10 < flipped < 54  # about half of the 64 images
    again = ft.random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(augmented, again)  # the generator decides: a resumed run augments alike


def test_inputs_are_normalised_with_imagenets_statistics_and_resized_on_the_batch():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    x = ft.ImageNetInput(32)(images)
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)
    assert ft.ImageNetInput(224)(images).shape == (2, 3, 224, 224)


# --- Freezing and frozen BatchNorm ----------------------------------------------------------------
def test_frozen_blocks_weights_and_batchnorm_statistics_do_not_change():
    model = small_model("layer2")
    before = snapshot(model)
    optimizer, _ = adam(model)
    train(model, optimizer)
    moved = changed(before, model)
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    assert not [key for key in moved if key.startswith(frozen)]  # weights and running statistics
    assert any(key.startswith("layer3.") and "running_mean" in key for key in moved)
    assert any(key.startswith("fc.") for key in moved)


def test_frozen_batchnorm_stays_in_eval_mode_after_model_train():
    model = small_model("layer2")
    ft.set_train_mode(model, "eval")
    assert not model.bn1.training and not model.layer2[0].bn1.training
    assert model.layer3[0].bn1.training and model.training


def test_frozen_bn_train_adapts_the_frozen_blocks_statistics_but_never_their_weights():
    model = small_model("layer2")
    before = snapshot(model)
    optimizer, _ = adam(model)
    train(model, optimizer, frozen_bn="train")
    moved = changed(before, model)
    assert any(key.startswith("layer1.") and "running_var" in key for key in moved)
    frozen_weights = [
        k for k in moved if k.startswith(("conv1.", "layer1.")) and "running" not in k
    ]
    assert frozen_weights == [k for k in frozen_weights if "num_batches_tracked" in k]


def test_freeze_none_trains_every_block_and_layer4_is_feature_extraction():
    everything = small_model("none")
    assert all(p.requires_grad for p in everything.parameters())
    head_only = small_model("layer4")
    trainable = [name for name, block in ft.blocks(head_only).items() if ft.is_trainable(block)]
    assert trainable == ["fc"]
    assert sum(p.numel() for p in head_only.parameters() if p.requires_grad) == 5_130


# --- Learning rates and gradual unfreezing --------------------------------------------------------
def test_each_parameter_group_gets_its_learning_rate_and_no_frozen_parameter_is_given():
    model = small_model("layer2")
    optimizer, _ = adam(model)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"layer3": 1e-4, "layer4": 1e-4, "fc": 1e-3}
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert given == {id(p) for p in model.parameters() if p.requires_grad}


def test_the_head_learns_with_10x_the_backbones_learning_rate():
    # Adam's first step moves each weight by about lr, whatever its gradient: steps show the rates.
    model = small_model("layer3")
    optimizer, _ = adam(model)
    before = snapshot(model)
    ft.set_train_mode(model)
    x = ft.ImageNetInput(32)(small_loader().dataset.tensors[0][:16])
    torch.nn.functional.cross_entropy(model(x), torch.arange(16) % 10).backward()
    optimizer.step()
    head = (model.fc.weight.detach() - before["fc.weight"]).abs()
    backbone = (model.layer4[0].conv1.weight.detach() - before["layer4.0.conv1.weight"]).abs()
    moved = backbone[backbone > 0]  # behind a ReLU, many backbone weights get no gradient at all
    assert (head.median() / moved.median()).item() == pytest.approx(10, rel=0.05)


def test_layer_lr_decay_gives_each_block_below_layer4_a_smaller_rate():
    lrs = ft.block_lrs(1e-4, 0.5, 1e-3)
    assert lrs["fc"] == 1e-3 and lrs["layer4"] == 1e-4 and lrs["layer3"] == 5e-5
    assert lrs["stem"] == pytest.approx(1e-4 * 0.5**4)


def test_unfreezing_releases_the_block_and_every_frozen_block_after_it_at_their_own_rates():
    model = small_model("layer4")
    optimizer, lrs = adam(model, layer_lr_decay=0.5)
    before = snapshot(model)
    assert ft.unfreeze(model, optimizer, "layer3", lrs) == ["layer3", "layer4"]
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"fc": 1e-3, "layer3": 5e-5, "layer4": 1e-4}
    train(model, optimizer)
    moved = changed(before, model)
    assert any(k.startswith("layer3.") and k.endswith("weight") for k in moved)
    assert not [k for k in moved if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))]


# --- Early stopping -------------------------------------------------------------------------------
def test_early_stopping_stops_after_patience_epochs_without_an_improvement_of_min_delta():
    stopper = ft.EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.step(1.0, 0.5, epoch=1)
    assert not stopper.step(0.995, 0.5, epoch=2)  # better, but by less than min_delta
    assert not stopper.should_stop
    assert not stopper.step(1.2, 0.5, epoch=3)
    assert stopper.should_stop and stopper.best_epoch == 1


def test_an_improvement_resets_the_count_and_val_acc_is_maximised():
    stopper = ft.EarlyStopping(patience=2, min_delta=0, monitor="val_acc")
    assert stopper.step(2.0, 0.5, 1) and not stopper.step(1.0, 0.4, 2)
    assert stopper.step(3.0, 0.6, 3) and stopper.bad_epochs == 0 and stopper.best_epoch == 3


# --- Mixed precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_the_training_step_runs_under_autocast_and_the_gradient_scaler(amp_dtype):
    # The CPU runs both, as a GPU would: bf16 without the scaler, fp16 with it.
    model = small_model("layer2")
    before = snapshot(model)
    optimizer, _ = adam(model)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    loss, accuracy = train(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, n=32)
    assert 0 < loss < 10 and 0 <= accuracy <= 1
    assert not [key for key in changed(before, model) if key.startswith(("conv1.", "layer1."))]


@pytest.mark.parametrize(
    "capability, dtype, name",
    [((9, 0), torch.bfloat16, "H100"), ((8, 0), torch.bfloat16, "A100"),
     ((7, 5), torch.float16, "Tesla T4"), ((7, 0), torch.float16, "V100"), ((6, 1), None, "P40")],
)  # fmt: skip
def test_a_gpu_gets_the_precision_its_compute_capability_allows(
    monkeypatch, capsys, capability, dtype, name
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True
    )  # as a T4's says
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    device, amp_dtype = ft.choose_device(224)
    assert device.type == "cuda" and amp_dtype == dtype
    precision = str(dtype or torch.float32).replace("torch.", "")
    major, minor = capability
    expected = f"device: cuda ({name}, compute capability {major}.{minor})   image size: 224px"
    assert capsys.readouterr().out == f"{expected}   precision: {precision}\n"
