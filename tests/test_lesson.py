"""The lesson's claims, on its own functions: the split, the augmentation, the inputs, a folder of
images, the new head, freezing, frozen BatchNorm, the learning rates, gradual unfreezing, early
stopping, divergence and mixed precision."""

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import fine_tuning as ft


def small_model(freeze_until="layer2"):
    torch.manual_seed(0)
    model = ft.build_model(10, "none")
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
    ft.set_train_mode(model, frozen_bn)
    loader = small_loader(n, batch_size=min(n, 16))
    return ft.train_one_epoch(model, loader, optimizer, scaler, inputs(), amp_dtype)


def inputs(image_size=32):
    return ft.ModelInput(image_size, seed=0)


def adam(model, backbone_lr=1e-4, layer_lr_decay=1.0, head_lr=1e-3):
    lrs = ft.block_lrs(backbone_lr, layer_lr_decay, head_lr)
    return torch.optim.Adam(ft.param_groups(model, lrs), fused=True), lrs


def fixed_logits_model(logits, side):
    """A model that gives every image (N, 3, side, side) the same `logits`: zero weights and those
    as the bias, which a learning rate of 0 keeps."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, len(logits)))
    torch.nn.init.zeros_(model[1].weight)
    model[1].bias.data.copy_(torch.as_tensor(logits))
    return model


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
    train_idx, val_idx = ft.stratified_split(labels, 0.1)
    assert len(train_idx) == 45_000 and len(val_idx) == 5_000
    assert torch.bincount(labels[val_idx]).tolist() == [500] * 10
    assert not set(train_idx.tolist()) & set(val_idx.tolist())


def test_every_run_gets_the_same_split_and_train_per_class_keeps_its_validation_split():
    labels = torch.arange(50_000) % 10
    first = ft.stratified_split(labels, 0.1)
    torch.manual_seed(123)  # as SEED does: the split does not depend on it
    again = ft.stratified_split(labels, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    few_train, few_val = ft.stratified_split(labels, 0.1, train_per_class=100)
    assert torch.bincount(labels[few_train]).tolist() == [100] * 10
    assert torch.equal(few_val, first[1]) and set(few_train.tolist()) <= set(first[0].tolist())


def test_every_training_step_has_batch_size_images_and_evaluation_sees_every_image():
    dataset = TensorDataset(torch.zeros(65, 3, 32, 32, dtype=torch.uint8), torch.arange(65) % 10)
    train_loader, val_loader, test_loader = ft.make_loaders(dataset, dataset, dataset, 32, 0, 0)
    assert [len(labels) for _, labels in train_loader] == [32, 32]  # the 65th image waits
    assert [len(labels) for _, labels in val_loader] == [64, 1]  # twice the batch, every image
    assert [len(labels) for _, labels in test_loader] == [64, 1]
    # Why: BatchNorm in train mode cannot normalise a batch of one image (at 32 px, one value)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        small_model().train()(torch.zeros(1, 3, 32, 32))


def test_augmentation_of_small_images_is_randomcrop_32_padding_4_and_a_horizontal_flip():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).float() / 255
    augmented = ft.random_crop_flip(images, torch.Generator().manual_seed(0))
    flipped = 0
    offsets = set()  # (top, left) of each crop found
    for image, out in zip(images, augmented, strict=True):
        padded = TF.pad(image, [4])  # what transforms.v2.RandomCrop(32, padding=4) crops from
        crops = {
            (top, left): TF.crop(padded, top, left, 32, 32) for top in range(9) for left in range(9)
        }
        plain = [offset for offset, crop in crops.items() if torch.equal(out, crop)]
        mirrored = [
            offset for offset, crop in crops.items() if torch.equal(out, TF.horizontal_flip(crop))
        ]
        assert plain or mirrored
        flipped += bool(mirrored) and not plain
        offsets.update(plain + mirrored)
    assert 10 < flipped < 54  # about half of the 64 images
    tops = {top for top, _ in offsets}
    lefts = {left for _, left in offsets}
    assert tops == lefts == set(range(9))  # 0 to 8: both edges of the padding reached
    again = ft.random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(augmented, again)  # the generator decides: a resumed run augments alike


def test_augmentation_of_photos_is_a_random_resized_crop_of_35_to_100_percent_and_a_flip():
    # Each column of the image holds its own number, so a crop's columns tell where it came from.
    columns = torch.arange(96.0).expand(8, 3, 96, 96)
    augmented = ft.random_resized_crop_flip(columns, torch.Generator().manual_seed(0))
    assert augmented.shape == (8, 3, 96, 96)
    widths = []
    for image in augmented:
        row = image[0, 0]
        widths.append(abs(row[-1] - row[0]).item() + 1)  # the crop's width, resized to 96
        assert row.min() >= 0 and row.max() <= 95
    assert min(widths) >= round(96 * math.sqrt(0.35 * 3 / 4)) and max(widths) <= 96
    flipped = [image[0, 0, 0] > image[0, 0, -1] for image in augmented]
    assert any(flipped) and not all(flipped)


def test_inputs_are_normalised_with_imagenets_statistics_resized_and_augmented_in_train_mode_only():
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    x = inputs(32).eval()(images)
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)
    assert inputs(224).eval()(images).shape == (2, 3, 224, 224)
    noise = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    module = inputs(32)
    assert torch.equal(module.eval()(noise), module(noise))  # eval mode: never augmented
    assert not torch.equal(module.train()(noise), module.eval()(noise))


def test_images_up_to_64_px_get_the_padded_crop_and_larger_ones_the_resized_crop():
    # White images: a crop of the padded image brings in black, a resized crop never does
    for size, padded in [(32, True), (64, True), (65, False), (224, False)]:
        white = torch.full((16, 3, size, size), 255, dtype=torch.uint8)
        x = inputs(size).train()(white)  # normalised: white is above 0, black below
        assert bool(x.min() < 0) == padded, size


def write_images(folder):
    """Two classes of images as a learner's photos come: sizes, modes and formats of all kinds."""
    shapes = [((120, 90), "RGB", "jpg"), ((100, 100), "L", "png"), ((90, 140), "RGBA", "png")]
    shapes += [((300, 200), "P", "png"), ((64, 48), "L", "jpg")]
    for c, name in enumerate(["cats", "dogs"]):
        (folder / name).mkdir(parents=True)
        for i, (size, mode, suffix) in enumerate(shapes):
            Image.new("RGB", size, (200 * c, 120, 40 * i)).convert(mode).save(
                folder / name / f"{i}.{suffix}"
            )
        (folder / name / "notes.txt").write_text("not an image: ImageFolder skips it")


def test_a_folder_of_images_of_any_size_and_mode_becomes_one_uint8_tensor(tmp_path):
    write_images(tmp_path)
    dataset, classes = ft.load_image_folder(tmp_path, 64)
    images, labels = dataset.tensors
    assert classes == ["cats", "dogs"] and labels.tolist() == [0] * 5 + [1] * 5
    assert images.shape == (10, 3, 64, 64) and images.dtype == torch.uint8
    assert images[5:, 0].float().mean() > 150 > images[:5, 0].float().mean()  # red: the dogs


def test_a_phones_photo_is_read_upright(tmp_path):
    # Phones save a photo as the sensor saw it, with an EXIF tag saying how to turn it (6: 90°).
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "sideways.jpg", exif=exif)
    assert ft.open_rgb(tmp_path / "sideways.jpg").size == (40, 60)


def test_a_photo_with_odd_exif_tags_is_read_upright_too(tmp_path):
    # Some apps write EXIF tags of the wrong type (here the date, text, under the number of a tag
    # that holds a number). Pillow reads them, but ImageOps.exif_transpose() writes the EXIF back
    # for the turned image, and fails there: a traceback for a photo any viewer shows.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show upright
    exif[0x0132] = "2024:05:01 12:00:00"  # DateTime, text (type 2) ...
    data = exif.tobytes()  # in the byte order Pillow writes: 01 32 00 02 (MM) or 32 01 02 00 (II)
    data = data.replace(b"\x01\x32\x00\x02", b"\x01\x4e\x00\x02")  # ... as tag 334, NumberOfInks
    data = data.replace(b"\x32\x01\x02\x00", b"\x4e\x01\x02\x00")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(tmp_path / "odd.jpg", exif=data)
    assert Image.open(tmp_path / "odd.jpg").getexif()[334] == "2024:05:01 12:00:00"
    assert ft.open_rgb(tmp_path / "odd.jpg").size == (40, 60)


def test_a_big_jpeg_is_decoded_at_a_smaller_scale_that_still_covers_the_size(tmp_path):
    # A phone's 12 MP photo is read 4x faster at 1/8 scale (README, Your own images).
    y, x = np.mgrid[0:600, 0:800]
    pixels = np.stack([x * 255 // 800, y * 255 // 600, (x + y) * 255 // 1400], -1)
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / name / "photo.jpg", quality=95)
    photo = tmp_path / "cats" / "photo.jpg"
    assert ft.open_rgb(photo).size == (800, 600)
    assert ft.open_rgb(photo, size=64).size == (100, 75)  # 1/8: both sides still >= 64
    assert ft.open_rgb(photo, size=200).size == (400, 300)  # 1/2: 1/4 would leave 150 < 200
    dataset, _ = ft.load_image_folder(tmp_path, 64)
    to_tensor = v2.Compose([v2.Resize(64), v2.CenterCrop(64), v2.PILToTensor()])
    full_scale = to_tensor(ft.open_rgb(photo)).float()
    assert (dataset.tensors[0][0].float() - full_scale).abs().mean() < 2  # of 255: the same image


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    # Microscopes, X-ray machines and depth cameras save 0..65535; PIL's convert("RGB") clips
    # every value above 255, so an image of mid-grey 32,768 would come out white.
    levels = np.array([[0, 16_384], [32_768, 65_535]])
    Image.fromarray(levels.astype(np.uint16)).save(tmp_path / "scan.png")  # PNG: little-endian
    Image.frombytes("I;16B", (2, 2), levels.astype(">u2").tobytes()).save(tmp_path / "scan.tiff")
    for name in ("scan.png", "scan.tiff"):
        pixels = np.asarray(ft.open_rgb(tmp_path / name))
        assert pixels.shape == (2, 2, 3) and pixels[..., 0].tolist() == [[0, 64], [128, 255]]


def test_a_palette_image_with_transparency_is_read_without_pils_warning(tmp_path):
    # Icons and web graphics: a palette PNG whose colours each have an alpha ("bytes" transparency).
    image = Image.new("P", (4, 4), 1)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.save(tmp_path / "icon.png", transparency=bytes([0, 128]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL: "Palette images with Transparency ... RGBA images"
        pixels = np.asarray(ft.open_rgb(tmp_path / "icon.png"))
    assert pixels.shape == (4, 4, 3) and pixels[0, 0].tolist() == [0, 255, 0]


# --- The model and its new head -------------------------------------------------------------------
def test_the_new_head_has_an_output_per_class_and_any_resnet18_state_dict_is_a_start(tmp_path):
    torch.manual_seed(0)
    earlier = ft.build_model(10, "none")
    torch.save(earlier.state_dict(), tmp_path / "best.pt")  # an earlier run's best.pt: 10 classes
    model = ft.build_model(3, tmp_path / "best.pt")
    assert model.fc.out_features == 3 and model.fc.in_features == 512
    assert torch.equal(model.layer4[1].conv2.weight, earlier.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, earlier.bn1.running_var)


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
    x = inputs(32).eval()(small_loader().dataset.tensors[0][:16])
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


# --- Evaluation ----------------------------------------------------------------------------------
def test_evaluation_counts_each_image_once_in_the_confusion_matrix_for_any_number_of_classes():
    torch.manual_seed(0)
    model = ft.build_model(300, "none").eval()  # 90,000 cells: each (true, predicted) pair
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50) * 6  # 50 of the 300 classes
    with torch.no_grad():  # batch by batch, as evaluate() sees them: the same sums, bit for bit
        expected = torch.cat(
            [model(inputs().eval()(batch)).argmax(1) for batch in images.split(16)]
        )
    loader = DataLoader(TensorDataset(images, labels), 16)
    loss, confusion, predictions = ft.evaluate(model, loader, inputs())
    counted = torch.zeros(300, 300, dtype=torch.long)
    for true, predicted in zip(labels, expected, strict=True):
        counted[true, predicted] += 1
    assert torch.equal(confusion, counted) and math.isfinite(loss)
    assert torch.equal(predictions[:, 0].long(), expected) and predictions.shape == (50, 2)


def test_the_training_step_and_evaluation_copy_into_a_project_with_another_model():
    # No ResNet `fc`, no augmentation module: the lesson's functions, as a learner copies them.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    loader = DataLoader(TensorDataset(torch.rand(20, 3, 8, 8), torch.arange(20) % 4), 8)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, accuracy = ft.train_one_epoch(model, loader, optimizer, scaler, torch.nn.Identity())
    assert math.isfinite(loss) and 0 <= accuracy <= 1
    loss, confusion, predictions = ft.evaluate(model, loader, torch.nn.Identity())
    assert confusion.shape == (4, 4) and confusion.sum() == 20 and predictions.shape == (20, 2)
    # ModelInput takes a float loader's images (transforms.ToTensor's, 0 to 1) as it takes uint8
    as_uint8 = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    model_input = ft.ModelInput(8, seed=0).eval()
    expected = model_input(as_uint8)
    assert torch.allclose(model_input(as_uint8.float() / 255), expected, atol=1e-6)


def test_the_training_step_returns_the_mean_loss_per_image_and_the_share_classified_right():
    logits = torch.tensor([1.0, 0.0, 0.0, 0.0])  # for every image: class 0, always
    model = fixed_logits_model(logits, side=4)
    # 12 images, labels 0, 1, 2, 3, 0, ... in batches of 5, 5 and 2: the mean is over images
    loader = DataLoader(TensorDataset(torch.rand(12, 3, 4, 4), torch.arange(12) % 4), 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, accuracy = ft.train_one_epoch(model, loader, optimizer, scaler, torch.nn.Identity())
    assert accuracy == 0.25  # the 3 images of class 0
    each_label = torch.nn.functional.cross_entropy(
        logits.expand(4, 4), torch.arange(4), reduction="none"
    )
    assert loss == pytest.approx(each_label.mean().item())  # each label 3 times


def test_the_progress_bar_shows_the_mean_loss_so_far_every_25_batches(monkeypatch):
    model = fixed_logits_model([0.0, 0.0, 0.0, 0.0], side=8)  # every loss is ln(4)
    loader = DataLoader(TensorDataset(torch.rand(120, 3, 8, 8), torch.arange(120) % 4), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    served = []  # each batch the loop took
    shown = []  # (batches taken, the figures) for each update of the bar
    progress_bar = ft.progress_bar

    def counted(iterable):
        for batch in iterable:
            served.append(batch)
            yield batch

    def recording(iterable, desc):
        bar = progress_bar(counted(iterable), desc)
        set_postfix = bar.set_postfix

        def record(**figures):
            shown.append((len(served), figures))
            set_postfix(**figures)

        bar.set_postfix = record
        return bar

    monkeypatch.setattr(ft, "progress_bar", recording)
    loss, _ = ft.train_one_epoch(model, loader, optimizer, scaler, torch.nn.Identity())
    assert loss == pytest.approx(math.log(4)) and len(served) == 60
    shown_at = {"loss": "1.386", "refresh": False}  # refresh: drawn at tqdm's next interval
    assert shown == [(25, shown_at), (50, shown_at)]


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


def test_an_improvement_must_be_larger_than_min_delta_for_either_monitor():
    # 0.25, 0.5, 0.75 and 1.0 are exact in binary: the boundary itself is tested
    by_loss = ft.EarlyStopping(patience=5, min_delta=0.25)
    assert by_loss.step(1.0, 0.5, 1)
    assert not by_loss.step(0.75, 0.5, 2)  # lower by min_delta exactly: not enough
    assert by_loss.step(0.5, 0.5, 3) and by_loss.best == 0.5
    by_acc = ft.EarlyStopping(patience=5, min_delta=0.25, monitor="val_acc")
    assert by_acc.step(9.0, 0.25, 1)
    assert not by_acc.step(9.0, 0.5, 2)  # higher by min_delta exactly: not enough
    assert by_acc.step(9.0, 0.75, 3) and by_acc.best_epoch == 3 and by_acc.bad_epochs == 0


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nan_or_inf_loss_stops_training_with_a_line_on_what_to_do(monkeypatch, value):
    model = small_model("layer2")
    optimizer, _ = adam(model)
    cross_entropy = torch.nn.functional.cross_entropy

    def diverging(logits, labels):
        return cross_entropy(logits, labels) * value

    monkeypatch.setattr(ft.F, "cross_entropy", diverging)
    with pytest.raises(
        FloatingPointError, match=f"training diverged: the loss became {value}. Try"
    ):
        train(model, optimizer, n=16)  # one batch: after an inf, the next loss would be nan


# --- Mixed precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_the_training_step_runs_under_autocast_and_the_gradient_scaler(amp_dtype):
    # The CPU runs both, as a GPU would: bf16 without the scaler, fp16 with it. One batch of 4:
    # in 16 bits, a CPU's backward pass takes about 0.5 s an image (a 2-core AVX2 EPYC).
    model = small_model("layer2")
    before = snapshot(model)
    optimizer, _ = adam(model)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    loss, accuracy = train(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, n=4)
    assert 0 < loss < 10 and 0 <= accuracy <= 1
    assert not [key for key in changed(before, model) if key.startswith(("conv1.", "layer1."))]


def test_evaluation_under_autocast_computes_the_loss_and_probabilities_in_float32():
    # As on a GPU from compute capability 8.0: the network in bfloat16, what is read from it not
    model = small_model().eval()
    generator = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs().eval()(images))
    assert logits.dtype == torch.bfloat16
    loader = DataLoader(TensorDataset(images, labels), 8)
    loss, _, predictions = ft.evaluate(model, loader, inputs(), torch.bfloat16)
    expected = torch.nn.functional.cross_entropy(logits.float(), labels)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(predictions[:, 1], logits.float().softmax(1).max(1).values)


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
    device, amp_dtype = ft.choose_device()
    assert device.type == "cuda" and amp_dtype == dtype
    precision = str(dtype or torch.float32).replace("torch.", "")
    major, minor = capability
    expected = f"device: cuda ({name}, compute capability {major}.{minor})   precision: {precision}"
    assert capsys.readouterr().out == expected + "\n"
