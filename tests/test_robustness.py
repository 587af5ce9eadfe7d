"""Clear errors for what goes wrong outside the code; nothing lost on Ctrl-C; exact resume; safe files."""
import csv
import json
import os
import signal
import time

import pytest
import torch
from torchvision import models

import fine_tuning as ft
from conftest import common_args, load_model_state, run_script, start_script
from fake_cifar10 import write_cifar10
from helpers import small_setup, use_synthetic_data


def assert_clean_failure(result, code, *phrases):
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)


# --- downloads and data ------------------------------------------------------

def test_cifar10_download_failure_says_what_failed_and_where_to_put_a_copy(torch_home, tmp_path):
    result = run_script(common_args(tmp_path / "empty", tmp_path / "runs"), torch_home)
    assert_clean_failure(result, 1, "could not download CIFAR-10 from https://www.cs.toronto.edu/",
                         "URLError", "cifar-10-python.tar.gz", "cifar-10-batches-py", "--dry-run")


def test_weights_download_failure_says_where_to_put_the_file(cifar_root, tmp_path):
    result = run_script(common_args(cifar_root, tmp_path / "runs"), tmp_path / "fresh_torch_home",
                        md5=cifar_root / "md5.json")
    assert_clean_failure(result, 1, "could not download the ImageNet weights from "
                         "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                         str(tmp_path / "fresh_torch_home" / "hub" / "checkpoints"), "--weights PATH", "--dry-run")


def test_truncated_cifar10_file_names_the_folder_to_delete_and_does_not_download(own_cifar, torch_home, tmp_path):
    data, md5 = own_cifar
    damaged = data / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result = run_script(common_args(data, tmp_path / "runs"), torch_home, md5=md5)
    assert_clean_failure(result, 1, "incomplete or corrupted", f"Delete {data / 'cifar-10-batches-py'}")
    assert "could not download" not in result.stderr         # reported, not re-downloaded in a loop


def test_unreadable_cifar10_pickle_is_reported_as_corrupted(monkeypatch, tmp_path):
    from torchvision import datasets
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    # Suppose the md5 check had passed: the pickle error itself must still read as "corrupted".
    monkeypatch.setattr(ft, "cifar10_intact", lambda folder: True)
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    with pytest.raises(ft.RunError, match="incomplete or corrupted"):
        ft.load_cifar10(tmp_path)


class Evil:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint looks like."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_file_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil(marker)}, evil)
    assert ft.main(["--weights", str(evil), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "could run code" in err and "Traceback" not in err
    assert not marker.exists()


def test_poisoned_hub_cache_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Evil(marker)}, cached)
    with pytest.raises(ft.RunError, match="could not be loaded safely") as caught:
        ft.build_model("IMAGENET1K_V1")
    assert "GLOBAL posix.system" in str(caught.value) and "Delete that file" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (torch.zeros(3), "not a state dict"),
    ({"conv1.weight": torch.zeros(64, 3, 3, 3)}, "shapes do not fit ResNet18"),
    ({"encoder.weight": torch.zeros(3)}, "not a ResNet18 state dict"),
])
def test_weights_file_that_is_not_a_resnet18_state_dict_is_refused(content, message, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    if isinstance(content, dict) and "conv1.weight" in content:
        state = models.resnet18().state_dict()
        state.update(content)
        content = state
    torch.save(content, path)
    assert ft.main(["--weights", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: WEIGHTS (--weights) = '{path}' is not allowed") and message in err, err


def test_a_copied_imagenet_file_given_by_path_is_used(torch_home):
    path = next((torch_home / "hub" / "checkpoints").iterdir())
    model = ft.build_model(str(path))
    assert torch.equal(model.conv1.weight, load_model_state(path)["conv1.weight"])


# --- Ctrl-C, resume, atomic files ---------------------------------------------

def read_until_first_epoch_row(process):
    """Read the script's output until the first epoch's row; return what was read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip().startswith("1 ") and "%" in line:
            break
    return "".join(lines)


def interrupt_after_first_epoch(args, torch_home, md5):
    process = start_script(args, torch_home, md5)
    head = read_until_first_epoch_row(process)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    return process.returncode, head + out, err


def test_ctrl_c_keeps_checkpoint_and_history_tests_the_best_model_and_exits_130(cifar_root, torch_home, tmp_path):
    args = common_args(cifar_root, tmp_path / "runs", "--epochs", "6", "--run-name", "stopped")
    code, out, err = interrupt_after_first_epoch(args, torch_home, cifar_root / "md5.json")
    assert code == 130, out + err
    assert "Traceback" not in err
    assert "stopping after this batch" in out and "stopped: interrupted" in out
    assert "test accuracy" in out
    assert "resume with: python fine_tuning.py --resume" in out
    run_dir = tmp_path / "runs" / "stopped"
    assert load_model_state(run_dir / "best.pt")["fc.weight"].shape == (10, 512)
    with open(run_dir / "history.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1"]
    assert json.loads((run_dir / "results.json").read_text())["stop_reason"] == "interrupted"
    assert not (tmp_path / "runs" / "summary.csv").exists()
    assert not list(run_dir.glob("*.tmp"))


def test_ctrl_c_at_a_terminal_with_dataloader_workers_still_stops_cleanly(cifar_root, torch_home, tmp_path):
    # A terminal sends Ctrl-C to the whole process group, DataLoader workers included; the workers
    # ignore it (ignore_ctrl_c), so the main process alone finishes the batch and stops.
    import subprocess
    from conftest import LAUNCHER, script_env
    args = common_args(cifar_root, tmp_path / "runs", "--epochs", "6", "--num-workers", "2", "--run-name", "group")
    process = subprocess.Popen(LAUNCHER + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=script_env(torch_home, cifar_root / "md5.json"), start_new_session=True)
    read_until_first_epoch_row(process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out + err
    assert "Traceback" not in err and "test accuracy" in out
    assert "DataLoader worker" not in err


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(cifar_root, torch_home, tmp_path):
    process = start_script(common_args(cifar_root, tmp_path / "runs", "--epochs", "6", "--run-name", "twice"),
                           torch_home, cifar_root / "md5.json")
    read_until_first_epoch_row(process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert load_model_state(tmp_path / "runs" / "twice" / "best.pt")["fc.weight"].shape == (10, 512)
    assert not list((tmp_path / "runs" / "twice").glob("*.tmp"))


def test_resume_reaches_exactly_the_weights_of_an_uninterrupted_run(cifar_root, torch_home, tmp_path):
    md5 = cifar_root / "md5.json"
    schedule = ["--epochs", "4", "--patience", "9", "--unfreeze-schedule", "3:layer2"]
    straight = run_script(common_args(cifar_root, tmp_path / "runs", *schedule, "--run-name", "straight"),
                          torch_home, md5)
    assert straight.returncode == 0, straight.stderr
    code, out, err = interrupt_after_first_epoch(
        common_args(cifar_root, tmp_path / "runs", *schedule, "--run-name", "resumed"), torch_home, md5)
    assert code == 130, err
    resumed = run_script(["--resume", tmp_path / "runs" / "resumed"], torch_home, md5)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "epoch 3: unfreezing layer2" in resumed.stdout
    for name in ["last.pt", "best.pt"]:
        a = load_model_state(tmp_path / "runs" / "straight" / name)
        b = load_model_state(tmp_path / "runs" / "resumed" / name)
        a, b = (a["model"], b["model"]) if name == "last.pt" else (a, b)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    history = lambda run: (tmp_path / "runs" / run / "history.csv").read_text().splitlines()
    assert [line.split(",")[:5] for line in history("straight")] == [line.split(",")[:5] for line in history("resumed")]


def test_resume_refuses_other_settings_and_missing_state(tmp_path, capsys):
    assert ft.main(["--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert ft.main(["--resume", str(tmp_path), "--run-name", "other"]) == 2
    assert "drop --run-name" in capsys.readouterr().err
    assert ft.main(["--resume", str(tmp_path)]) == 2
    assert "no readable config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert ft.main(["--resume", str(tmp_path)]) == 2
    assert "no readable config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"settings": {}, "dry_run": false, "image_size_used": 32}')
    assert ft.main(["--resume", str(tmp_path)]) == 2
    assert "no completed epoch" in capsys.readouterr().err


def test_resume_with_a_checkpoint_that_does_not_fit_the_settings_is_refused(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch)
    assert ft.main(["--weights", "none", "--epochs", "3", "--output-dir", str(tmp_path), "--run-name", "r"]) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["settings"]["FREEZE_UNTIL"] = "layer4"                  # edited by hand after the run
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    state["epoch"] = 1
    torch.save(state, tmp_path / "r" / "last.pt")
    assert ft.main(["--resume", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "does not fit the settings" in err and "Traceback" not in err


def test_resume_of_a_finished_run_has_nothing_to_do(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch)
    args = ["--weights", "none", "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "done"]
    assert ft.main(args) == 0
    before = (tmp_path / "done" / "last.pt").read_bytes()
    assert ft.main(["--resume", str(tmp_path / "done")]) == 0
    assert "already finished training (1 epochs): nothing to resume" in capsys.readouterr().out
    assert (tmp_path / "done" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("content,message", [
    (b"", "could not read"),
    (b"hello, this is not a checkpoint\n", "could not read"),
])
def test_weights_file_that_is_not_a_pytorch_file_gets_a_clear_error(content, message, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    assert ft.main(["--weights", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: WEIGHTS (--weights):") and message in err and "Traceback" not in err


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    ft.save_torch({"w": torch.ones(3)}, path)
    real_save = torch.save

    def crash_halfway(obj, file):
        real_save(obj, file)
        file.truncate(10)                      # half-written...
        raise OSError("disk full")             # ...and then the crash

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError):
        ft.save_torch({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_model_state(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]      # no temporary file left behind


def test_huge_learning_rate_stops_with_a_nan_message(cifar_root, torch_home, tmp_path):
    result = run_script(common_args(cifar_root, tmp_path / "runs", "--head-lr", "1e30", "--backbone-lr", "1e30",
                                    "--run-name", "nan"), torch_home, cifar_root / "md5.json")
    assert_clean_failure(result, 1, "training diverged: the loss became nan or inf at epoch 1, batch",
                         "lower learning rate")
    assert (tmp_path / "runs" / "nan" / "history.csv").exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)")])
def test_gpu_out_of_memory_suggests_smaller_batch_or_image(error, monkeypatch, tmp_path, capsys):
    def out_of_memory(*args, **kwargs):
        raise error

    use_synthetic_data(monkeypatch)
    monkeypatch.setattr(ft, "train_one_epoch", out_of_memory)
    assert ft.main(["--weights", "none", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "--batch-size" in err and "--image-size" in err


def test_other_runtime_errors_are_bugs_and_keep_their_traceback(monkeypatch, tmp_path):
    use_synthetic_data(monkeypatch)
    monkeypatch.setattr(ft, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        ft.main(["--weights", "none", "--output-dir", str(tmp_path)])


def test_nan_is_reported_at_the_exact_batch_even_between_device_syncs(monkeypatch):
    setup = small_setup(n_train=400)        # 22 batches of 16: all inside one SYNC_EVERY window
    calls = {"n": 0}
    forward = setup.model.forward

    def poisoned(x):
        calls["n"] += 1
        logits = forward(x)
        return logits * float("nan") if calls["n"] == 7 else logits

    monkeypatch.setattr(setup.model, "forward", poisoned)
    with pytest.raises(ft.Diverged) as where:
        ft.train_one_epoch(setup.model, setup.loaders[0], setup.optimizer, setup.hw, torch.Generator(), epoch=3)
    assert (where.value.epoch, where.value.batch) == (3, 7)
    assert ft.SYNC_EVERY > 7


def test_ctrl_c_in_the_first_epoch_exits_130_and_says_there_is_nothing_to_resume(monkeypatch, tmp_path, capsys):
    use_synthetic_data(monkeypatch)
    real_inputs = ft.Hardware.inputs

    def press_ctrl_c_on_batch_2(self, images, augment_with=None):
        if augment_with is not None and press_ctrl_c_on_batch_2.calls == 1:
            ft.on_ctrl_c(None, None)                  # what the first Ctrl-C does
        press_ctrl_c_on_batch_2.calls += augment_with is not None
        return real_inputs(self, images, augment_with)

    press_ctrl_c_on_batch_2.calls = 0
    monkeypatch.setattr(ft.Hardware, "inputs", press_ctrl_c_on_batch_2)
    code = ft.main(["--weights", "none", "--output-dir", str(tmp_path), "--run-name", "early"])
    out = capsys.readouterr().out
    assert code == 130
    assert "stopping after this batch" in out and "nothing to test or to resume" in out
    assert press_ctrl_c_on_batch_2.calls == 2            # the batch in progress was finished, then it stopped
    assert not (tmp_path / "early" / "last.pt").exists() and (tmp_path / "early" / "config.json").exists()
