"""Every constant is a flag, one path checks edited constants and typed flags, and every bad setting
gets a clear error naming the constant and its flag (exit code 2) before anything is downloaded."""
import json
import subprocess
import sys

import pytest

import fine_tuning as ft
from conftest import ROOT, run


@pytest.fixture(autouse=True)
def nothing_downloaded(monkeypatch):
    monkeypatch.setattr(ft, "load_cifar10", lambda data_dir: pytest.fail("the data must not be touched"))


def assert_setting_error(code, err, *phrases):
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fine_tuning.py: error: ") and len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in last, (phrase, last)


def test_help_lists_every_setting_with_its_default(capsys):
    code, out, _ = run(capsys, "--help")
    text = " ".join(out.split())        # argparse wraps lines
    assert code == 0
    for name in ft.SETTINGS:
        assert f"{ft.flag(name)} {name}" in text, name
    for default in ["(default: 32)", "(default: 15)", "(default: 0.0001)", "(default: 0.001)", "(default: layer2)",
                    "(default: IMAGENET1K_V1)", "(default: auto)", "(default: none)", "(default: all)",
                    "(default: 1.0)", "--dry-run", "--resume", "--run-name", "--train-per-class", "--layer-lr-decay"]:
        assert default in text, default


def test_command_line_overrides_reach_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    code, out, err = run(capsys, "--dry-run", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
                         "--backbone-lr", "3e-4", "--head-lr", "2e-3", "--freeze-until", "layer3",
                         "--unfreeze-schedule", "2:layer3", "--monitor", "val_acc", "--patience", "5",
                         "--min-delta", "0.01", "--seed", "7", "--val-fraction", "0.2", "--num-workers", "0",
                         "--train-per-class", "150", "--layer-lr-decay", "0.5", "--frozen-bn", "train",
                         "--data-dir", tmp_path / "d",
                         "--output-dir", tmp_path / "o", "--run-name", "cli")
    assert code == 0, err
    settings = json.loads((tmp_path / "o" / "cli" / "config.json").read_text())["settings"]
    assert settings == {"DATA_DIR": str(tmp_path / "d"), "SEED": 7, "VAL_FRACTION": 0.2, "TRAIN_PER_CLASS": 150,
                        "IMAGE_SIZE": 32, "WEIGHTS": "IMAGENET1K_V1", "FREEZE_UNTIL": "layer3",
                        "UNFREEZE_SCHEDULE": "2:layer3", "FROZEN_BN": "train", "BATCH_SIZE": 8, "EPOCHS": 2, "BACKBONE_LR": 3e-4,
                        "LAYER_LR_DECAY": 0.5, "HEAD_LR": 2e-3, "MONITOR": "val_acc", "PATIENCE": 5,
                        "MIN_DELTA": 0.01, "NUM_WORKERS": 0, "OUTPUT_DIR": str(tmp_path / "o")}
    assert "data: 1,500 train (kept 150 per class, of 1,600) / 400 validation" in out
    assert "layer3  frozen" in out and "layer4  trainable     8,393,728  3.0e-04  train" in out
    assert "epoch 2: unfreezing layer3 (lr 1.5e-04)" in out                      # 3e-4 x 0.5
    history = (tmp_path / "o" / "cli" / "history.csv").read_text().splitlines()
    assert history[1].split(",")[8:11] == ["", "0.0003", "0.002"]     # epoch 1: lr_layer3 empty, layer4, fc
    assert history[2].split(",")[8:11] == ["0.00015", "0.0003", "0.002"]


def test_friendly_spellings_are_accepted():
    cfg = ft.parse_settings(["--unfreeze-schedule", "{5: 'Layer2', 10: 'layer1'}", "--weights", "default",
                             "--image-size", "AUTO", "--num-workers", " 0 ", "--freeze-until", "Layer3",
                             "--monitor", "VAL_ACC", "--train-per-class", "ALL"])
    assert cfg.unfreeze_schedule == {5: "layer2", 10: "layer1"}
    assert (cfg.freeze_until, cfg.monitor, cfg.settings["WEIGHTS"], cfg.num_workers, cfg.train_per_class) == (
        "layer3", "val_acc", "IMAGENET1K_V1", 0, "all")


def test_edited_constants_are_the_defaults_and_are_checked_like_flags(monkeypatch, capsys):
    monkeypatch.setattr(ft, "EPOCHS", 4)
    monkeypatch.setattr(ft, "UNFREEZE_SCHEDULE", {3: "layer1"})
    cfg = ft.parse_settings([])
    assert cfg.epochs == 4 and cfg.unfreeze_schedule == {3: "layer1"}
    monkeypatch.setattr(ft, "EPOCHS", 0)
    assert_setting_error(*run(capsys)[::2], "EPOCHS (--epochs): '0' is not allowed: expected a whole number >= 1")


BAD = [
    (["--freeze-until", "layer9"], "FREEZE_UNTIL (--freeze-until): 'layer9' is not allowed", "one of none, stem, layer1"),
    (["--freeze-until", "fc"], "FREEZE_UNTIL (--freeze-until)", "one of none, stem"),
    (["--backbone-lr", "0"], "BACKBONE_LR (--backbone-lr): '0' is not allowed", "a learning rate in (0, 1]"),
    (["--head-lr=-1e-3"], "HEAD_LR (--head-lr): '-1e-3'", "a learning rate in (0, 1]"),
    (["--head-lr", "-1e-3"], "HEAD_LR (--head-lr): '-1e-3'", "a learning rate in (0, 1]"),   # not "expected one argument"
    (["--head-lr", "1e3"], "HEAD_LR (--head-lr): '1e3'", "above 1 is surely a typo"),         # meant 1e-3
    (["--head-lr", "fast"], "HEAD_LR (--head-lr): 'fast'", "a learning rate in (0, 1]"),
    (["--backbone-lr", "nan"], "BACKBONE_LR", "a learning rate in (0, 1]"),
    (["--backbone-lr", "-inf"], "BACKBONE_LR (--backbone-lr): '-inf'", "a learning rate in (0, 1]"),
    (["--backbone-lr", "inf"], "BACKBONE_LR", "a learning rate in (0, 1]"),
    (["--frozen-bn", "frozen"], "FROZEN_BN (--frozen-bn): 'frozen' is not allowed", "one of eval, train"),
    (["--layer-lr-decay", "0"], "LAYER_LR_DECAY (--layer-lr-decay)", "in (0, 1]"),
    (["--layer-lr-decay", "2"], "LAYER_LR_DECAY", "in (0, 1]"),
    (["--batch-size", "0"], "BATCH_SIZE (--batch-size): '0'", "whole number >= 2"),
    (["--batch-size", "1"], "BATCH_SIZE", "BatchNorm in train mode needs 2 or more"),
    (["--batch-size", "3.5"], "BATCH_SIZE", "whole number >= 2"),
    (["--batch-size", "60000"], "BATCH_SIZE (--batch-size) = 60000", "the training split has only 45,000 images"),
    (["--epochs", "0"], "EPOCHS (--epochs): '0'", "whole number >= 1"),
    (["--patience", "-1"], "PATIENCE", "whole number >= 0"),
    (["--min-delta", "-0.1"], "MIN_DELTA", "number >= 0"),
    (["--val-fraction", "0"], "VAL_FRACTION", "strictly between 0 and 1"),
    (["--val-fraction", "1.5"], "VAL_FRACTION", "strictly between 0 and 1"),
    (["--val-fraction", "0.00001"], "VAL_FRACTION (--val-fraction) = 1e-05", "0 validation images of 50,000"),
    (["--val-fraction", "0.99999"], "VAL_FRACTION", "0 training and 50,000 validation"),
    (["--train-per-class", "0"], "TRAIN_PER_CLASS (--train-per-class)", "all or a whole number >= 1"),
    (["--train-per-class", "5000"], "TRAIN_PER_CLASS (--train-per-class) = 5000", "only 4500 training images"),
    (["--val-fraction", "0.5", "--train-per-class", "3000"], "TRAIN_PER_CLASS", "only 2500 training images"),
    (["--image-size", "16"], "IMAGE_SIZE (--image-size): '16'", "auto or a whole number from 32 to 512"),
    (["--image-size", "big"], "IMAGE_SIZE", "from 32 to 512"),
    (["--seed", "-1"], "SEED (--seed): '-1'", "from 0 to 4294967295"),
    (["--seed", "99999999999999999999"], "SEED", "from 0 to 4294967295"),
    (["--weights", "/dev/null"], "WEIGHTS (--weights)", "not a regular file"),
    (["--weights", "imagenet"], "WEIGHTS (--weights): 'imagenet' is not allowed", "known names IMAGENET1K_V1 and none"),
    (["--weights", "imagenet.pth"], "WEIGHTS (--weights) = ", "imagenet.pth' is not allowed: expected IMAGENET1K_V1, "
     "none, or a ResNet18 state-dict file (no such file)"),
    (["--weights", "missing/resnet.pth"], "WEIGHTS", "no such file"),
    (["--monitor", "train_loss"], "MONITOR (--monitor): 'train_loss' is not allowed", "one of val_loss, val_acc"),
    (["--num-workers", "-2"], "NUM_WORKERS", "auto or a whole number >= 0"),
    (["--data-dir", ""], "DATA_DIR (--data-dir): ''", "expected a folder"),
    (["--data-dir", "None"], "DATA_DIR", "expected a folder"),
    (["--data-dir", "/dev/null"], "DATA_DIR (--data-dir): '/dev/null'", "expected a folder"),
    (["--data-dir", __file__ + "/data"], "DATA_DIR", "expected a folder"),        # below a file
    (["--output-dir", __file__], "OUTPUT_DIR", "a folder you can write to"),
    (["--output-dir", " "], "OUTPUT_DIR (--output-dir)", "a folder you can write to"),
    (["--unfreeze-schedule", "5:layer9"], "UNFREEZE_SCHEDULE (--unfreeze-schedule): '5:layer9'", "EPOCH:BLOCK"),
    (["--unfreeze-schedule", "5:layer3"], "UNFREEZE_SCHEDULE", "layer3 is already trainable (FREEZE_UNTIL = layer2)"),
    (["--unfreeze-schedule", "6:layer2,3:layer1"], "UNFREEZE_SCHEDULE (--unfreeze-schedule): 6:layer2 is not "
     "allowed", "3:layer1 already released layer2: unfreezing a block releases every block after it"),
    (["--unfreeze-schedule", "16:layer2"], "UNFREEZE_SCHEDULE", "epoch 16 is outside 1..15"),
    (["--unfreeze-schedule", "0:layer2"], "UNFREEZE_SCHEDULE", "outside 1..15"),
    (["--unfreeze-schedule", "soon:layer2"], "UNFREEZE_SCHEDULE", "EPOCH:BLOCK"),
    (["--unfreeze-schedule", "5:layer2,5:layer1"], "UNFREEZE_SCHEDULE", "each epoch once"),
    (["--freeze-until", "none", "--unfreeze-schedule", "2:layer1"], "UNFREEZE_SCHEDULE", "already trainable"),
    (["--run-name", "../elsewhere"], "--run-name", "a folder name"),
    (["--run-name", ".hidden"], "--run-name", "a folder name"),
    (["--run-name", "12:30"], "--run-name", "that Windows accepts too"),      # no ':' in a Windows name
    (["--run-name", "NUL"], "--run-name", "not CON, NUL"),
    (["--run-name", "com1.old"], "--run-name", "not CON, NUL"),
    (["--run-name", "trial."], "--run-name", "no '.' at the end"),
    (["--resume", ""], "--resume", "a run folder made by this script"),
    (["--epcohs", "3"], "unrecognized arguments: --epcohs", ""),
]


@pytest.mark.parametrize("args,names,allowed", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_setting_gets_a_clear_error_before_any_download(args, names, allowed, tmp_path, capsys):
    code, _, err = run(capsys, *args, "--output-dir", tmp_path / "runs") if "--output-dir" not in args else run(
        capsys, *args)
    assert_setting_error(code, err, names, allowed)


def test_a_data_dir_that_names_the_cifar10_folder_itself_is_refused_before_any_download(tmp_path, capsys):
    inner = tmp_path / "data" / "cifar-10-batches-py"     # a common slip: torchvision wants the folder above it
    inner.mkdir(parents=True)
    (inner / "data_batch_1").write_bytes(b"")
    code, _, err = run(capsys, "--data-dir", inner, "--output-dir", tmp_path / "runs")
    assert_setting_error(code, err, "DATA_DIR (--data-dir)", "cifar-10-batches-py, not that folder itself")
    assert not (inner / "cifar-10-batches-py").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,value,message", [
    ("UNFREEZE_SCHEDULE", None, "UNFREEZE_SCHEDULE (--unfreeze-schedule) = None is not allowed: write a number or a "
                                "text in quotes, or a dict such as {5: 'layer2'}"),
    ("UNFREEZE_SCHEDULE", [5, "layer2"], "UNFREEZE_SCHEDULE (--unfreeze-schedule) = [5, 'layer2'] is not allowed"),
    ("UNFREEZE_SCHEDULE", {"layer2"}, "= {'layer2'} is not allowed"),
    ("UNFREEZE_SCHEDULE", {"5": 3}, "UNFREEZE_SCHEDULE (--unfreeze-schedule): '5:3' is not allowed"),
    ("EPOCHS", "fifteen", "EPOCHS (--epochs): 'fifteen' is not allowed"),
    ("EPOCHS", True, "EPOCHS (--epochs) = True is not allowed"),
    ("PATIENCE", 2.5, "PATIENCE (--patience): '2.5' is not allowed"),
    ("HEAD_LR", None, "HEAD_LR (--head-lr) = None is not allowed"),
    ("WEIGHTS", None, "WEIGHTS (--weights) = None is not allowed"),
    ("FREEZE_UNTIL", None, "FREEZE_UNTIL (--freeze-until) = None is not allowed"),
    ("DATA_DIR", None, "DATA_DIR (--data-dir) = None is not allowed"),
    ("OUTPUT_DIR", "", "OUTPUT_DIR (--output-dir): '' is not allowed"),
    ("MONITOR", ["val_loss"], "MONITOR (--monitor) = ['val_loss'] is not allowed"),
    ("FREEZE_UNTIL", "layer9", "FREEZE_UNTIL (--freeze-until): 'layer9' is not allowed: expected one of none, stem"),
    ("FREEZE_UNTIL", ("layer2",), "FREEZE_UNTIL (--freeze-until) = ('layer2',) is not allowed"),
])
def test_a_constant_of_the_wrong_type_gets_the_same_one_line_error(name, value, message, monkeypatch, capsys):
    monkeypatch.setattr(ft, name, value)
    assert_setting_error(*run(capsys)[::2], message)


def test_a_commented_out_constant_is_named(monkeypatch, capsys):
    monkeypatch.delattr(ft, "PATIENCE")
    assert_setting_error(*run(capsys)[::2], "PATIENCE is missing from the settings at the top of fine_tuning.py")


def test_an_output_folder_that_is_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    import os
    locked, real_access = tmp_path / "locked", os.access
    locked.mkdir()
    # Tests run as root in CI, where permissions never deny; ask os.access the way a normal user's would answer.
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and real_access(path, mode))
    assert_setting_error(*run(capsys, "--output-dir", locked / "runs")[::2], "OUTPUT_DIR", "a folder you can write to")


def test_a_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for option in ["--data-dir", "--output-dir"]:
        assert_setting_error(*run(capsys, option, tmp_path / "afile")[::2], f"({option}): '{tmp_path / 'afile'}'")


def test_a_bad_setting_through_the_real_script_has_no_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "fine_tuning.py"), "--batch-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("fine_tuning.py: error: BATCH_SIZE (--batch-size): '0' is not "
                                                      "allowed: expected a whole number >= 2 (BatchNorm in train "
                                                      "mode needs 2 or more images to normalise over)")


def test_a_missing_package_says_how_to_install_it():
    code = (f"import sys, runpy; sys.modules['numpy'] = None; sys.argv = ['fine_tuning.py', '--dry-run']; "
            f"runpy.run_path({str(ROOT / 'fine_tuning.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: numpy is not installed. Run: pip install -r requirements.txt"


def test_a_path_that_cannot_be_looked_at_gets_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    def denied(self, *args, **kwargs):   # what a folder without the x permission does for a normal user
        raise PermissionError(13, "Permission denied", str(self))
    exists = ft.Path.exists
    monkeypatch.setattr(ft.Path, "exists", lambda self: denied(self) if "locked" in str(self) else exists(self))
    monkeypatch.setattr(ft.os.path, "isfile", lambda path: False)
    assert_setting_error(*run(capsys, "--weights", tmp_path / "locked" / "w.pt")[::2], "WEIGHTS", "Permission denied")
    monkeypatch.undo()
    monkeypatch.setattr(ft.Path, "exists", denied)
    assert_setting_error(*run(capsys, "--output-dir", tmp_path / "locked" / "runs")[::2], "OUTPUT_DIR (--output-dir)")


def test_output_closed_by_its_reader_stops_the_run_without_a_traceback(tmp_path):
    process = subprocess.Popen([sys.executable, str(ROOT / "fine_tuning.py"), "--dry-run", "--output-dir", tmp_path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()                  # what `python fine_tuning.py | head -1` reads, before head exits
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "error: the output was closed (by `| head`?): stopped."
