"""Every constant is an option, overrides reach the run, and every bad setting gets a one-line error."""
import json
import os
import subprocess
import sys

import pytest

import fine_tuning as ft
from helpers import use_synthetic_data
from conftest import ROOT


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run([sys.executable, str(ROOT / "fine_tuning.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())        # argparse wraps lines
    for name in ft.SETTINGS:
        assert ft.flag(name) in text, name
    for default in ["(default: 32)", "(default: 15)", "(default: 0.0001)", "(default: 0.001)",
                    "(default: layer2)", "(default: IMAGENET1K_V1)", "(default: auto)", "(default: none)"]:
        assert default in text, default
    for extra in ["--dry-run", "--resume", "--run-name"]:
        assert extra in text


def test_command_line_overrides_reach_the_run(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch)
    code = ft.main(["--weights", "none", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
                    "--backbone-lr", "3e-4", "--head-lr", "2e-3", "--freeze-until", "layer3",
                    "--unfreeze-schedule", "2:layer3", "--monitor", "val_acc", "--patience", "5",
                    "--min-delta", "0.01", "--seed", "7", "--val-fraction", "0.2", "--num-workers", "0",
                    "--data-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "o"), "--run-name", "cli"])
    out = capsys.readouterr().out
    assert code == 0
    settings = json.loads((tmp_path / "o" / "cli" / "config.json").read_text())["settings"]
    assert settings == {"DATA_DIR": str(tmp_path / "d"), "SEED": 7, "VAL_FRACTION": 0.2, "IMAGE_SIZE": 32,
                        "WEIGHTS": "none", "FREEZE_UNTIL": "layer3", "UNFREEZE_SCHEDULE": {"2": "layer3"},
                        "BATCH_SIZE": 8, "EPOCHS": 2, "BACKBONE_LR": 3e-4, "HEAD_LR": 2e-3,
                        "MONITOR": "val_acc", "PATIENCE": 5, "MIN_DELTA": 0.01, "NUM_WORKERS": 0,
                        "OUTPUT_DIR": str(tmp_path / "o")}
    assert "160 train / 40 validation" in out
    assert "layer3  frozen" in out and "layer4  trainable" in out
    assert "epoch 2: unfreezing layer3 (lr 3e-04)" in out
    history = (tmp_path / "o" / "cli" / "history.csv").read_text().splitlines()
    assert history[1].split(",")[8:11] == ["", "0.0003", "0.002"]     # epoch 1: lr_layer3 empty, layer4, fc
    assert history[2].split(",")[8:11] == ["0.0003", "0.0003", "0.002"]


def test_friendly_spellings_are_accepted():
    raw = {name: getattr(ft, name) for name in ft.SETTINGS}
    settings = ft.check_settings({**raw, "UNFREEZE_SCHEDULE": "{5: 'Layer2', 10: 'layer1'}", "WEIGHTS": "default",
                                  "IMAGE_SIZE": "AUTO", "NUM_WORKERS": " 0 ", "FREEZE_UNTIL": "Layer3",
                                  "MONITOR": "VAL_ACC"})
    assert settings["UNFREEZE_SCHEDULE"] == {5: "layer2", 10: "layer1"}
    assert settings["FREEZE_UNTIL"] == "layer3" and settings["MONITOR"] == "val_acc"
    assert settings["WEIGHTS"] == "IMAGENET1K_V1"
    assert settings["IMAGE_SIZE"] == "auto" and settings["NUM_WORKERS"] == 0


def test_edited_constants_are_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(ft, "EPOCHS", 4)
    monkeypatch.setattr(ft, "UNFREEZE_SCHEDULE", {3: "layer1"})
    options, overrides = ft.parse_args([])
    assert overrides == {}
    raw = {**{name: getattr(ft, name) for name in ft.SETTINGS}, **overrides}
    assert ft.check_settings(raw)["EPOCHS"] == 4
    assert ft.check_settings(raw)["UNFREEZE_SCHEDULE"] == {3: "layer1"}


BAD = [
    (["--freeze-until", "layer9"], "FREEZE_UNTIL (--freeze-until) = 'layer9'", "none, stem, layer1"),
    (["--freeze-until", "fc"], "FREEZE_UNTIL", "choose one of"),
    (["--backbone-lr", "0"], "BACKBONE_LR (--backbone-lr) = '0'", "positive number"),
    (["--head-lr=-1e-3"], "HEAD_LR", "positive number"),
    (["--head-lr", "fast"], "HEAD_LR (--head-lr) = 'fast'", "positive number"),
    (["--backbone-lr", "nan"], "BACKBONE_LR", "positive number"),
    (["--batch-size", "0"], "BATCH_SIZE (--batch-size) = '0'", "whole number >= 2"),
    (["--batch-size", "1"], "BATCH_SIZE (--batch-size) = '1'", "BatchNorm in train mode needs 2 or more"),
    (["--batch-size", "3.5"], "BATCH_SIZE", "whole number >= 2"),
    (["--epochs", "0"], "EPOCHS (--epochs) = '0'", "whole number >= 1"),
    (["--patience", "-1"], "PATIENCE", "whole number >= 0"),
    (["--min-delta", "-0.1"], "MIN_DELTA", "number >= 0"),
    (["--val-fraction", "0"], "VAL_FRACTION", "strictly between 0 and 1"),
    (["--val-fraction", "1"], "VAL_FRACTION", "strictly between 0 and 1"),
    (["--val-fraction", "1.5"], "VAL_FRACTION", "strictly between 0 and 1"),
    (["--image-size", "16"], "IMAGE_SIZE (--image-size) = '16'", "expected auto or a whole number from 32 to 512"),
    (["--image-size", "4096"], "IMAGE_SIZE", "from 32 to 512"),
    (["--seed", "-1"], "SEED (--seed) = '-1'", "from 0 to 4294967295"),
    (["--seed", "99999999999999999999"], "SEED", "from 0 to 4294967295"),
    (["--weights", "/dev/null"], "WEIGHTS", "not a regular file"),
    (["--image-size", "big"], "IMAGE_SIZE", "from 32 to 512"),
    (["--weights", "imagenet22k"], "WEIGHTS (--weights) = 'imagenet22k'", "IMAGENET1K_V1, none"),
    (["--weights", "missing/resnet.pth"], "WEIGHTS", "no such file"),
    (["--monitor", "train_loss"], "MONITOR", "val_loss, val_acc"),
    (["--num-workers", "-2"], "NUM_WORKERS", "whole number >= 0"),
    (["--unfreeze-schedule", "5:layer9"], "UNFREEZE_SCHEDULE", "unknown block 'layer9'"),
    (["--unfreeze-schedule", "5:layer3"], "UNFREEZE_SCHEDULE", "layer3 is already trainable"),
    (["--unfreeze-schedule", "3:layer1,6:layer2"], "UNFREEZE_SCHEDULE", "layer2 is already trainable"),
    (["--unfreeze-schedule", "16:layer2"], "UNFREEZE_SCHEDULE", "epoch 16 is outside 1..15"),
    (["--unfreeze-schedule", "0:layer2"], "UNFREEZE_SCHEDULE", "outside 1..15"),
    (["--unfreeze-schedule", "soon:layer2"], "UNFREEZE_SCHEDULE", "EPOCH:BLOCK"),
    (["--unfreeze-schedule", "5:layer2,5:layer1"], "UNFREEZE_SCHEDULE", "appears twice"),
    (["--freeze-until", "none", "--unfreeze-schedule", "2:layer1"], "UNFREEZE_SCHEDULE", "already trainable"),
    (["--run-name", "../elsewhere"], "--run-name", "plain folder name"),
]


@pytest.mark.parametrize("args,names,allowed", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_bad_setting_gets_a_one_line_error(args, names, allowed, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ft, "load_cifar10", lambda d: pytest.fail("data must not be touched"))
    code = ft.main(args + ["--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert names in err and allowed in err
    assert "Traceback" not in err


def test_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for option in ["--data-dir", "--output-dir"]:
        assert ft.main([option, str(tmp_path / "afile")]) == 2
        err = capsys.readouterr().err
        assert f"{option}) = '{tmp_path / 'afile'}' is not allowed: it is a file" in err


def test_folder_that_is_not_writable_is_refused(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    # Tests run as root in CI, where permissions never deny; ask os.access the way a normal user's would answer.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    assert ft.main(["--output-dir", str(locked / "runs")]) == 2
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_val_fraction_that_empties_a_split_is_refused(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch, 40, 10)
    assert ft.main(["--weights", "none", "--val-fraction", "0.01", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "VAL_FRACTION (--val-fraction) = 0.01 is not allowed: it leaves 40 training and 0 validation" in err


def test_batch_larger_than_the_training_split_is_refused(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch, 100, 10)
    assert ft.main(["--weights", "none", "--batch-size", "128", "--output-dir", str(tmp_path)]) == 2
    assert "BATCH_SIZE (--batch-size) = 128 is not allowed: the training split has only 90 images" in (
        capsys.readouterr().err)


def test_bad_setting_through_the_real_script_has_no_traceback():
    result = subprocess.run([sys.executable, str(ROOT / "fine_tuning.py"), "--batch-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: BATCH_SIZE (--batch-size) = '0' is not allowed: expected a whole "
                                     "number >= 2 (BatchNorm in train mode needs 2 or more images to normalise over)")


@pytest.mark.parametrize("module", ["tqdm", "torchvision"])
def test_a_missing_package_says_how_to_install_it(module):
    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['fine_tuning.py', '--dry-run']; "
            f"runpy.run_path({str(ROOT / 'fine_tuning.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {module} is not installed. Run: pip install -r requirements.txt"
