"""Your own images: a folder with train/ and test/ (or val/), or with class folders alone, through
the same lesson, reports and pictures as CIFAR-10; and a clear line, before any training, for a
folder that cannot be used."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import fine_tuning as ft
from conftest import LAUNCHER, load_state, run, script_env, write_image_folder


def folder_run(root, out, *extra):
    return ["--dataset", root, "--output-dir", out, "--batch-size", "8", "--epochs", "2", *extra]


def test_a_folder_with_train_and_test_trains_tests_and_reports_with_its_class_names(
    real_files, tmp_path, capsys
):
    root = tmp_path / "insects"
    write_image_folder(root / "train")
    write_image_folder(root / "test", per_class=3)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--run-name", "mine"))
    assert code == 0, err
    # 24 training images of about 100 px: 3 validation images held out, 3 classes, on the CPU at
    # the images' own size (the median of their shorter sides).
    assert "data: 21 train / 3 validation / 9 test (test/) images, 3 classes, 93 px\n" in out
    assert "\nclasses: ants, bees, wasps\n" in out  # before the images are read
    assert "model: ResNet18, ImageNet weights (IMAGENET1K_V1), new 3-class head" in out
    assert "fc      trainable         1,539  1.0e-03  -" in out  # 512 x 3 + 3 parameters
    assert "  accuracy  most often taken for (images)\nants " in out
    run_dir = tmp_path / "runs" / "mine"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["classes"] == ["ants", "bees", "wasps"]
    assert sorted(results["per_class_acc"]) == ["ants", "bees", "wasps"]
    assert load_state(run_dir / "best.pt")["fc.weight"].shape == (3, 512)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["DATASET"] == str(root) and config["settings"]["IMAGE_SIZE"] == 93


def test_the_report_names_each_class_in_full_however_long(capsys):
    classes = ["Apple Red Delicious", "Apple Red Yellow 2", "fig"]  # Fruits 360's, say
    confusion = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    per_class = ft.print_report(confusion, classes)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "Apple Red Delicious           4     75.0%  Apple Red Yellow 2 (1)"
    assert lines[3] == "Apple Red Yellow 2            4     50.0%  Apple Red Delicious (2)"
    assert lines[4] == "fig                           0       n/a  -"
    assert lines[1] == f"{'class':<20}test images  accuracy  most often taken for (images)"
    assert per_class == {"Apple Red Delicious": 0.75, "Apple Red Yellow 2": 0.5, "fig": None}


def test_small_images_keep_their_size_and_the_flag_takes_it_back(tmp_path, capsys):
    root = tmp_path / "digits"  # MNIST's 28 px as PNG files, say
    for c, name in enumerate(["one", "seven"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (28, 28), 100 * c + i).save(root / name / f"{i}.png")
    args = folder_run(root, tmp_path / "runs", "--dry-run", "--batch-size", "4")
    code, out, err = run(capsys, *args, "--run-name", "auto")
    assert code == 0 and " images, 2 classes, 28 px\n" in out, err
    config = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())
    assert config["settings"]["IMAGE_SIZE"] == 28  # as summary.csv records it, and as a flag:
    code, out, err = run(capsys, *args, "--image-size", "28")
    assert code == 0 and " images, 2 classes, 28 px\n" in out, err


def test_image_size_auto_is_imagenets_224_on_cuda_and_the_images_own_up_to_224_elsewhere(
    monkeypatch,
):
    assert [ft.auto_image_size(side) for side in (28, 96, 224, 3024)] == [28, 96, 224, 224]
    monkeypatch.setattr(ft.torch.cuda, "is_available", lambda: True)
    assert [ft.auto_image_size(side) for side in (28, 3024)] == [224, 224]


def test_class_folders_alone_give_a_held_out_test_split_and_val_is_taken_for_test(
    real_files, tmp_path, capsys
):
    alone = write_image_folder(tmp_path / "alone", per_class=10)
    code, out, err = run(capsys, *folder_run(alone, tmp_path / "runs"))
    assert code == 0, err
    assert "data: 24 train / 3 validation / 3 test (held out) images, 3 classes" in out
    code, _, err = run(capsys, *folder_run(alone, tmp_path / "runs", "--batch-size", "25"))
    assert code == 2 and err.endswith("the training split has only 24 images\n"), err  # not 27
    tutorial = tmp_path / "hymenoptera_data"  # PyTorch's tutorial: train/ and val/
    write_image_folder(tutorial / "train", ("ants", "bees"))
    write_image_folder(tutorial / "val", ("ants", "bees"), per_class=2)
    code, out, err = run(capsys, *folder_run(tutorial, tmp_path / "runs", "--image-size", "64"))
    assert code == 0, err
    assert "data: 14 train / 2 validation / 4 test (val/) images, 2 classes, 64 px\n" in out
    table = out[out.index("runs in summary.csv") :]
    assert f"DATASET={alone}" in table  # the runs table tells one folder from another
    assert "\nvs " not in table  # and compares a run only with runs on the same data
    for name in ("valid", "validation"):  # Kaggle's name for it; Keras's cats and dogs'
        (tutorial / "val").rename(tutorial / name)
        code, out, err = run(capsys, *folder_run(tutorial, tmp_path / "runs", "--dry-run"))
        assert f"/ 4 test ({name}/) images" in out, err
        (tutorial / name).rename(tutorial / "val")


def test_with_train_valid_and_test_the_test_set_is_test_and_valid_is_named_as_unused(
    tmp_path, capsys
):
    root = tmp_path / "kaggle"  # many of Kaggle's folders come in three splits
    write_image_folder(root / "train")
    write_image_folder(root / "valid", per_class=2)
    write_image_folder(root / "test", per_class=3)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "note: valid/ not used: validation images come from train/\n" in out
    assert "data: 21 train / 3 validation / 9 test (test/) images" in out
    for image in (root / "test").glob("*/[0-9].*"):  # a competition's test/: images, no labels
        image.rename(root / "test" / f"{image.parent.name}_{image.name}")
    for folder in (root / "test").iterdir():
        if folder.is_dir():
            shutil.rmtree(folder)
    for split in ("train", "test"):  # Jupyter's, hidden: no class folder either
        (root / split / ".ipynb_checkpoints").mkdir()
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "note: test/ not used: its images are in no class folder, so unlabelled\n" in out
    assert "data: 21 train / 3 validation / 6 test (valid/) images" in out
    assert "valid/ not used" not in out


def test_split_folders_whose_folders_are_no_classes_of_train_are_named_as_unused(tmp_path, capsys):
    root = tmp_path / "tiny-imagenet-200"  # Tiny ImageNet: val/images/ and test/images/
    write_image_folder(root / "train", ("n01443537", "n01629819", "n01641577"), per_class=10)
    for split in ("val", "test"):
        write_image_folder(root / split, ("images",), per_class=3)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01443537\n")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "note: val/ not used: its images are in no class folder, so unlabelled\n" in out
    assert "note: test/ not used: its images are in no class folder, so unlabelled\n" in out
    assert "data: 24 train / 3 validation / 3 test (held out) images, 3 classes" in out


def test_the_split_folders_are_found_in_any_case(tmp_path, capsys):
    root = tmp_path / "fruits-360"  # Fruits 360's Training/ and Test/; a brain MRI set's Testing/
    write_image_folder(root / "Training")
    write_image_folder(root / "Test", per_class=3)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "data: 21 train / 3 validation / 9 test (Test/) images, 3 classes" in out  # not 2
    (root / "Test").rename(root / "Testing")
    write_image_folder(root / "Validation", per_class=2)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "note: Validation/ not used: validation images come from Training/\n" in out
    assert "data: 21 train / 3 validation / 9 test (Testing/) images, 3 classes" in out


def test_a_class_whose_name_holds_a_split_word_is_a_class(tmp_path, capsys):
    root = write_image_folder(tmp_path / "lab", ("beaker", "flask", "test tube"))
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "images, 3 classes" in out and "\ntest tube " in out  # the test's report


def test_the_classes_are_named_before_the_images_are_read(tmp_path, capsys):
    # PlantVillage's color/, grayscale/, segmented/, each with the same class folders: given the
    # folder above them, ImageFolder's classes are color and grayscale, its walk reads the rest
    root = tmp_path / "plantvillage"
    for version in ("color", "grayscale"):
        write_image_folder(root / version, ["Apple___Apple_scab", "Apple___healthy"], per_class=4)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert out.index("\nclasses: color, grayscale\n") < out.index("\ndata: ")
    many = write_image_folder(tmp_path / "dogs", [f"n0208{i:04} breed {i}" for i in range(40)], 4)
    code, out, err = run(
        capsys, *folder_run(many, tmp_path / "runs", "--dry-run", "--val-fraction", "0.5")
    )
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("classes: "))
    assert line.startswith("classes: n02080000 breed 0, n02080001 breed 1, ")
    assert line.endswith(" ...") and len(line) <= 100  # not 40 names: the data line counts them


def test_class_names_a_logs_encoding_lacks_are_printed_escaped(torch_home, tmp_path):
    # Windows writes a log (`> log`, Jupyter's `!python`) in its code page: cp1252 has no ł
    root = write_image_folder(tmp_path / "boats", ["kajak", "\u0142\u00f3d\u017a"], per_class=12)
    env = {**script_env(torch_home), "PYTHONIOENCODING": "ascii"}  # stricter still
    args = [*LAUNCHER, *folder_run(root, tmp_path / "runs", "--dry-run")]
    done = subprocess.run(args, capture_output=True, text=True, encoding="ascii", env=env)
    assert done.returncode == 0, done.stderr
    assert "classes: kajak, \\u0142\\xf3d\\u017a\n" in done.stdout  # as Python's stderr does
    assert "\n\\u0142\\xf3d\\u017a " in done.stdout  # the test's report, a row per class


def test_a_dry_run_reads_the_folder_and_runs_its_first_batches_offline(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos")
    args = folder_run(root, tmp_path / "runs", "--dry-run", "--image-size", "224")
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "dry run: your images, random weights, batches per phase: 1" in out
    assert "images, 3 classes, 93 px, the model sees 224 px\n" in out
    assert "model: ResNet18, random weights, new 3-class head" in out


def test_hidden_folders_are_no_class_as_hidden_files_are_no_image(tmp_path, capsys):
    # Jupyter keeps .ipynb_checkpoints beside a file it edits; a Mac's zip of the class folders
    # adds __MACOSX, with a hidden ._ file of metadata for each image. `ls` shows neither.
    root = write_image_folder(tmp_path / "photos")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "labels-checkpoint.txt").write_text("ants, bees, wasps")
    (root / "__MACOSX" / "ants").mkdir(parents=True)
    (root / "__MACOSX" / "ants" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "images, 3 classes, 93 px\n" in out
    assert "\nants " in out and "ipynb" not in out and "MACOSX" not in out  # the test's report


def test_the_files_that_are_no_image_by_their_extension_are_named_in_a_note(tmp_path, capsys):
    # ImageFolder leaves them out without a word: an iPhone's photos (.heic) would go missing.
    root = write_image_folder(tmp_path / "photos")  # with notes.txt and ._0.png in each class
    (root / "ants" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "bees" / "dance.gif").write_bytes(b"GIF89a")
    (root / "README").write_text("my photos")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "README-checkpoint").write_text("hidden: not counted")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert f"note: {root}: not used, not images by their extension: 1 .gif, 1 .heic, 3 .txt," in out
    assert "3 .txt, 1 README\n" in out and "data: 18 train / 3 validation / 3 test" in out


def test_the_note_on_files_without_an_extension_stays_one_short_line(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos")  # and 60 photos saved by URL: no extension
    for i in range(60):
        Image.new("RGB", (40, 30)).save(root / "bees" / f"photo-{i}", "JPEG")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    note = next(line for line in out.splitlines() if line.startswith("note: "))
    assert note.startswith(f"note: {root}: not used, not images by their extension: 3 .txt, ")
    assert note.endswith(" ...") and len(note) < 200 + len(str(root)) + 60


def test_jpegs_saved_as_jfif_are_read_as_images(tmp_path, capsys):
    # Windows saves many a JPEG from the web as .jfif, which ImageFolder's extensions leave out.
    root = write_image_folder(tmp_path / "photos", ["cats", "dogs"])
    for i in range(4):
        Image.new("RGB", (120, 90), (30 * i, 90, 200)).save(root / "dogs" / f"web{i}.JFIF", "JPEG")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "data: 16 train / 2 validation / 2 test (held out) images, 2 classes" in out  # 8 + 12
    assert "not images by their extension: 2 .txt\n" in out  # the .JFIF files are not left out


def test_avif_images_saved_from_the_web_are_read_where_pillow_reads_them(tmp_path, capsys):
    # Browsers save many a web image as .avif; Pillow reads it where built with libavif (its
    # wheels are), and ImageFolder's extensions leave it out
    if ".avif" not in Image.registered_extensions():
        pytest.skip("this Pillow has no AVIF")
    root = write_image_folder(tmp_path / "photos", ["cats", "dogs"])
    for i in range(4):
        Image.new("RGB", (120, 90), (30 * i, 90, 200)).save(root / "dogs" / f"web{i}.avif")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run"))
    assert code == 0, err
    assert "data: 16 train / 2 validation / 2 test (held out) images, 2 classes" in out  # 8 + 12
    assert "not images by their extension: 2 .txt\n" in out  # the .avif files are not left out


def test_a_class_of_iphone_photos_alone_is_refused_with_the_note_naming_them(tmp_path, capsys):
    # ImageFolder's error names the extensions it reads, not the files the class folder holds.
    root = write_image_folder(tmp_path / "photos", ["cats", "dogs"])
    shutil.rmtree(root / "cats")
    (root / "cats").mkdir()
    for i in range(3):
        (root / "cats" / f"IMG_000{i}.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 2 and "Found no valid file for the classes cats." in err
    assert f"note: {root}: not used, not images by their extension: 3 .heic" in out


def test_the_inputs_picture_shows_a_folders_classes(with_matplotlib, tmp_path, capsys, monkeypatch):
    root = write_image_folder(tmp_path / "photos")
    drawn = []
    monkeypatch.setattr(ft, "save_figure", lambda figure, path: drawn.append(figure))
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs", "--dry-run", "--epochs", "1"))
    assert code == 0, err
    titles = [axis.get_title() for axis in drawn[0].axes if axis.get_title()]  # inputs.png
    assert len(titles) == 8 and set(titles) == {"ants", "bees", "wasps"}  # a dry run's 8 images


CLASS_FOLDERS = {  # folders of class folders alone, by these names
    "one class": ["cats"],
    "a test split beside the classes": ["cats", "dogs", "test"],
    "a class named train": ["bus", "car", "train"],  # photos of buses, cars and trains
    "a train split without class folders": ["test1", "train"],  # Dogs vs. Cats: train/cat.1.jpg
}


def broken(tmp_path, kind):
    """A folder with one thing wrong with it."""
    root = tmp_path / kind.replace(" ", "_")
    if kind in CLASS_FOLDERS:
        write_image_folder(root, CLASS_FOLDERS[kind])
    elif kind == "no class folders":
        root.mkdir()
        (root / "photo.jpg").write_bytes(b"")
    elif kind == "hidden folders alone":
        (root / ".ipynb_checkpoints").mkdir(parents=True)
        (root / "photo.jpg").write_bytes(b"")
    elif kind == "a folder above":  # a zip file's folder around the class folders
        write_image_folder(root / "photos", ["cats", "dogs"])
    elif kind == "an empty class":
        write_image_folder(root, ["cats", "dogs"])
        (root / "birds").mkdir()
    elif kind == "splits by other names":  # Kaggle's Intel images; training_set/, test_set/
        write_image_folder(root / "seg_train" / "seg_train", ["cats", "dogs"])
        write_image_folder(root / "seg_test" / "seg_test", ["cats", "dogs"], per_class=2)
    elif kind == "other test classes":
        write_image_folder(root / "train", ["cats", "dogs"])
        write_image_folder(root / "test", ["cats", "horses"], per_class=2)
    elif kind == "test classes named otherwise":  # not one in common, yet class folders
        write_image_folder(root / "train", ["cats", "dogs"])
        write_image_folder(root / "test", ["Katzen", "Hunde"], per_class=2)
    return root


@pytest.mark.parametrize(
    "kind, message",
    [("no class folders", "Couldn't find any class folder in"),
     ("hidden folders alone", "Couldn't find any class folder in"),
     ("one class", "has one class folder, cats; a classifier needs two or more"),
     ("a folder above", "has one class folder, photos; a classifier needs two or more (if"
      " photos/ holds the class folders, give that folder: --dataset {root}/photos)"),
     ("an empty class", "Found no valid file for the classes birds. (image files: .jpg .jpeg"),
     ("other test classes", "the class folders of {root}/test (cats, horses) must be those of"
      " train/ (cats, dogs)"),
     ("test classes named otherwise", "the class folders of {root}/test (Hunde, Katzen) must be"
      " those of train/ (cats, dogs)"),
     ("splits by other names", "{root} holds seg_test, seg_train: splits, not classes? Name them"
      " train/ and test/, each with a folder per class"),
     ("a test split beside the classes", "{root} holds test: splits, not classes?"),
     # Not read as the training split (ImageFolder found no class in it), nor as a class beside
     # the others (Dogs vs. Cats would train train/ against test1/)
     ("a class named train", "{root} holds train: splits, not classes? Name them train/ and"
      " test/, each with a folder per class (README, Your own images), or rename a class so"
      " named"),
     ("a train split without class folders", "{root} holds train: splits, not classes? Name"
      " them train/ and test/, each with a folder per class (README, Your own images), or"
      " rename a class so named")],
)  # fmt: skip
def test_a_folder_that_cannot_be_used_gets_one_line_and_exit_2(kind, message, tmp_path, capsys):
    root = broken(tmp_path, kind)
    code, out, err = run(capsys, "--dataset", root, "--output-dir", tmp_path / "runs")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fine_tuning.py: error: DATASET (--dataset): ")
    assert message.format(root=root) in err
    assert not (tmp_path / "runs").exists()


def test_an_image_that_cannot_be_read_is_named_and_exits_1(tmp_path, capsys):
    root = write_image_folder(tmp_path / "photos")
    (root / "bees" / "7.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot read the image {root / 'bees' / '7.jpg'} (")
    assert err.endswith("): delete or replace it\n")


def test_several_images_that_cannot_be_read_are_all_named_in_one_run(tmp_path, capsys):
    root = tmp_path / "scraped"
    write_image_folder(root / "train")
    write_image_folder(root / "test", per_class=3)
    jpeg = root / "train" / "ants" / "0.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:400])  # a download cut short
    (root / "train" / "bees" / "5.jpg").write_text("<!DOCTYPE html><html>Access denied</html>")
    (root / "test" / "wasps" / "1.png").write_bytes(b"")  # an empty file
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err == "error: cannot read 3 of the 33 images (3 listed above): delete or replace them\n"
    for path in (jpeg, root / "train" / "bees" / "5.jpg", root / "test" / "wasps" / "1.png"):
        assert f"cannot read the image {path} (" in out
    assert out.count("cannot read the image") == 3
    assert not (tmp_path / "runs").exists()


def test_pngs_pil_refuses_are_named_as_unreadable_images(tmp_path, capsys):
    # A PNG broken after its first block of pixels (PIL: SyntaxError, "broken PNG file"), and one
    # with megabytes of text in it (an editor's history: PIL refuses more than 1 MB, ValueError)
    root = write_image_folder(tmp_path / "photos")
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "ants" / "broken.png")
    data = bytearray((root / "ants" / "broken.png").read_bytes())
    second = data.index(b"IDAT", data.index(b"IDAT") + 4)  # the second block's chunk type
    data[second : second + 4] = b"\x00\x9b\xe7\xfa"  # no chunk type: corrupted on the way
    (root / "ants" / "broken.png").write_bytes(data)
    notes = PngImagePlugin.PngInfo()
    notes.add_itxt("XML:com.adobe.xmp", "<x/>" * 500_000, zip=True)
    Image.new("RGB", (30, 20)).save(root / "bees" / "edited.png", pnginfo=notes)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err == "error: cannot read 2 of the 26 images (2 listed above): delete or replace them\n"
    assert f"cannot read the image {root / 'ants' / 'broken.png'} (broken PNG file" in out
    assert f"cannot read the image {root / 'bees' / 'edited.png'} (Decompressed data" in out


def test_a_folder_of_unreadable_images_names_50_not_thousands(tmp_path, capsys):
    # A dataset repository cloned without git-lfs: every image is a small text file, a pointer.
    root = write_image_folder(tmp_path / "cloned", per_class=20)
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 3019\n"
    for image in root.glob("*/[0-9]*.*"):
        image.write_text(pointer)
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 1
    assert (
        err == "error: cannot read 60 of the 60 images (50 listed above): delete or replace them\n"
    )
    assert out.count("cannot read the image") == 50


def test_an_image_too_large_for_pil_is_named_and_exits_1(tmp_path, capsys, monkeypatch):
    root = write_image_folder(tmp_path / "photos")
    Image.new("RGB", (200, 200)).save(root / "ants" / "huge.png")  # the others: <= 15,360 pixels
    monkeypatch.setattr(ft.Image, "MAX_IMAGE_PIXELS", 16_000)  # PIL refuses twice this: a "bomb"
    code, out, err = run(capsys, *folder_run(root, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot read the image {root / 'ants' / 'huge.png'} (")
    assert "decompression bomb" in err


def test_a_folder_too_large_for_memory_says_how_large_and_what_to_change(
    tmp_path, capsys, monkeypatch
):
    root = write_image_folder(tmp_path / "photos")
    pages = {"SC_PAGE_SIZE": 1000, "SC_PHYS_PAGES": 1000}  # a machine with 1 MB of memory
    monkeypatch.setattr(ft.os, "sysconf", lambda name: pages[name])
    code, out, err = run(capsys, "--dataset", root, "--output-dir", tmp_path / "runs")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        f"DATASET (--dataset): the 24 images of {root} need 1 MB at 93 px, more than half of"
        " this machine's 1 MB. Set a smaller IMAGE_SIZE (--image-size): 83 px fits"
    ) in err


def test_where_the_memory_is_not_known_a_folder_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ft.os, "sysconf_names", {}, raising=False)  # Windows has no sysconf
    assert ft.check_memory(10**9, 224, tmp_path) is None  # 150 TB of images: no refusal


def test_cifar10_stays_the_default_and_its_name_is_read_in_any_case():
    assert ft.parse_settings(["--dry-run"]).dataset == "CIFAR10"
    assert ft.parse_settings(["--dataset", "cifar10", "--dry-run"]).dataset == "CIFAR10"


def test_runs_are_not_written_among_the_classes_they_would_join(tmp_path, capsys, monkeypatch):
    # The script beside the class folders, run there: `python fine_tuning.py --dataset .` would
    # write ./runs, which the next run would read as a class "runs", of a run's pictures
    photos = write_image_folder(tmp_path / "photos")
    monkeypatch.chdir(photos)
    code, out, err = run(capsys, "--dataset", ".", "--batch-size", "8", "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (
        f"fine_tuning.py: error: OUTPUT_DIR (--output-dir): runs is inside {photos}, whose folders"
        " are the classes: the next run would take it for one. Give a folder outside it, such as"
        f" {tmp_path / 'runs'}\n"
    )
    assert not (photos / "runs").exists()
    given = ["--dataset", ".", "--batch-size", "8", "--dry-run", "--output-dir", tmp_path / "runs"]
    code, out, err = run(capsys, *given)
    assert code == 0, err
    assert "data: 18 train / 3 validation / 3 test (held out) images, 3 classes" in out
