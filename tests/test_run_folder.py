"""A run folder is owned by one run; workers cannot hang a run; every stop leaves the folder as promised and
says how to go on; edited settings, odd files and odd outputs get a one-line error, not a traceback."""
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torchvision import models

import fine_tuning as ft
from conftest import ROOT, load_state, run, start_script, tiny
from test_signals_and_resume import first_epoch_row, stop_after_epoch


def dry(out, *extra):
    return ["--dry-run", "--epochs", "3", "--patience", "9", "--output-dir", out, *extra]


def children(pid):
    """The processes `pid` started (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as file:               # a zombie has ended: only its parent has not read it
        return file.read().split(")")[-1].split()[0] != "Z"


# --- One run folder, one run -----------------------------------------------------------------------------
def test_a_folder_in_use_by_a_running_run_is_refused_to_a_second_run_and_to_a_resume(real_files, torch_home,
                                                                                     tmp_path, capsys):
    process = start_script(tiny(real_files, tmp_path, "--epochs", "40", "--patience", "40", "--run-name", "busy"),
                           torch_home, real_files / "md5.json")
    try:
        first_epoch_row(process)
        code, _, err = run(capsys, *tiny(real_files, tmp_path, "--run-name", "busy"))
        assert code == 2 and err.strip().endswith(f"--run-name: another run is using {tmp_path / 'busy'} now; "
                                                  "choose another name"), err
        code, _, err = run(capsys, "--resume", tmp_path / "busy")
        assert code == 2 and "another run of this script is training in that folder now" in err, err
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 143
    assert ft.lock_run_folder(tmp_path / "busy")                           # free again once the run has stopped
    ft.leave_run_folder()
    assert not (tmp_path / "busy" / ".lock").exists() and (tmp_path / "busy" / "last.pt").exists()


def test_a_folder_this_script_did_not_make_is_never_taken_over(tmp_path, capsys):
    users = tmp_path / "app"
    users.mkdir()
    (users / "config.json").write_text('{"port": 8080}')                    # the user's own files
    (users / "history.csv").write_text("mine\n")
    for args in [dry(tmp_path, "--run-name", "app"), dry(tmp_path, "--run-name", "app", "--epochs", "1")]:
        code, _, err = run(capsys, *args)
        assert code == 2 and "holds files this script did not make (config.json, history.csv)" in err, err
    assert sorted(p.name for p in users.iterdir()) == ["config.json", "history.csv"]   # untouched, no lock left
    assert (users / "config.json").read_text() == '{"port": 8080}'
    (users / "notes.txt").write_text("x")
    (users / "config.json").unlink()
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "app"))
    assert code == 2 and "did not make (history.csv, notes.txt)" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, *dry(tmp_path, "--run-name", "empty", "--epochs", "1"))[0] == 0   # an empty folder is used


# --- Workers that cannot hang the run --------------------------------------------------------------------
def test_a_killed_dataloader_worker_is_named_and_no_process_is_left(real_files, torch_home, tmp_path):
    process = start_script(tiny(real_files, tmp_path, "--epochs", "40", "--patience", "40", "--num-workers", "2",
                                "--run-name", "oom"), torch_home, real_files / "md5.json")
    head = first_epoch_row(process)
    workers = children(process.pid)
    assert len(workers) >= 2, workers
    os.kill(workers[0], signal.SIGKILL)                                   # what the out-of-memory killer does
    out, err = process.communicate(timeout=60)                            # it used to hang here forever
    assert process.returncode == 1 and "Traceback" not in err, head + out + err
    assert "error: a DataLoader worker process died" in err and "Try --num-workers 0" in err
    assert f"resume with: python fine_tuning.py --resume {tmp_path / 'oom'}" in out
    time.sleep(1)
    assert not [pid for pid in workers if alive(pid)]


def test_workers_that_cannot_start_are_named(tmp_path, capsys, monkeypatch):
    def refused(self):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")   # fork under a limit on processes
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", refused)
    code, out, err = run(capsys, *dry(tmp_path, "--num-workers", "2"))
    assert code == 1 and err.strip().startswith("error: could not start 2 DataLoader worker processes") and (
        "Try --num-workers 0" in err)
    assert not list(tmp_path.iterdir())                                   # no epoch: no run folder left


# --- Settings edited in a stopped run's config.json -------------------------------------------------------
@pytest.fixture(scope="module")
def one_stopped_run(tmp_path_factory):
    """A dry run stopped by Ctrl-C after epoch 2 of 3, made once for this file's tests."""
    out = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        stop_after_epoch(patch, 2)
        assert ft.cli([str(a) for a in dry(out, "--run-name", "r")]) == 130
    return out / "r"


@pytest.fixture
def stopped(one_stopped_run, tmp_path):
    """This test's own copy of the stopped run, and its config.json."""
    shutil.copytree(one_stopped_run, tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    config["settings"]["OUTPUT_DIR"] = str(tmp_path)
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    return tmp_path / "r", config


@pytest.mark.parametrize("change,message", [
    ({"MONITOR": "val_acc"}, "MONITOR is 'val_acc' in its config.json, but the run was trained with 'val_loss'"),
    ({"PATIENCE": 1}, "PATIENCE is 1 in its config.json, but the run was trained with 9"),
    ({"MIN_DELTA": 0.5}, "MIN_DELTA is 0.5"),
    ({"EPOCHS": 1}, "EPOCHS is 1 in its config.json, but 2 epochs are done; EPOCHS may only be raised"),
    ({"dry_run": "false"}, "dry_run in its config.json is 'false', not true or false"),   # a string
    ({"dry_run": False}, "dry_run is False in its config.json, but the run was trained with True"),
])
def test_a_setting_edited_after_the_stop_is_refused_naming_it(change, message, stopped, capsys):
    run_dir, config = stopped
    (config if "dry_run" in change else config["settings"]).update(change)
    (run_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "--resume", run_dir)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_epochs_may_be_raised_to_train_longer(stopped, capsys):
    run_dir, config = stopped
    config["settings"]["EPOCHS"] = 4
    (run_dir / "config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0 and "stopped: all epochs ran (EPOCHS = 4)" in out, err
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 4


def test_a_moved_run_resumes_and_writes_summary_csv_beside_itself(real_files, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        assert run(capsys, *tiny(real_files, tmp_path / "old", "--run-name", "m"))[0] == 130
    (tmp_path / "new").mkdir()
    shutil.move(tmp_path / "old" / "m", tmp_path / "new" / "m")
    shutil.rmtree(tmp_path / "old")                                       # its OUTPUT_DIR is gone
    code, out, err = run(capsys, "--resume", tmp_path / "new" / "m")
    assert code == 0, err
    assert (tmp_path / "new" / "summary.csv").exists() and not (tmp_path / "old").exists()


# --- Outputs that fail, and summary.csv as other programs write it ---------------------------------------
def test_output_to_a_full_disk_or_a_closed_output_does_not_stop_the_run(tmp_path, capsys, monkeypatch):
    with open("/dev/full", "w") as full:                                  # every write to it fails: disk full
        monkeypatch.setattr(sys, "stdout", full)
        code = ft.cli([str(a) for a in dry(tmp_path / "a", "--epochs", "1")])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err and err.strip().splitlines()[-1] == (
        "note: the output could not be written (No space left on device); the run went on"), err
    assert (next((tmp_path / "a").iterdir()) / "results.json").exists()
    monkeypatch.setattr(sys, "stdout", None)                              # started with `>&-`
    assert ft.cli([str(a) for a in dry(tmp_path / "b", "--epochs", "1")]) == 0
    assert (next((tmp_path / "b").iterdir()) / "results.json").exists()


def test_summary_csv_saved_by_excel_keeps_every_row_and_column(tmp_path):
    (tmp_path / "summary.csv").write_bytes("\ufeffrun,test_acc,my note\r\nold-1,0.5,keep me\r\nold-2,0.6,\r\n"
                                           .encode("utf-8"))
    rows = ft.add_to_summary(tmp_path, {"run": "new", "test_acc": 0.7})
    assert [row["run"] for row in rows] == ["old-1", "old-2", "new"]
    with open(tmp_path / "summary.csv", newline="") as file:
        saved = list(csv.DictReader(file))
    assert [(r["run"], r["my note"]) for r in saved] == [("old-1", "keep me"), ("old-2", ""), ("new", "")]
    rows = ft.add_to_summary(tmp_path, {"run": "old-2", "test_acc": 0.9})   # the same run again: replaced
    assert [row["run"] for row in rows] == ["old-1", "new", "old-2"]


@pytest.mark.parametrize("text", ["run,test_acc\na,0.5,surplus\n", "run,test_acc,run\na,0.5,b\n"])
def test_summary_csv_that_cannot_be_kept_whole_is_refused_untouched(text, tmp_path):
    (tmp_path / "summary.csv").write_text(text)
    with pytest.raises(ft.RunError, match="cannot be updated without losing data"):
        ft.add_to_summary(tmp_path, {"run": "new"})
    assert (tmp_path / "summary.csv").read_text() == text


# --- Leftovers --------------------------------------------------------------------------------------------
def test_a_double_ctrl_c_in_the_first_epoch_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    progress_iter = ft.Progress.__iter__

    def two_ctrl_c(self):
        for batch in progress_iter(self):
            if self.desc == "epoch 1":
                ft.on_stop_signal(signal.SIGINT, None)                    # the second one raises at once
            yield batch
    monkeypatch.setattr(ft.Progress, "__iter__", two_ctrl_c)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "twice"))
    assert code == 130 and "Traceback" not in err and "no epoch was completed" in out
    assert not list(tmp_path.iterdir())


def test_a_full_disk_before_the_first_checkpoint_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    save = ft.save
    monkeypatch.setattr(ft, "save", lambda path, content: save(path, content) if path.name != "last.pt" else (
        _ for _ in ()).throw(ft.write_error(path, OSError(errno.ENOSPC, "No space left on device"))))
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "full"))
    assert code == 1 and "the disk is full" in err and not list(tmp_path.iterdir())


def test_stale_temporary_files_are_removed_on_resume_and_never_listed(stopped, capsys):
    run_dir, _ = stopped
    (run_dir / ".last.pt.4242.tmp").write_bytes(b"half a checkpoint")     # left by a kill -9 during a save
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0 and ".tmp" not in out and not list(run_dir.glob(".*")), err


def test_a_signal_after_summary_csv_was_written_never_adds_a_second_row(real_files, tmp_path, capsys, monkeypatch):
    add = ft.add_to_summary

    def written_then_ctrl_c(output_dir, row):
        add(output_dir, row)
        raise KeyboardInterrupt                                           # before last.pt is removed
    with monkeypatch.context() as patch:
        patch.setattr(ft, "add_to_summary", written_then_ctrl_c)
        code, out, _ = run(capsys, *tiny(real_files, tmp_path, "--epochs", "1", "--run-name", "once"))
    assert code == 130 and "resume with:" in out
    assert run(capsys, "--resume", tmp_path / "once")[0] == 0
    with open(tmp_path / "summary.csv") as file:
        assert [row["run"] for row in csv.DictReader(file)] == ["once"]


# --- Every stop says how to go on -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["stop_reason", "finish_run"])   # between training and the test; after the test
def test_ctrl_c_after_training_says_what_is_kept_and_how_to_resume(where, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, where, ctrl_c)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "late", "--epochs", "1"))
    assert code == 130 and "Traceback" not in err
    assert f"resume with: python fine_tuning.py --resume {tmp_path / 'late'}" in out


def test_ctrl_c_while_torch_loads_exits_130_without_a_traceback():
    code = ("import sys, runpy, builtins; real = builtins.__import__\n"
            "def ctrl_c(name, *a, **k):\n"
            "    if name == 'torch': raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = ctrl_c; sys.argv = ['fine_tuning.py']\n"
            f"runpy.run_path({str(ROOT / 'fine_tuning.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "Traceback" not in result.stderr and "interrupted" in result.stderr


# --- Paths and odd files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args,phrase", [
    (["--data-dir", "~no_such_user_4242/data"], "DATA_DIR (--data-dir): '~no_such_user_4242/data' is not allowed"),
    (["--output-dir", "~no_such_user_4242"], "OUTPUT_DIR (--output-dir): '~no_such_user_4242' is not allowed"),
    (["--weights", "~no_such_user_4242/w.pt"], "WEIGHTS (--weights): '~no_such_user_4242/w.pt' is not allowed"),
    (["--weights", ""], "WEIGHTS (--weights): '' is not allowed"),
    (["--run-name", "x" * 300], "cannot make"),
])
def test_odd_paths_are_setting_errors_found_before_any_data_is_loaded(args, phrase, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "load_cifar10", lambda data_dir: pytest.fail("the data must not be touched"))
    code, _, err = run(capsys, *args, "--output-dir", tmp_path / "runs") if "--output-dir" not in args else run(
        capsys, *args)
    assert code == 2 and phrase in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", [n for n in ft.SETTINGS if isinstance(getattr(ft, n), str)])
def test_a_nul_byte_in_an_edited_constant_is_a_setting_error(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, name, "runs\0x")
    code, _, err = run(capsys, *(["--output-dir", tmp_path] if name != "OUTPUT_DIR" else []))
    assert code == 2 and f"{name} ({ft.flag(name)}): 'runs\\x00x' is not allowed" in err, err


def test_an_output_dir_in_a_loop_of_symbolic_links_is_a_setting_error(tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, _, err = run(capsys, *dry(tmp_path / "loop" / "runs"))
    assert code == 2 and "Too many levels of symbolic links" in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    ({1: torch.zeros(1)}, "is not a state dict (a dict of parameter names to ordinary tensors)"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7, device="meta")}, "ordinary tensors"),
    ({"conv1.weight": torch.zeros(64, 3, 7, 7).to_sparse()}, "ordinary tensors"),
    ({f"module.{k}": v for k, v in models.resnet18().state_dict().items()},
     "was saved from nn.DataParallel or DistributedDataParallel (every name starts with 'module.'): save "
     "model.module.state_dict() instead"),
])
def test_odd_weights_files_get_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    code, _, err = run(capsys, "--weights", path, "--output-dir", tmp_path / "runs")
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("tamper,message", [
    (lambda state: [1, 2, 3], "is not one this script wrote"),
    (lambda state: {**state, "history": [{"epoch": 1}]}, "is not one this script wrote"),
    (lambda state: {k: v for k, v in state.items() if k != "optimizer"}, "is not one this script wrote"),
])
def test_a_tampered_last_pt_gets_one_line(tamper, message, stopped, capsys):
    run_dir, _ = stopped
    torch.save(tamper(load_state(run_dir / "last.pt")), run_dir / "last.pt")
    code, _, err = run(capsys, "--resume", run_dir)
    assert code == 1 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("make,message", [
    (lambda data: (data / "cifar-10-batches-py").write_text("x"), "cifar-10-batches-py is a file, where CIFAR-10 "
                                                                  "needs a folder"),
    (lambda data: (data / "cifar-10-batches-py" / "data_batch_1").mkdir(parents=True),
     "data_batch_1 is a folder, where CIFAR-10 needs a file"),
])
def test_cifar10_files_of_the_wrong_kind_are_named(make, message, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert code == 1 and message in err and "download" not in err, err


def test_a_full_disk_when_the_first_files_are_written_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    save = ft.save
    monkeypatch.setattr(ft, "save", lambda path, content: save(path, content) if path.name != "history.csv" else (
        _ for _ in ()).throw(ft.write_error(path, OSError(errno.ENOSPC, "No space left on device"))))
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "first"))
    assert code == 1 and "could not write history.csv" in err and not list(tmp_path.iterdir())   # config.json too


def test_a_run_name_that_is_a_file_or_a_link_to_nowhere_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").symlink_to(tmp_path / "nowhere")
    for name in ["notes.txt", "elsewhere"]:
        code, _, err = run(capsys, *dry(tmp_path, "--run-name", name))
        assert code == 2 and f"{tmp_path / name} exists and is not a folder" in err and "Traceback" not in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "nowhere").exists()
