"""Every setting, typed as a flag or edited into the constants, is checked before any download and
refused in one line that names the setting, its flag, the value and what is allowed (exit 2); a
mistyped flag gets the nearest one."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import models

import fine_tuning as ft
from conftest import ROOT, run, write_image_folder


def test_help_lists_every_setting_with_its_default(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ft.SETTINGS:
        assert f"{ft.flag(name)} {name}" in out
    assert "default: layer2" in out and "default: 0.0001" in out and "--resume RUN_DIR" in out
    assert "default: CIFAR10" in out
    assert "the constant of its name at the top of fine_tuning.py" in " ".join(out.split())


def test_flags_override_the_constants_and_reach_config_json(tmp_path, capsys):
    args = ["--dry-run", "--epochs", "1", "--seed", "3", "--frozen-bn", "train"]
    args += ["--unfreeze-schedule", "1:layer2", "--output-dir", tmp_path, "--run-name", "flags"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    settings = json.loads((tmp_path / "flags" / "config.json").read_text())["settings"]
    assert settings["SEED"] == 3 and settings["FROZEN_BN"] == "train" and settings["EPOCHS"] == 1
    assert settings["UNFREEZE_SCHEDULE"] == {"1": "layer2"}
    assert settings["OUTPUT_DIR"] == str(tmp_path)


BAD_FLAGS = [  # a flag, and what the one line says
    (
        "--freeze-until layer5",
        "FREEZE_UNTIL (--freeze-until): 'layer5' is not allowed: expected one of",
    ),
    ("--epochs 0", "EPOCHS (--epochs): '0' is not allowed: expected a whole number >= 1"),
    (
        "--head-lr 1e3",
        "HEAD_LR (--head-lr): '1e3' is not allowed: expected a learning rate in (0, 1]",
    ),
    ("--head-lr=-1e-3", "HEAD_LR (--head-lr): '-1e-3' is not allowed"),
    ("--val-fraction 1.5", "VAL_FRACTION (--val-fraction): '1.5' is not allowed"),
    (
        "--batch-size 1",
        "BATCH_SIZE (--batch-size): '1' is not allowed: expected a whole number >= 2",
    ),
    ("--image-size big", "IMAGE_SIZE (--image-size): 'big' is not allowed: expected auto or 1 "),
    (
        "--unfreeze-schedule 5:layer9",
        "UNFREEZE_SCHEDULE (--unfreeze-schedule): '5:layer9' is not allowed: expected none, or"
        " EPOCH:BLOCK pairs such as 5:layer2,10:layer1",
    ),
    (
        "--weights imagenet",
        "WEIGHTS (--weights): 'imagenet' is not allowed: expected IMAGENET1K_V1",
    ),
    (
        "--monitor loss",
        "MONITOR (--monitor): 'loss' is not allowed: expected one of val_loss, val_acc",
    ),
    ("--run-name a/b", "argument --run-name: 'a/b' is not allowed"),
    ("--unfreeze-schedule 2:layer3", "2:layer3 is not allowed: layer3 is trainable by then"),
    (
        "--unfreeze-schedule 2:layer1,4:layer2",  # layer1 at epoch 2 releases layer2 with it
        "4:layer2 is not allowed: layer2 is trainable by then; name a frozen block",
    ),
    ("--dataset CIFAR-10", "DATASET (--dataset): 'CIFAR-10' is not allowed: expected CIFAR10 or"),
    ("--epochs", "EPOCHS (--epochs): expected one argument"),
    (
        "--unfreeze-schedule 16:layer1",  # EPOCHS = 15: the first epoch that never runs
        "16:layer1 is not allowed: epoch 16 is outside 1..15 (EPOCHS)",
    ),
    ("--unfreeze-schedule 0:layer2", "0:layer2 is not allowed: epoch 0 is outside 1..15 (EPOCHS)"),
    (
        "--unfreeze-schedule 5:layer2,5:layer1",  # one epoch twice: neither is dropped unsaid
        "UNFREEZE_SCHEDULE (--unfreeze-schedule): '5:layer2,5:layer1' is not allowed",
    ),
    ("--val-fraction 0.0001", "VAL_FRACTION (--val-fraction) = 0.0001 leaves 0 validation images"),
    ("--train-per-class 4600", "(--train-per-class) = 4600 is not allowed: only 4,500 training"),
    (
        "--train-per-class 99999999999999999999",  # beyond int64: compared as a Python int
        "(--train-per-class) = 99999999999999999999 is not allowed: only 4,500 training",
    ),
    (
        "--batch-size 99999999999999999999",
        "BATCH_SIZE (--batch-size) = 99999999999999999999 is not allowed: the training split has",
    ),
    ("--val-fraction 0.99999", "VAL_FRACTION (--val-fraction) = 0.99999 leaves airplane no train"),
    (
        "--train-per-class 2",
        "BATCH_SIZE (--batch-size) = 32 is not allowed: the training split has",
    ),
]


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[args for args, _ in BAD_FLAGS])
def test_a_bad_setting_gets_one_line_and_exit_2_before_any_download(
    args, message, tmp_path, capsys
):
    folders = ["--data-dir", tmp_path / "data", "--output-dir", tmp_path]
    code, out, err = run(capsys, *folders, *args.split())
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err == f"fine_tuning.py: error: {err.split('error: ', 1)[1]}"  # one line, no usage
    assert len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing downloaded, no run folder


@pytest.mark.parametrize(
    "typed, meant",
    [("--freeze-untill", "--freeze-until"), ("--learning-rate", None), ("--epoch", "--epochs"),
     ("--dryrun", "--dry-run"), ("--head_lr=0.01", "--head-lr"),
     ("--data_dir=/content/drive/MyDrive/data", "--data-dir")],
)  # fmt: skip
def test_a_mistyped_flag_gets_one_line_with_the_nearest_flag(typed, meant, tmp_path, capsys):
    code, out, err = run(capsys, typed, "layer2", "--output-dir", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "usage" not in err
    assert err.startswith(f"fine_tuning.py: error: unrecognized argument {typed}")
    if meant:
        assert f": did you mean {meant}? (--help lists them all)" in err
    else:
        assert "did you mean" not in err


def test_a_folder_given_without_its_flag_is_taken_for_the_dataset_flag(tmp_path, capsys):
    photos = tmp_path / "my photos"
    photos.mkdir()
    code, out, err = run(capsys, photos, "--output-dir", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1
    paste = ft.command("--dataset", photos)  # 'my photos' quoted for the shell
    assert shlex.split(paste)[1:] == ["fine_tuning.py", "--dataset", str(photos)]
    message = f"unrecognized argument {photos}: a folder is given with --dataset: {paste} (--help"
    assert err.startswith(f"fine_tuning.py: error: {message}")
    assert list(tmp_path.iterdir()) == [photos]  # no run folder


def test_a_folder_that_is_not_there_is_named_as_looked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a learner in another folder than their photos' (Colab's /content)
    code, out, err = run(capsys, "--dataset", "my_photos")
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (
        "fine_tuning.py: error: DATASET (--dataset): 'my_photos' is not allowed: expected CIFAR10"
        f" or a folder, and there is no folder {Path.cwd() / 'my_photos'}\n"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, value, message",
    [("EPOCHS", "fifteen", "EPOCHS (--epochs): 'fifteen' is not allowed"),
     ("EPOCHS", 15.5, "EPOCHS (--epochs): '15.5' is not allowed: expected a whole number >= 1"),
     ("BACKBONE_LR", [1e-4], "BACKBONE_LR (--backbone-lr): '[0.0001]' is not allowed"),
     ("UNFREEZE_SCHEDULE", {5: "layer2", 3: "layer9"}, "(--unfreeze-schedule): '5:layer2,3:layer9"),
     ("FREEZE_UNTIL", 2, "FREEZE_UNTIL (--freeze-until): '2' is not allowed")],
)  # fmt: skip
def test_an_edited_constant_is_checked_like_a_flag(
    name, value, message, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(ft, name, value)
    code, _, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 2 and message in err


def test_an_edited_schedule_is_read_like_the_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ft, "UNFREEZE_SCHEDULE", {2: "layer2"})
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 0 and "\nunfreezing layer2\n" in out, err


def test_train_per_class_is_refused_only_above_the_largest_class():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 4)  # a folder's classes differ in size
    cfg = SimpleNamespace(val_fraction=0.1, train_per_class=5, batch_size=2)
    ft.check_splits(labels, ["a", "b", "c"], cfg, test_held_out=False)  # c keeps its 4
    cfg.train_per_class = 10
    with pytest.raises(ft.SettingError, match="only 9 training images per class remain"):
        ft.check_splits(labels, ["a", "b", "c"], cfg, test_held_out=False)


def test_a_dry_run_has_2_epochs_unless_epochs_is_given_or_the_schedule_needs_more():
    assert ft.parse_settings(["--dry-run"]).epochs == ft.DRY_RUN_EPOCHS == 2
    assert ft.parse_settings(["--dry-run", "--epochs", "5"]).epochs == 5
    assert ft.parse_settings(["--dry-run", "--unfreeze-schedule", "4:layer2"]).epochs == 4


def test_a_schedule_is_read_in_epoch_order_however_it_is_written():
    cfg = ft.parse_settings(["--unfreeze-schedule", "10:layer1, 5:Layer2"])  # layer2 goes first
    assert cfg.unfreeze_schedule == {5: "layer2", 10: "layer1"}
    assert list(cfg.unfreeze_schedule) == [5, 10]


def test_the_schedule_comments_example_works_with_the_default_freeze_until(monkeypatch):
    line = next(line for line in (ROOT / "fine_tuning.py").read_text().splitlines()
                if line.startswith("UNFREEZE_SCHEDULE ="))  # fmt: skip
    example = re.search(r"\{\d+: \"\w+\"\}", line).group()  # {5: "layer2"}
    monkeypatch.setattr(ft, "UNFREEZE_SCHEDULE", eval(example))
    cfg = ft.parse_settings([])
    assert cfg.unfreeze_schedule == eval(example) and cfg.freeze_until == ft.FREEZE_UNTIL


def pasted_into_a_notebook(monkeypatch, edits):
    """fine_tuning.py's text run as a notebook cell runs it: no __file__, and the kernel's own
    command line in sys.argv; `edits` replace the constants' values, as a learner edits them.
    Returns the notebook's namespace."""
    source = (ROOT / "fine_tuning.py").read_text()
    for name, value in edits.items():
        source = re.sub(rf"^{name} = .*$", f"{name} = {value!r}", source, count=1, flags=re.M)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    notebook = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), notebook)  # must not raise SystemExit
    return notebook


def test_the_script_pasted_into_a_notebook_cell_runs_on_its_edited_constants(
    monkeypatch, tmp_path, capsys
):
    photos = write_image_folder(tmp_path / "photos")
    edits = dict(DATASET=str(photos), WEIGHTS="none", EPOCHS=2, BATCH_SIZE=8)
    edits["OUTPUT_DIR"] = str(tmp_path / "runs")
    loaders = []
    iterate = DataLoader.__iter__

    def interrupt_kernel(loader):  # Jupyter's "Interrupt" at the start of epoch 2's training
        loaders.append(loader)
        if len(loaders) == 3:
            raise KeyboardInterrupt
        return iterate(loader)

    with monkeypatch.context() as patch:
        patch.setattr(DataLoader, "__iter__", interrupt_kernel)
        notebook = pasted_into_a_notebook(patch, edits)
    out, err = capsys.readouterr()
    assert "stopped: interrupted (Ctrl-C)" in out, err
    resume = out.split("resume with: ")[1].splitlines()[0]
    run_dir = next((tmp_path / "runs").iterdir())
    assert resume == f"cli(['--resume', '{run_dir}'])"  # for a new cell: there is no file to run
    assert eval(resume, notebook) == 0  # that new cell
    out, err = capsys.readouterr()
    assert f"resuming {run_dir} after epoch 1" in out and "all epochs ran (EPOCHS = 2)" in out, err
    assert (tmp_path / "runs" / "summary.csv").exists()
    # Workers started by spawn (Windows; Python 3.14's forkserver) cannot import a notebook's cell.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ft.parse_settings([]).num_workers == 2  # "auto" on CUDA
    assert notebook["parse_settings"]([]).num_workers == 0  # "auto" on CUDA, in a notebook
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pasted_into_a_notebook(monkeypatch, dict(edits, EPOCHS=0))
    assert capsys.readouterr().err == (
        "fine_tuning.py: error: EPOCHS (--epochs): '0' is not allowed: expected a whole number"
        " >= 1\n"
    )


def test_the_script_run_by_percent_run_in_a_notebook_ends_without_an_exception(monkeypatch, capsys):
    # `%run fine_tuning.py --epochs 0`: IPython shows a sys.exit() code other than 0 as an error,
    # "SystemExit: 2", under the script's own line
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "fine_tuning.py"), "--epochs", "0"])
    kernel = {"__name__": "__main__", "__file__": str(ROOT / "fine_tuning.py")}
    exec(compile((ROOT / "fine_tuning.py").read_text(), kernel["__file__"], "exec"), kernel)
    out, err = capsys.readouterr()
    assert err == (
        "fine_tuning.py: error: EPOCHS (--epochs): '0' is not allowed: expected a whole number"
        " >= 1\n"
    )


def test_main_imported_into_a_notebook_takes_the_constants_not_the_kernels_command_line(
    monkeypatch,
):
    # `import fine_tuning; fine_tuning.main()` in Jupyter: sys.argv is the kernel's.
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    monkeypatch.setattr(ft, "EPOCHS", 4)
    assert ft.parse_settings().epochs == 4


def test_the_settings_are_checked_without_the_modules_docstring(monkeypatch, tmp_path, capsys):
    # `python -OO` strips docstrings, and IDLE's `idle -r fine_tuning.py` runs the file behind a
    # line of its own: __doc__ is None, which --help's description split
    monkeypatch.setattr(ft, "__doc__", None)
    code, _, err = run(capsys, "--epochs", "0", "--output-dir", tmp_path)
    assert code == 2 and "EPOCHS (--epochs): '0' is not allowed" in err


def test_a_deleted_constant_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.delattr(ft, "PATIENCE")
    code, _, err = run(capsys, "--dry-run", "--output-dir", tmp_path)
    assert code == 2
    assert (
        err == "fine_tuning.py: error: PATIENCE is missing from the settings at the top of"
        " fine_tuning.py\n"
    )


def test_a_data_dir_that_names_the_cifar10_folder_itself_is_refused(tmp_path, capsys):
    code, _, err = run(
        capsys, "--data-dir", tmp_path / "cifar-10-batches-py", "--output-dir", tmp_path
    )
    assert code == 2 and "not that folder itself" in err


@pytest.mark.parametrize("flag", ["--output-dir", "--data-dir"])
def test_a_folder_on_colabs_drive_not_mounted_is_refused_with_the_mount(
    flag, tmp_path, capsys, monkeypatch
):
    # Colab before drive.mount(): /content/drive is no mount point, and a run or CIFAR-10 written
    # there would stay on the runtime's disk, and go with it (and the mount then fails on them)
    drive = tmp_path / "content" / "drive"
    monkeypatch.setattr(ft, "COLAB_DRIVE", drive)
    given = ["--dry-run", "--output-dir", tmp_path / "runs", flag, drive / "MyDrive" / "runs"]
    code, _, err = run(capsys, *given)
    assert code == 2 and len(err.splitlines()) == 1 and f"({flag}): '{drive}" in err
    assert "Google Drive is not mounted" in err and "drive.mount('/content/drive')" in err
    assert not drive.exists()  # nothing written where the mount will go
    monkeypatch.setattr(ft.os.path, "ismount", lambda path: Path(path) == drive)  # mounted
    cfg = ft.parse_settings(given)
    assert drive / "MyDrive" / "runs" in (cfg.output_dir, cfg.data_dir)


class Payload:
    def __reduce__(self):  # what a malicious file would do when unpickled
        return (print, ("THE CODE RAN",))


def weights_files(folder):
    good = models.resnet18().state_dict()
    files = {
        "code": {"model": Payload()},
        "whole model": models.resnet18(),  # torch.save(model, path): the model object, pickled
        "not a dict": [1, 2, 3],
        "wrong shapes": {**good, "conv1.weight": torch.zeros(64, 3, 3, 3)},
        "not resnet18": models.resnet34().state_dict(),
        "missing": {key: value for key, value in good.items() if not key.startswith("layer4.1")},
    }
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.pt"
        torch.save(content, paths[name])
    paths["garbage"] = folder / "garbage.pt"
    paths["garbage"].write_bytes(b"not a checkpoint" * 100)
    paths["text"] = folder / "text.pt"  # a server's error page, whose letters torch reads as
    paths["text"].write_bytes(b"error code: 1020")  # pickle instructions: an IndexError
    paths["hello"] = folder / "hello.pt"
    paths["hello"].write_bytes(b"hello")  # a KeyError
    paths["empty"] = folder / "empty.pt"  # a copy that failed
    paths["empty"].write_bytes(b"")
    return paths


def test_a_weights_file_that_is_not_resnet18_weights_gets_one_line(tmp_path, capsys):
    expected = {  # torch.load(weights_only=True) and the strict load_state_dict say what is wrong
        "code": "print was not an allowed global by default)",  # torch 2.5: builtins.print
        "whole model": "(UnpicklingError: Unsupported global: GLOBAL"
        " torchvision.models.resnet.ResNet was not an allowed global by default)",
        "not a dict": "(AttributeError: 'list' object has no attribute 'items')",
        "wrong shapes": "size mismatch for conv1.weight: copying a param with shape torch.Size([64,"
        " 3, 3, 3]) from checkpoint, the shape in current model is torch.Size([64, 3, 7, 7]).",
        "not resnet18": 'Unexpected key(s) in state_dict: "layer1.2.conv1.weight"',
        "missing": 'Missing key(s) in state_dict: "layer4.1.conv1.weight"',
        "garbage": "(UnpicklingError: Unsupported operand 110)",  # "n": no pickle's opcode
        "text": "(IndexError: ",
        "hello": "(KeyError: ",
        "empty": "(EOFError",
        "no file": "(FileNotFoundError: ",
    }
    paths = weights_files(tmp_path)
    paths["no file"] = tmp_path / "nowhere.pt"
    for name, path in paths.items():
        code, out, err = run(capsys, "--weights", path, "--output-dir", tmp_path / "runs")
        assert code == 2 and len(err.splitlines()) == 1, (name, err)
        assert f"WEIGHTS (--weights): '{path}' is not allowed: expected IMAGENET1K_V1, none" in err
        assert expected[name] in err and "ResNet18, as a run's best.pt (" in err, err
        assert "THE CODE RAN" not in out + err
        assert "weights_only" not in err  # torch's advice to load it unsafely is not repeated


def test_a_copied_imagenet_file_given_by_path_is_used(real_files, torch_home, tmp_path, capsys):
    copy = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    args = ["--weights", copy, "--data-dir", real_files, "--output-dir", tmp_path, "--epochs", "1"]
    code, out, err = run(capsys, *args, "--batch-size", "8")
    assert code == 0, err
    assert f"model: ResNet18, the weights in {copy}, new 10-class head" in out


def test_an_earlier_runs_best_pt_is_a_start_whatever_its_head(real_files, tmp_path, capsys):
    code, _, err = run(capsys, "--data-dir", real_files, "--output-dir", tmp_path, "--epochs", "1",
                       "--batch-size", "8", "--run-name", "first")  # fmt: skip
    assert code == 0, err
    best = tmp_path / "first" / "best.pt"  # a 10-class head; the folder below has 3 classes
    folder = write_image_folder(tmp_path / "photos")
    args = ["--weights", best, "--dataset", folder, "--output-dir", tmp_path, "--epochs", "1"]
    code, out, err = run(capsys, *args, "--batch-size", "8")
    assert code == 0, err
    assert f"model: ResNet18, the weights in {best}, new 3-class head" in out


def scripts_with(env_codes, tmp_path):
    """Run fine_tuning.py --help in fresh interpreters, side by side, each after its `env_code`
    prepared its imports; their (stderr, returncode)."""
    processes = []
    for env_code in env_codes:
        code = env_code + "\nimport runpy, sys\nsys.argv = ['fine_tuning.py', '--help']\n"
        code += f"runpy.run_path({str(ROOT / 'fine_tuning.py')!r}, run_name='__main__')"
        command = [sys.executable, "-c", code]
        pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes.append(subprocess.Popen(command, cwd=tmp_path, **pipes))
    return [(process.communicate()[1], process.returncode) for process in processes]


def test_a_missing_package_or_a_torchvision_built_for_another_torch_gets_one_line(tmp_path):
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')"
    )
    (missing, missing_code), (mismatch, mismatch_code) = scripts_with(
        [
            "import sys; sys.modules['tqdm'] = None",
            f"import sys; sys.path.insert(0, {str(fake.parent)!r})",
        ],
        tmp_path,
    )
    assert missing_code == 1
    assert missing == "error: tqdm is not installed. Run: pip install -r requirements.txt\n"
    assert mismatch_code == 1 and len(mismatch.splitlines()) == 1
    assert mismatch.startswith("error: torchvision ") and " does not match torch " in mismatch
    assert "pip install --upgrade torch torchvision --index-url" in mismatch  # no CUDA


def test_a_python_or_torch_too_old_gets_one_line(tmp_path):
    # A Mac's own python3 is 3.9: said before the imports, so that torch is not installed for it
    # (the import of a missing package would say "pip install -r requirements.txt" first).
    old_python = "import sys; sys.version_info = (3, 9, 6); sys.modules['torch'] = None"
    old_torch = "import torch; torch.__version__ = '2.4.1+cpu'"
    (python, python_code), (torch_, torch_code) = scripts_with([old_python, old_torch], tmp_path)
    assert python_code == 1 and python == (
        f"error: this script needs Python 3.10 or newer, not 3.9.6 ({sys.executable})\n"
    )
    assert (
        torch_code == 1 and torch_ == "error: this script needs torch 2.5 or newer, not 2.4.1+cpu\n"
    )


def test_an_output_dir_that_cannot_be_made_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / "notes").write_text("a file where a folder is expected")
    code, _, err = run(capsys, "--dry-run", "--output-dir", tmp_path / "notes" / "runs")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(
        f"fine_tuning.py: error: OUTPUT_DIR (--output-dir): cannot make {tmp_path}"
    )
    assert "Not a directory" in err and "Traceback" not in err
