"""Stopping and going on: Ctrl-C or SIGTERM mid-epoch tests the best weights so far and prints the
resume command; a resume on the CPU is exact, also with other workers, in a moved folder, or on
another device; DataLoader workers never outlive the run."""

import csv
import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

import torch

import fine_tuning as ft
from conftest import (
    PYTHON,
    epoch_row,
    load_state,
    run,
    save_as_on_a_gpu,
    start_script,
    tiny,
    write_image_folder,
)

LONG = ["--epochs", "30", "--patience", "30", "--min-delta", "0"]
# What a run says where Ctrl-C ended `| tee log` too, on stderr, before what is kept
TEE_GONE = "error: the output's reader is gone (Ctrl-C ends `| tee` too; `| tee -i` lives on)"


def history(run_dir, timed=True):
    """history.csv's rows; timed=False leaves out the seconds, which differ from run to run."""
    with open(run_dir / "history.csv") as file:
        rows = list(csv.DictReader(file))
    if not timed:
        for row in rows:
            del row["seconds"]
    return rows


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


def ctrl_c_at_batch(monkeypatch, batch):
    """A real SIGINT to this process while the training step augments its `batch`-th batch."""
    random_crop_flip = ft.random_crop_flip
    calls = []

    def augment(*args, **kwargs):
        calls.append(1)
        if len(calls) == batch:
            os.kill(os.getpid(), signal.SIGINT)
        return random_crop_flip(*args, **kwargs)

    monkeypatch.setattr(ft, "random_crop_flip", augment)


def test_ctrl_c_mid_epoch_tests_the_best_weights_and_the_resume_is_exact(
    real_files, tmp_path, capsys, monkeypatch
):
    # 90 training images in batches of 8: 11 batches an epoch. Ctrl-C during epoch 2's 5th.
    args = tiny(real_files, tmp_path, "--epochs", "3", "--patience", "5", "--min-delta", "0")
    with monkeypatch.context() as patch:
        ctrl_c_at_batch(patch, 11 + 5)
        code, out, err = run(capsys, *args, "--run-name", "stopped")
    run_dir = tmp_path / "stopped"
    assert code == 130 and "Traceback" not in err, out + err
    assert "stopped: interrupted (Ctrl-C)" in out
    assert "test accuracy" in out and "the weights of epoch 1" in out  # the best so far
    assert f"resume with: {PYTHON} fine_tuning.py --resume {run_dir}" in out
    assert json.loads((run_dir / "results.json").read_text())["stop_reason"].startswith("interr")
    assert len(history(run_dir)) == 1 and load_state(run_dir / "last.pt")["epoch"] == 1
    # Resumed, with two DataLoader workers and no ImageNet weights in the cache (last.pt holds every
    # weight: nothing to download), it ends with exactly the weights of an unbroken run.
    with monkeypatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path / "another machine's empty cache"))
        code, out, err = run(capsys, "--resume", run_dir, "--num-workers", "2")
    assert code == 0 and f"resuming {run_dir} after epoch 1" in out, err
    code, _, err = run(capsys, *args, "--run-name", "straight")
    assert code == 0, err
    straight = load_state(tmp_path / "straight" / "best.pt")
    resumed = load_state(run_dir / "best.pt")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    losses = [[row["train_loss"], row["val_loss"]] for row in history(tmp_path / "straight")]
    assert losses == [[row["train_loss"], row["val_loss"]] for row in history(run_dir)]


def test_ctrl_c_to_the_process_group_ends_the_workers_quietly(cifar_root, torch_home, tmp_path):
    # A terminal sends Ctrl-C to the whole group: PyTorch's worker loop ends quietly at it.
    args = tiny(cifar_root, tmp_path, *LONG, "--num-workers", "2", "--run-name", "group")
    process = start_script(args, torch_home, cifar_root / "md5.json", start_new_session=True)
    epoch_row(process, 2)
    workers = children(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in out + err, out + err
    assert "stopped: interrupted (Ctrl-C)" in out and "test accuracy" in out
    assert f"resume with: {PYTHON} fine_tuning.py --resume {tmp_path / 'group'}" in out
    assert load_state(tmp_path / "group" / "last.pt")["epoch"] >= 1  # whole, and loadable
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)]


def test_a_second_ctrl_c_during_the_test_stops_at_once(tmp_path, capsys, monkeypatch):
    evaluate = ft.evaluate

    def ctrl_c_in_the_test(model, loader, inputs, amp_dtype=None, desc="val"):
        if desc == "test":
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(model, loader, inputs, amp_dtype, desc)

    monkeypatch.setattr(ft, "evaluate", ctrl_c_in_the_test)
    ctrl_c_at_batch(monkeypatch, 2)  # a dry run's epochs have 1 batch: in epoch 2
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "twice")
    assert code == 130 and "test accuracy" not in out and not err, out + err
    assert out.endswith(f"resume with: {PYTHON} fine_tuning.py --resume {tmp_path / 'twice'}\n")


def test_cli_gives_back_the_sigterm_handler_it_found(capsys):
    # SIGTERM is Ctrl-C only while a run runs: then, in a notebook, it is the kernel's again.
    def kernels_handler(signum, frame):
        pass

    found = signal.signal(signal.SIGTERM, kernels_handler)
    try:
        code, out, err = run(capsys, "--dry-run", "--epochs", "0")
        assert code == 2 and "EPOCHS (--epochs)" in err
        assert signal.getsignal(signal.SIGTERM) is kernels_handler
    finally:
        signal.signal(signal.SIGTERM, found)


def test_sigterm_stops_like_ctrl_c_and_exits_143(cifar_root, torch_home, tmp_path):
    args = tiny(cifar_root, tmp_path, *LONG, "--run-name", "term")
    process = start_script(args, torch_home, cifar_root / "md5.json")
    epoch_row(process, 2)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 15 and process.returncode == 143, out + err
    run_dir = tmp_path / "term"
    assert "stopped: interrupted (SIGTERM)" in out and "test accuracy" in out
    assert f"kept in {run_dir}: best.pt config.json history.csv last.pt results.json\n" in out
    assert f"resume with: {PYTHON} fine_tuning.py --resume {run_dir}" in out


def test_a_log_keeps_every_line_printed_before_the_run_was_killed(torch_home, tmp_path):
    # `python fine_tuning.py > log` (or `| tee log`, a scheduler's log): stdout is no terminal, and
    # Python would keep 8 KB of it in a buffer, lost to a kill (out of memory, a time limit)
    args = ["--dry-run", "--output-dir", tmp_path, "--run-name", "killed"]
    process = start_script(args, torch_home)
    deadline = time.monotonic() + 60
    while not (tmp_path / "killed").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # the run folder is made after the data line is printed
    process.kill()
    out, err = process.communicate(timeout=60)
    assert out.startswith("device: cpu   precision: float32\n"), out + err
    assert "\ndata: 45,000 train / 5,000 validation / 10,000 test images" in out


def test_output_whose_reader_is_gone_stops_the_run_with_one_line_and_the_resume_command(
    torch_home, tmp_path
):
    # `python fine_tuning.py | tee log`, then Ctrl-C: it ends tee too, and the script's next line
    # to stdout raised BrokenPipeError: a traceback (before training, a failed download's line)
    args = ["--dry-run", *LONG, "--output-dir", tmp_path, "--run-name", "teed"]
    process = start_script(args, torch_home)
    epoch_row(process, 1)
    process.stdout.close()  # tee is gone
    code = process.wait(timeout=60)
    err = process.stderr.read()
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith(f"{TEE_GONE}\nkept in {tmp_path / 'teed'}: ")
    assert f"\nresume with: {PYTHON} fine_tuning.py --resume {tmp_path / 'teed'}" in err
    assert (tmp_path / "teed" / "last.pt").exists()


def test_ctrl_c_that_ended_tee_too_in_the_first_epoch_is_said_on_stderr(torch_home, tmp_path):
    # The same, in the first epoch (5 minutes on a CPU): the line Ctrl-C prints, that nothing is
    # kept, raised BrokenPipeError as it was printed, a traceback
    args = ["--dry-run", "--batch-size", "2048", "--output-dir", tmp_path, "--run-name", "teed"]
    process = start_script(args, torch_home)
    for line in process.stdout:
        if line.startswith("trainable parameters:"):  # the block table, then a blank line
            break
    assert process.stdout.readline() == "\n"  # training begins: nothing more printed until it ends
    process.stdout.close()  # tee is gone, and then Ctrl-C reaches the script
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGINT)
    code = process.wait(timeout=60)
    err = process.stderr.read()
    assert code == 130 and "Traceback" not in err, err
    nothing = "no epoch was completed and saved, so nothing to resume: run the same command again."
    assert err == f"{TEE_GONE}\n{nothing}\n"
    assert not (tmp_path / "teed").exists()


def test_a_killed_dataloader_worker_ends_the_run_with_one_line_that_goes_on_without_workers(
    cifar_root, real_files, torch_home, tmp_path, capsys
):
    args = tiny(cifar_root, tmp_path, *LONG, "--num-workers", "2", "--run-name", "oom")
    process = start_script(args, torch_home, cifar_root / "md5.json")
    epoch_row(process, 2)
    workers = children(process.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)  # what an out-of-memory killer does
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err, out + err
    assert err.startswith("error: a DataLoader worker died (") and len(err.splitlines()) == 1
    command = ft.command("--resume", tmp_path / "oom", "--num-workers", 0)
    assert err.endswith(f"Go on without workers: {command}\n")
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)]
    code, out, err = run(capsys, *shlex.split(command)[2:], "--epochs", "3")
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 3)" in out, err


def test_workers_ended_by_sigterm_to_the_process_group_stop_the_run_as_sigterm(
    tmp_path, capsys, monkeypatch
):
    # A scheduler's SIGTERM to every process of the job (Slurm's scancel, `kill -TERM -- -PGID`)
    # may end the workers before the script's own handler runs: torch then reports the workers.
    train_one_epoch = ft.train_one_epoch
    epochs = []

    def terminated_in_epoch_2(*args):
        epochs.append(1)
        if len(epochs) == 2:
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
        return train_one_epoch(*args)

    monkeypatch.setattr(ft, "train_one_epoch", terminated_in_epoch_2)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "scancel")
    assert code == 143 and not err, out + err
    assert out.endswith(f"resume with: {PYTHON} fine_tuning.py --resume {tmp_path / 'scancel'}\n")
    assert load_state(tmp_path / "scancel" / "last.pt")["epoch"] == 1


def stop_after_epoch(monkeypatch, epoch):
    """Ctrl-C right after `epoch` is logged, before its last.pt is written."""
    log_epoch = ft.Run.log_epoch

    def log_then_stop(self, done, *args):
        log_epoch(self, done, *args)
        if done == epoch + 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft.Run, "log_epoch", log_then_stop)


def ctrl_c_in_the_test(monkeypatch):
    """Ctrl-C as the test of the best weights begins."""
    evaluate = ft.evaluate

    def ctrl_c_in_test(model, loader, inputs, amp_dtype=None, desc="val"):
        if desc == "test":
            raise KeyboardInterrupt
        return evaluate(model, loader, inputs, amp_dtype, desc)

    monkeypatch.setattr(ft, "evaluate", ctrl_c_in_test)


def stopped_run(tmp_path, capsys, monkeypatch, *extra):
    """A dry run stopped after its first epoch: its folder, tmp_path/runs/r."""
    args = ["--dry-run", "--epochs", "2", "--patience", "5", *extra]
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *args, "--output-dir", tmp_path / "runs", "--run-name", "r")
    assert code == 130 and "stopped: interrupted" in out, err
    return tmp_path / "runs" / "r"


def test_resume_goes_on_with_the_saved_settings_and_epochs_trains_on(tmp_path, capsys, monkeypatch):
    run_dir = stopped_run(tmp_path, capsys, monkeypatch, "--unfreeze-schedule", "2:layer2")
    config = run_dir / "config.json"
    edited = json.loads(config.read_text())
    edited["settings"]["HEAD_LR"] = (
        0.5  # config.json is a record for people: editing changes nothing
    )
    config.write_text(json.dumps(edited))
    # given its last.pt, as PyTorch's examples take a checkpoint, it resumes the run's folder
    code, out, err = run(capsys, "--resume", run_dir / "last.pt", "--epochs", "3")
    assert code == 0 and f"resuming {run_dir} after epoch 1" in out, err
    assert "\nunfreezing layer2\n" in out and "stopped: all epochs ran (EPOCHS = 3)" in out
    table = out[out.index("\nepoch  ") + 1 :].splitlines()  # the header over its first epoch: 2
    assert table[1].split()[0] == "2" and table[2].split()[0] == "3"
    assert [row["lr_fc"] for row in history(run_dir)] == ["0.001"] * 3
    assert json.loads(config.read_text())["settings"]["EPOCHS"] == 3


def test_a_resume_given_new_settings_stopped_in_its_first_epoch_repeats_them_in_its_command(
    tmp_path, capsys, monkeypatch
):
    # On a laptop after Colab, its data elsewhere: resumed to train on, stopped in its first epoch
    # (the CPU is slow).
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    data = tmp_path / "datasets"
    with monkeypatch.context() as patch:
        ctrl_c_at_batch(patch, 1)
        code, out, err = run(capsys, "--resume", run_dir, "--epochs", "3", "--data-dir", data)
    assert code == 130 and "stopped: interrupted (Ctrl-C)" in out, err
    last_line = out.splitlines()[-1]
    go_on = ft.command("--resume", run_dir, "--epochs", 3, "--data-dir", data)
    assert last_line == f"resume with: {go_on}"
    assert load_state(run_dir / "last.pt")["settings"]["EPOCHS"] == 2  # the old one, still
    code, out, err = run(capsys, *shlex.split(go_on)[2:])  # as pasted
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 3)" in out, err
    assert json.loads((run_dir / "config.json").read_text())["settings"]["DATA_DIR"] == str(data)


def test_a_resume_given_new_settings_whose_epochs_all_ran_repeats_them_and_goes_to_the_test(
    tmp_path, capsys, monkeypatch
):
    # Resumed to train on to epoch 3, which completes, its summary.csv in another folder;
    # Ctrl-C in the test. `--epochs 3`, as many as done, goes straight to the test.
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    given = ["--epochs", "3", "--output-dir", tmp_path / "compared"]
    with monkeypatch.context() as patch:
        ctrl_c_in_the_test(patch)
        code, out, err = run(capsys, "--resume", run_dir, *given)
    assert code == 130, err
    go_on = ft.command("--resume", run_dir, *given)
    assert out.splitlines()[-1] == f"resume with: {go_on}"
    code, out, err = run(capsys, *shlex.split(go_on)[2:])  # as pasted
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 3)" in out, err
    assert "epoch  train loss" not in out and len(history(run_dir)) == 3  # no epoch trained
    config = json.loads((run_dir / "config.json").read_text())  # a dry run: no summary.csv row
    assert config["settings"]["OUTPUT_DIR"] == str(tmp_path / "compared")


def test_a_resume_may_end_a_run_before_its_scheduled_unfreezing(tmp_path, capsys, monkeypatch):
    # Stopped after epoch 1 of 4, with layer2 to be released at epoch 3: enough, to the test.
    schedule = ["--epochs", "4", "--unfreeze-schedule", "3:layer2"]
    run_dir = stopped_run(tmp_path, capsys, monkeypatch, *schedule)
    code, out, err = run(capsys, "--resume", run_dir, "--epochs", "1")
    assert code == 0, err
    assert "stopped: all epochs ran (EPOCHS = 1); the scheduled unfreezing 3:layer2" in out
    assert "unfreezing layer2" not in out


def test_a_moved_project_resumes_and_adds_to_the_summary_beside_the_run(
    real_files, tmp_path, capsys, monkeypatch
):
    # As from Colab to a laptop: the project is elsewhere now, and its data in another folder.
    colab = tmp_path / "colab"
    shutil.copytree(real_files / "cifar-10-batches-py", colab / "data" / "cifar-10-batches-py")
    monkeypatch.chdir(colab)
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *tiny("data", "runs", "--run-name", "r"))
    assert code == 130, err
    colab.rename(tmp_path / "laptop")
    (tmp_path / "laptop" / "data").rename(tmp_path / "laptop" / "datasets")
    monkeypatch.chdir(tmp_path / "laptop")
    code, out, err = run(capsys, "--resume", "runs/r", "--data-dir", "datasets")
    assert code == 0 and "resuming runs/r after epoch 1" in out, err
    with open("runs/summary.csv") as file:
        assert [row["run"] for row in csv.DictReader(file)] == ["r"]
    assert json.loads(Path("runs/r/config.json").read_text())["settings"]["DATA_DIR"] == "datasets"


def test_a_run_resumed_with_output_dir_adds_its_row_to_that_folders_summary(
    real_files, tmp_path, capsys, monkeypatch
):
    # The run's folder stays where it is; its row joins the runs the learner compares it with.
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *tiny(real_files, tmp_path / "scratch", "--run-name", "r"))
    assert code == 130, err
    run_dir = tmp_path / "scratch" / "r"
    code, out, err = run(capsys, "--resume", run_dir, "--output-dir", tmp_path / "runs")
    assert code == 0 and f"resuming {run_dir} after epoch 1" in out, err
    assert not (tmp_path / "scratch" / "summary.csv").exists()
    with open(tmp_path / "runs" / "summary.csv") as file:
        assert [row["run"] for row in csv.DictReader(file)] == ["r"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["OUTPUT_DIR"] == str(tmp_path / "runs")


def test_a_resume_given_output_dir_and_stopped_again_prints_a_command_that_keeps_it(
    real_files, tmp_path, capsys, monkeypatch
):
    # last.pt's OUTPUT_DIR is not read back (a moved run's would point elsewhere): the printed
    # command repeats the flag, so that the run's row still joins the runs it is compared with.
    args = tiny(real_files, tmp_path / "scratch", "--epochs", "3", "--run-name", "r")
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *args)
    assert code == 130, err
    run_dir = tmp_path / "scratch" / "r"
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)  # epoch 2, the resumed process's first, is cut
        code, out, err = run(capsys, "--resume", run_dir, "--output-dir", tmp_path / "runs")
    assert code == 130, err
    command = f"{PYTHON} fine_tuning.py --resume {run_dir} --output-dir {tmp_path / 'runs'}"
    assert out.endswith(f"resume with: {command}\n")
    code, out, err = run(capsys, *shlex.split(command)[2:])  # as a shell reads it
    assert code == 0, err
    assert not (tmp_path / "scratch" / "summary.csv").exists()
    with open(tmp_path / "runs" / "summary.csv") as file:
        assert [row["run"] for row in csv.DictReader(file)] == ["r"]


def test_a_dataloader_worker_killed_before_an_epoch_completed_says_try_without_workers(
    tmp_path, capsys, monkeypatch
):
    def killed(*args):  # torch's words for a worker the out-of-memory killer ended
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(ft, "train_one_epoch", killed)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "first")
    assert code == 1 and err == (
        "error: a DataLoader worker died (DataLoader worker (pid 4242) is killed by signal:"
        " Killed. ), perhaps for lack of memory. Try --num-workers 0\n"
    )
    assert not (tmp_path / "first").exists()  # nothing to resume: the same command again


def test_a_run_resumed_on_another_device_says_what_carries_over(tmp_path, capsys, monkeypatch):
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    state = load_state(run_dir / "last.pt")
    state["device"] = "cuda"  # as if it had trained on Colab's GPU
    save_as_on_a_gpu(state, run_dir / "last.pt", monkeypatch)
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0, err
    assert (
        "note: this run trained on cuda; here, on cpu, it keeps its image size (32 px) and takes"
        " this device's precision (above). Its last epoch took" in out
    )


def test_a_cpu_run_resumes_where_float16_needs_the_gradient_scaler(tmp_path, capsys, monkeypatch):
    run_dir = stopped_run(tmp_path, capsys, monkeypatch, "--batch-size", "2")  # float16 is slow
    assert load_state(run_dir / "last.pt")["scaler"] == {}  # float32: the scaler saved nothing
    monkeypatch.setattr(ft, "choose_device", lambda: (torch.device("cpu"), torch.float16))  # a T4
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 2)" in out, err


def test_a_resume_takes_the_workers_of_the_machine_it_runs_on(tmp_path, capsys, monkeypatch):
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    state = load_state(run_dir / "last.pt")
    state["settings"]["NUM_WORKERS"] = 2  # "auto" on a Colab GPU
    torch.save(state, run_dir / "last.pt")
    assert ft.parse_settings(["--resume", run_dir]).num_workers == 0  # "auto" here, on the CPU
    assert ft.parse_settings(["--resume", run_dir, "--num-workers", "1"]).num_workers == 1


def test_resume_refuses_settings_that_change_the_result(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "--resume", tmp_path, "--head-lr", "0.01")  # before any file is read
    assert code == 2 and len(err.splitlines()) == 1
    free = "only --epochs, --dataset, --data-dir, --output-dir and --num-workers may change"
    assert f"{free}, not --head-lr" in err
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 2)  # epoch 2 completes: last.pt holds 2 done
        code, out, err = run(capsys, "--resume", run_dir, "--epochs", "3")
    assert code == 130 and "resume with: " in out, err
    code, _, err = run(capsys, "--resume", run_dir, "--epochs=1")  # a free setting, = or not
    assert code == 2 and len(err.splitlines()) == 1
    done = "EPOCHS (--epochs) = 1 is not allowed: the run has done 2 epochs; give 2 to go on"
    assert err.endswith(f"{done} to the test, or more to train on\n")
    other = write_image_folder(tmp_path / "insects", per_class=20)  # may move, not change classes
    code, _, err = run(capsys, "--resume", run_dir, "--dataset", other)
    assert code == 2 and len(err.splitlines()) == 1
    assert "--resume: the run learned the classes airplane, automobile," in err
    assert err.endswith(f"DATASET (--dataset) {other} has ants, bees, wasps\n")
    assert (run_dir / "last.pt").exists()


def test_a_folder_run_resumes_from_where_its_folder_moved(tmp_path, capsys, monkeypatch):
    photos = write_image_folder(tmp_path / "photos")
    run_dir = stopped_run(tmp_path, capsys, monkeypatch, "--dataset", photos, "--batch-size", "8")
    photos.rename(tmp_path / "moved")
    code, _, err = run(capsys, "--resume", run_dir)
    moved = ft.command("--resume", run_dir, "--dataset", "FOLDER")  # its new place
    line = f"DATASET (--dataset): there is no folder {photos}. Moved? {moved}\n"
    assert code == 2 and err.endswith(line), err
    code, _, err = run(capsys, "--resume", run_dir, "--epochs", "3")  # a longer run, elsewhere
    longer = ft.command("--resume", run_dir, "--dataset", "FOLDER", "--epochs", 3)  # kept
    assert code == 2 and err.endswith(f"Moved? {longer}\n"), err
    with monkeypatch.context() as patch:  # Ctrl-C in the first epoch of the resume
        patch.setattr(ft, "train_one_epoch", lambda *args: os.kill(os.getpid(), signal.SIGINT))
        code, out, err = run(capsys, "--resume", run_dir, "--dataset", tmp_path / "moved")
    go_on = ft.command("--resume", run_dir, "--dataset", tmp_path / "moved")  # last.pt: the old
    assert code == 130 and out.splitlines()[-1] == f"resume with: {go_on}", out + err
    code, out, err = run(capsys, *shlex.split(go_on)[2:])
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 2)" in out, err


def test_resume_of_a_finished_run_or_of_nothing_says_so(tmp_path, capsys):
    code, _, err = run(
        capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path, "--run-name", "f"
    )
    assert code == 0, err
    code, _, err = run(capsys, "--resume", tmp_path / "f")
    assert code == 2
    finished = f"--resume: {tmp_path / 'f'} finished (and removed its last.pt). A new run can start"
    assert finished in err and len(err.splitlines()) == 1
    new_run = shlex.split(err.split("from its weights: ")[1])  # to train on: a command to paste
    assert new_run == [PYTHON, "fine_tuning.py", "--weights", str(tmp_path / "f" / "best.pt")]
    code, _, err = run(capsys, "--resume", tmp_path)  # the output folder, not a run's folder
    assert code == 2
    assert err.endswith(f"--resume: {tmp_path} is not a run folder: it has no last.pt\n")
    code, _, err = run(capsys, "--resume", tmp_path / "nowhere")
    assert code == 2 and err.endswith(f"--resume: there is no folder {tmp_path / 'nowhere'}\n")
    cut = tmp_path / "cut"  # a last.pt copied from Colab, the copy cut short (or empty)
    cut.mkdir()
    torch.save({"epoch": 1, "model": torch.zeros(1000)}, cut / "last.pt")
    for size in (os.path.getsize(cut / "last.pt") // 2, 0):
        os.truncate(cut / "last.pt", size)
        code, _, err = run(capsys, "--resume", cut)
        assert code == 2 and len(err.splitlines()) == 1
        assert f"--resume: cannot read {cut / 'last.pt'} (" in err
        assert err.endswith("); copy it again, whole\n")


def test_ctrl_c_in_the_first_epoch_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    ctrl_c_at_batch(monkeypatch, 1)
    code, out, err = run(capsys, "--dry-run", "--output-dir", tmp_path, "--run-name", "early")
    assert code == 130
    assert (
        "no epoch was completed and saved, so nothing to resume: run the same command again." in out
    )
    assert not (tmp_path / "early").exists()


def test_ctrl_c_before_a_resume_trains_leaves_its_run_as_it_was(tmp_path, capsys, monkeypatch):
    run_dir = stopped_run(tmp_path, capsys, monkeypatch)
    saved = (run_dir / "last.pt").read_bytes()

    def reading_a_folder(cfg):  # photos take a while to read: a learner may change their mind
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ft, "load_data", reading_a_folder)
        code, out, err = run(capsys, "--resume", run_dir)
    assert code == 130 and not err, err
    assert out.endswith("\nstopped before training began: run the same command again.\n")
    assert (run_dir / "last.pt").read_bytes() == saved
    code, out, err = run(capsys, "--resume", run_dir)  # the same command, again
    assert code == 0 and "resuming" in out, err


def test_a_run_stopped_after_an_unfreezing_resumes_exactly(tmp_path, capsys, monkeypatch):
    # layer3 joins at epoch 1: last.pt of epoch 1 holds Adam's state for its parameter group.
    schedule = ["--freeze-until", "layer3", "--unfreeze-schedule", "1:layer3"]
    run_dir = stopped_run(tmp_path, capsys, monkeypatch, *schedule)
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0, err
    assert "unfreezing layer3\nresuming" in out  # the run's groups, in order, before Adam's state
    args = ["--dry-run", "--epochs", "2", "--patience", "5", *schedule, "--run-name", "unbroken"]
    code, out, err = run(capsys, *args, "--output-dir", tmp_path / "runs")
    assert code == 0, err
    resumed_rows = history(run_dir, timed=False)
    assert resumed_rows == history(tmp_path / "runs" / "unbroken", timed=False)
    assert len(resumed_rows) == 2
    straight = load_state(tmp_path / "runs" / "unbroken" / "best.pt")
    resumed = load_state(run_dir / "best.pt")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_a_float16_run_resumes_with_its_gradient_scalers_state(
    real_files, tmp_path, capsys, monkeypatch
):
    # A T4's choice (float16 with the scaler), made on the CPU, which runs both as a GPU would.
    monkeypatch.setattr(ft, "choose_device", lambda: (torch.device("cpu"), torch.float16))
    checkpoint = ft.Run.checkpoint
    scalers = {}  # (run, epoch): the scaler's state that last.pt saves

    def recording(self, epoch):
        state = checkpoint(self, epoch)
        scalers[self.dir.name, epoch] = state["scaler"]
        return state

    monkeypatch.setattr(ft.Run, "checkpoint", recording)
    fast = ["--freeze-until", "layer4", "--train-per-class", "3"]  # float16 is slow on a CPU
    args = tiny(real_files, tmp_path, *fast, "--patience", "5", "--min-delta", "0")
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = run(capsys, *args, "--run-name", "stopped")
    assert code == 130, out + err
    code, out, err = run(capsys, "--resume", tmp_path / "stopped")
    assert code == 0, err
    code, out, err = run(capsys, *args, "--run-name", "unbroken")
    assert code == 0, err
    assert scalers["unbroken", 2] != scalers["unbroken", 1]  # its scale or its count of steps
    assert scalers["stopped", 2] == scalers["unbroken", 2]  # not a new scaler's
    resumed_rows = history(tmp_path / "stopped", timed=False)
    assert resumed_rows == history(tmp_path / "unbroken", timed=False) and len(resumed_rows) == 2


def test_a_run_stopped_early_and_interrupted_in_its_test_resumes_to_the_test(
    tmp_path, capsys, monkeypatch
):
    # PATIENCE 1 and a MIN_DELTA no epoch beats: epoch 2 ends training; Ctrl-C during the test.
    args = ["--dry-run", "--epochs", "5", "--patience", "1", "--min-delta", "10"]
    with monkeypatch.context() as patch:
        ctrl_c_in_the_test(patch)
        code, out, err = run(capsys, *args, "--output-dir", tmp_path, "--run-name", "r")
    assert code == 130 and "resume with: " in out, err
    code, out, err = run(capsys, "--resume", tmp_path / "r")
    assert code == 0, err
    assert "resuming" in out and "epoch  train loss" not in out  # no epoch: straight to the test
    assert "stopped: early stopping: val_loss did not improve on epoch 1" in out
    assert len(history(tmp_path / "r")) == 2
