"""Stopping and going on: Ctrl-C tests the best weights and prints the resume command, SIGTERM keeps
the files, DataLoader workers never outlive the run, and a resume on the CPU is exact."""

import csv
import json
import os
import signal
import time

import torch

import fine_tuning as ft
from conftest import first_epoch_row, load_state, run, start_script, tiny

LONG = ["--epochs", "30", "--patience", "30", "--min-delta", "0"]


def history(run_dir):
    with open(run_dir / "history.csv") as file:
        return [row for row in csv.DictReader(file)]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as file:  # a zombie has ended; only its parent has not read it
        return file.read().split(")")[-1].split()[0] != "Z"


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def test_ctrl_c_finishes_the_batch_tests_the_best_weights_and_a_resume_is_exact(
    cifar_root, real_files, torch_home, tmp_path, capsys
):
    args = tiny(cifar_root, tmp_path, *LONG, "--num-workers", "2")
    process = start_script(args + ["--run-name", "stopped"], torch_home, cifar_root / "md5.json")
    head = first_epoch_row(process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    out = head + out
    assert process.returncode == 130 and "Traceback" not in err, out + err
    run_dir = tmp_path / "stopped"
    assert "Ctrl-C: stopping after this batch (press Ctrl-C again to stop at once)" in out
    assert "stopped: interrupted" in out and "test accuracy" in out
    assert f"resume with: python fine_tuning.py --resume {run_dir}" in out
    assert json.loads((run_dir / "results.json").read_text())["stop_reason"] == "interrupted"
    done = len(history(run_dir))
    assert 1 <= done < 30 and (run_dir / "last.pt").exists()
    # Resumed, the stopped run reaches exactly what an uninterrupted run does (on a CPU).
    target = str(max(done + 1, 3))
    code, out, err = run(capsys, "--resume", run_dir, "--epochs", target)
    assert code == 0 and f"resuming {run_dir} after epoch {done}" in out, err
    settings = [a if a != "30" else target for a in args]
    code, _, err = run(capsys, *settings, "--run-name", "straight")
    assert code == 0, err
    straight = load_state(tmp_path / "straight" / "best.pt")
    resumed = load_state(run_dir / "best.pt")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    losses = [[row["train_loss"], row["val_loss"]] for row in history(tmp_path / "straight")]
    assert losses == [[row["train_loss"], row["val_loss"]] for row in history(run_dir)]


def test_a_second_ctrl_c_to_the_process_group_stops_at_once(cifar_root, torch_home, tmp_path):
    # A terminal sends Ctrl-C to the whole group; the workers ignore it and the script decides.
    args = tiny(cifar_root, tmp_path, *LONG, "--num-workers", "2", "--run-name", "group")
    process = start_script(args, torch_home, cifar_root / "md5.json", start_new_session=True)
    first_epoch_row(process)
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in out + err, out + err
    assert f"resume with: python fine_tuning.py --resume {tmp_path / 'group'}" in out
    assert load_state(tmp_path / "group" / "last.pt")["epoch"] >= 1  # whole, and loadable


def test_sigterm_finishes_the_batch_keeps_the_files_and_exits_143(cifar_root, torch_home, tmp_path):
    args = tiny(cifar_root, tmp_path, *LONG, "--run-name", "term")
    process = start_script(args, torch_home, cifar_root / "md5.json")
    first_epoch_row(process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15 and process.returncode == 143, out + err
    run_dir = tmp_path / "term"
    assert "SIGTERM: stopping after this batch" in out and "test accuracy" not in out
    assert f"kept in {run_dir}: best.pt config.json history.csv last.pt\n" in out
    assert f"resume with: python fine_tuning.py --resume {run_dir}" in out


def test_a_killed_dataloader_worker_ends_the_run_with_one_line_and_no_worker_outlives_it(
    cifar_root, torch_home, tmp_path
):
    args = tiny(cifar_root, tmp_path, *LONG, "--num-workers", "2", "--run-name", "oom")
    process = start_script(args, torch_home, cifar_root / "md5.json")
    first_epoch_row(process)
    workers = children(process.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)  # what an out-of-memory killer does
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err, out + err
    assert err.startswith("error: a DataLoader worker died (") and err.endswith(
        "Try --num-workers 0\n"
    )
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)]


def stop_after_epoch(monkeypatch, epoch, signum=signal.SIGINT):
    """Ctrl-C (or SIGTERM) delivered during training, right after `epoch` is saved."""
    save_epoch = ft.Run.save_epoch

    def save_then_signal(self, done, *args):
        save_epoch(self, done, *args)
        if done == epoch:
            ft.on_stop_signal(signum, None)

    monkeypatch.setattr(ft.Run, "save_epoch", save_then_signal)


def test_resume_continues_with_the_saved_settings_and_epochs_trains_on(
    tmp_path, capsys, monkeypatch
):
    args = ["--dry-run", "--epochs", "2", "--unfreeze-schedule", "2:layer2", "--patience", "5"]
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *args, "--output-dir", tmp_path, "--run-name", "r")
    assert code == 130 and "stopped: interrupted" in out, err
    config = tmp_path / "r" / "config.json"
    edited = json.loads(config.read_text())
    edited["settings"]["HEAD_LR"] = (
        0.5  # config.json is a record for people: editing changes nothing
    )
    config.write_text(json.dumps(edited))
    code, out, err = run(capsys, "--resume", tmp_path / "r", "--epochs", "3")
    assert code == 0, err
    assert "\nunfreezing layer2\n" in out and "stopped: all epochs ran (EPOCHS = 3)" in out
    assert [row["lr_fc"] for row in history(tmp_path / "r")] == ["0.001"] * 3
    assert json.loads(config.read_text())["settings"]["EPOCHS"] == 3


def test_resume_takes_no_other_setting_and_a_finished_run_says_where_its_results_are(
    tmp_path, capsys
):
    code, _, err = run(capsys, "--resume", tmp_path, "--head-lr", "0.01")
    assert code == 2 and "only --epochs may change, not --head-lr" in err
    assert (
        run(capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path, "--run-name", "f")[0]
        == 0
    )
    code, _, err = run(capsys, "--resume", tmp_path / "f")
    assert code == 2 and err.endswith(
        f"{tmp_path / 'f'} has finished; its results are in results.json\n"
    )


def test_ctrl_c_in_the_first_epoch_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    train_one_epoch = ft.train_one_epoch

    def interrupted(*args):
        ft.on_stop_signal(signal.SIGINT, None)  # during the first batch
        return train_one_epoch(*args)

    monkeypatch.setattr(ft, "train_one_epoch", interrupted)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "early")
    assert code == 130
    assert (
        "no epoch was completed: nothing to test or to resume; run the same command again." in out
    )
    assert not (tmp_path / "early").exists()
