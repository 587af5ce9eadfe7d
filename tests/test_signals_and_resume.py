"""Nothing is lost on Ctrl-C or SIGTERM, and a run resumes exactly, from anywhere."""
import csv
import json
import os
import signal
import time

import pytest
import torch
from torchvision import models

import fine_tuning as ft
from conftest import load_state, run, start_script, tiny


def first_epoch_row(process):
    """Read the script's output until the first epoch's row; return what was read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip().startswith("1 ") and "%" in line:
            return "".join(lines)
    raise AssertionError("no epoch row: " + "".join(lines) + process.stderr.read())


def test_ctrl_c_keeps_checkpoint_and_history_tests_the_best_model_and_exits_130(cifar_root, torch_home, tmp_path):
    process = start_script(tiny(cifar_root, tmp_path / "runs", "--epochs", "20", "--run-name", "stopped"),
                           torch_home, cifar_root / "md5.json")
    head = first_epoch_row(process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    out = head + out
    assert process.returncode == 130 and "Traceback" not in err, out + err
    assert "Ctrl-C: stopping after this batch" in out and "stopped: interrupted" in out and "test accuracy" in out
    run_dir = tmp_path / "runs" / "stopped"
    kept = next(line for line in out.splitlines() if line.startswith(f"kept in {run_dir}: "))
    assert {"best.pt", "last.pt", "history.csv", "results.json"} <= set(kept.split(": ")[1].split())
    assert out.count(f"resume with: python fine_tuning.py --resume {run_dir}") == 1
    assert load_state(run_dir / "best.pt")["fc.weight"].shape == (10, 512) and (run_dir / "last.pt").exists()
    with open(run_dir / "history.csv") as file:
        epochs = [int(row["epoch"]) for row in csv.DictReader(file)]
    assert epochs[0] == 1 and epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 20
    assert json.loads((run_dir / "results.json").read_text())["stop_reason"] == "interrupted"
    assert not (tmp_path / "runs" / "summary.csv").exists() and not list(run_dir.glob(".*"))


def test_sigterm_finishes_the_batch_keeps_the_files_and_exits_143_promptly(cifar_root, torch_home, tmp_path):
    process = start_script(tiny(cifar_root, tmp_path / "runs", "--epochs", "20", "--run-name", "term"),
                           torch_home, cifar_root / "md5.json")
    head = first_epoch_row(process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15                                # a scheduler's grace period is about 30 s
    assert process.returncode == 143 and "Traceback" not in err, head + out + err
    run_dir = tmp_path / "runs" / "term"
    assert "SIGTERM: stopping after this batch" in out and "test accuracy" not in out
    assert f"kept in {run_dir}: best.pt config.json history.csv last.pt\n" in out
    assert f"resume with: python fine_tuning.py --resume {run_dir}" in out
    assert all((run_dir / name).is_file() for name in ["best.pt", "last.pt", "history.csv"])


def test_ctrl_c_to_the_whole_process_group_with_workers_and_a_second_ctrl_c_stop_cleanly(cifar_root, torch_home,
                                                                                      tmp_path):
    # A terminal sends Ctrl-C to the whole process group, DataLoader workers included; the workers ignore it,
    # so the main process decides. A second Ctrl-C stops at once, and the checkpoint stays whole.
    process = start_script(tiny(cifar_root, tmp_path / "runs", "--epochs", "20", "--num-workers", "2",
                                "--run-name", "group"), torch_home, cifar_root / "md5.json", start_new_session=True)
    first_epoch_row(process)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err and "DataLoader worker" not in err
    assert load_state(tmp_path / "runs" / "group" / "best.pt")["fc.weight"].shape == (10, 512)
    assert not list((tmp_path / "runs" / "group").glob(".*"))


def stop_after_epoch(monkeypatch, epoch, signum=signal.SIGINT):
    """What Ctrl-C (or SIGTERM) during training does, delivered right after `epoch` is saved."""
    save_epoch = ft.save_epoch

    def save_then_signal(run, *args):
        save_epoch(run, *args)
        if run.history[-1]["epoch"] == epoch:
            ft.on_stop_signal(signum, None)
    monkeypatch.setattr(ft, "save_epoch", save_then_signal)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reaches_exactly_the_weights_of_an_uninterrupted_run(workers, tmp_path, capsys, monkeypatch):
    # With DataLoader workers too: each worker process draws its seed, which must not shift the shuffle.
    schedule = ["--dry-run", "--epochs", "2", "--patience", "9", "--unfreeze-schedule", "2:layer2",
                "--num-workers", workers, "--batch-size", "16", "--output-dir", tmp_path / "runs"]
    code, _, err = run(capsys, *schedule, "--run-name", "straight")
    assert code == 0, err
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *schedule, "--run-name", "resumed")
    assert code == 130 and "stopped: interrupted" in out, err
    code, out, err = run(capsys, "--resume", tmp_path / "runs" / "resumed")
    assert code == 0, err
    assert "resuming" in out and "after epoch 1" in out and "epoch 2: unfreezing layer2" in out
    straight, resumed = (load_state(tmp_path / "runs" / name / "best.pt") for name in ["straight", "resumed"])
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    history = lambda name: [line.split(",")[:5] for line in (tmp_path / "runs" / name / "history.csv").open()]
    assert history("straight") == history("resumed")
    assert not (tmp_path / "runs" / "resumed" / "last.pt").exists()   # finished: only needed to resume


def test_a_run_with_relative_folders_resumes_from_another_working_folder(own_cifar, tmp_path, capsys, monkeypatch):
    from conftest import trust
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    monkeypatch.chdir(tmp_path)
    torch.save(models.resnet18().state_dict(), tmp_path / "start.pt")   # a --weights file, deleted before resuming
    args = ["--data-dir", "data", "--output-dir", "runs", "--weights", "start.pt", "--batch-size", "8", "--epochs", "2"]
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        assert run(capsys, *args, "--run-name", "rel")[0] == 130
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (tmp_path / "start.pt").unlink()                           # a resumed run loads last.pt instead
    code, out, err = run(capsys, "--resume", tmp_path / "runs" / "rel")
    assert code == 0, err                                      # the data was found where it was: no download
    assert (tmp_path / "runs" / "summary.csv").exists() and not (elsewhere / "runs").exists()
    with open(tmp_path / "runs" / "summary.csv") as file:
        assert next(csv.DictReader(file))["WEIGHTS"] == str(tmp_path / "start.pt")


def test_resume_refuses_other_settings_missing_state_and_old_configs(tmp_path, capsys):
    for extra, message in [(["--epochs", "3"], "drop --epochs"), (["--run-name", "other"], "drop --run-name")]:
        (tmp_path / "config.json").write_text("{}")
        code, _, err = run(capsys, "--resume", tmp_path, *extra)
        assert code == 2 and message in err
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run(capsys, "--resume", tmp_path)
    assert code == 2 and "its config.json cannot be read" in err
    (tmp_path / "config.json").write_text(json.dumps({"settings": {"SEED": 0, "EPOCHS": 3}, "dry_run": False}))
    code, _, err = run(capsys, "--resume", tmp_path)
    assert code == 2 and "its config.json has no DATA_DIR, VAL_FRACTION" in err and "older version" in err
    assert run(capsys, "--resume", tmp_path / "nowhere")[0] == 2


def test_resume_of_a_finished_run_or_of_a_run_with_no_completed_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    assert run(capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path, "--run-name", "done")[0] == 0
    code, _, err = run(capsys, "--resume", tmp_path / "done")
    assert code == 0 and f"{tmp_path / 'done'} has already finished: its results are in" in err
    (tmp_path / "done" / "results.json").unlink()
    code, _, err = run(capsys, "--resume", tmp_path / "done")
    assert code == 2 and "no completed epoch to resume from; run the same command again" in err


def test_a_corrupt_or_mismatched_last_pt_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        assert run(capsys, "--dry-run", "--epochs", "3", "--output-dir", tmp_path, "--run-name", "r")[0] == 130
    last, config = tmp_path / "r" / "last.pt", json.loads((tmp_path / "r" / "config.json").read_text())
    good = last.read_bytes()
    last.write_bytes(os.urandom(5000))
    code, _, err = run(capsys, "--resume", tmp_path / "r")
    assert code == 1 and f"the checkpoint {last} is corrupt" in err and "could run code" not in err
    last.write_bytes(good)
    config["settings"]["FREEZE_UNTIL"] = "layer4"                  # edited by hand after the run
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "--resume", tmp_path / "r")
    assert code == 2 and "Traceback" not in err
    assert "FREEZE_UNTIL is 'layer4' in its config.json, but the run was trained with 'layer2'" in err


def test_ctrl_c_in_the_first_epoch_leaves_nothing_and_the_same_command_works_again(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 2)
    progress_iter = ft.Progress.__iter__

    def ctrl_c_during_the_first_batch(self):
        for batch in progress_iter(self):
            if self.desc == "epoch 1" and not self.losses:
                ft.on_stop_signal(signal.SIGINT, None)
            yield batch
    args = ["--dry-run", "--epochs", "1", "--output-dir", tmp_path, "--run-name", "early"]
    with monkeypatch.context() as patch:
        patch.setattr(ft.Progress, "__iter__", ctrl_c_during_the_first_batch)
        code, out, _ = run(capsys, *args)
    assert code == 130 and "stopping after this batch" in out and "nothing to test or to resume" in out
    assert not (tmp_path / "early").exists()
    (tmp_path / "early").mkdir()                                   # as a killed run would leave it
    (tmp_path / "early" / "config.json").write_text(json.dumps({"run": "early", "settings": {}}))
    assert run(capsys, *args)[0] == 0                               # the same command starts over
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a run; choose another name" in err


def test_a_resumed_dry_run_keeps_the_epochs_it_was_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        assert run(capsys, "--dry-run", "--epochs", "5", "--patience", "9", "--output-dir", tmp_path,
                   "--run-name", "d")[0] == 130
    code, out, err = run(capsys, "--resume", tmp_path / "d")
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 5)" in out, err
