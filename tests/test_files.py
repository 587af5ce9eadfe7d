"""Files: writes are atomic, a full disk gets one line wherever it fills, every run gets a folder
of its own, and summary.csv keeps a row per finished run, in a file a spreadsheet may have saved."""

import builtins
import csv
import errno
import io
import ntpath
import os
import shlex
import subprocess
import sys
import threading

import pytest

import fine_tuning as ft
from conftest import LAUNCHER, PYTHON, ROOT, load_state, run, script_env, tiny


def dry(out, *extra):
    return ["--dry-run", "--epochs", "2", "--patience", "5", "--output-dir", out, *extra]


class FillsUp(io.FileIO):
    """A file on a disk that fills after `room` bytes: the rest of a write fails with ENOSPC."""

    room = 1000

    def write(self, data):
        data = bytes(data)  # not the caller's view: a traceback keeps this frame, and the view in
        # it would pin torch.save's buffer (Python 3.12+: "BufferError" as the garbage is collected)
        written = super().write(data[: self.room])
        if written < len(data):
            self.stop()
        return written

    def stop(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def disk_fills_at(monkeypatch, name, at_write):
    """The disk fills in the middle of the `at_write`-th write of `name` (last.pt, best.pt...)."""
    writes = []

    def open_file(path, mode="r", *args, **kwargs):
        if str(path).endswith(f".{name}.tmp"):
            writes.append(path)
            if len(writes) == at_write:
                return FillsUp(path, "w")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ft, "open", open_file, raising=False)


def test_a_file_is_on_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    # After a crash of the machine (a Colab VM reclaimed, a power cut) the name is the old file or
    # the new one: never a new name over data the disk had not yet written.
    events = []
    replace = os.replace

    def renamed(source, target):
        events.append("replace")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", lambda handle: events.append("fsync"))
    monkeypatch.setattr(os, "replace", renamed)
    ft.write_text(tmp_path / "history.csv", "epoch\n1\n")
    assert events == ["fsync", "replace"]
    assert (tmp_path / "history.csv").read_text() == "epoch\n1\n"
    assert os.listdir(tmp_path) == ["history.csv"]


@pytest.mark.parametrize("refusals, written", [(3, True), (10, False)])
def test_a_file_held_for_a_moment_is_renamed_once_free_and_one_held_on_gets_one_line(
    refusals, written, tmp_path, monkeypatch
):
    # On Windows an antivirus scan, the search indexer or OneDrive opens a file just written, for
    # a moment: its rename fails with "Access is denied" (WinError 5, or 32: in use). Tried again
    # for a second, as pip does; a file held longer (Excel) is told in one line, as before.
    replace = os.replace
    tries = []

    def held(source, target):
        tries.append(target)
        if len(tries) <= refusals:
            raise PermissionError(errno.EACCES, "Access is denied")
        replace(source, target)

    (tmp_path / "history.csv").write_text("epoch\n1\n")
    monkeypatch.setattr(os, "replace", held)
    if written:
        ft.write_text(tmp_path / "history.csv", "epoch\n1\n2\n")
    else:
        with pytest.raises(ft.RunError, match="history.csv .Access is denied: open in another"):
            ft.write_text(tmp_path / "history.csv", "epoch\n1\n2\n")
    assert (tmp_path / "history.csv").read_text() == ("epoch\n1\n2\n" if written else "epoch\n1\n")
    assert os.listdir(tmp_path) == ["history.csv"]  # no temporary file left
    assert len(tries) == (refusals + 1 if written else 5)  # 4 more tries, 0.25 s apart


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_disk_that_fills_while_a_checkpoint_is_written_gets_one_line_and_loses_nothing(
    name, tmp_path, capsys, monkeypatch
):
    disk_fills_at(monkeypatch, name, at_write=2)  # epoch 2's file, after 1,000 of its bytes
    out_dir = tmp_path / "my 'runs'"  # a space and quotes: the printed command must still paste
    code, out, err = run(capsys, *dry(out_dir, "--run-name", "full"))
    run_dir = out_dir / "full"
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: the disk is full: could not write {run_dir / name}.")
    resume = ft.command("--resume", run_dir)
    assert shlex.split(resume) == [PYTHON, "fine_tuning.py", "--resume", str(run_dir)]
    assert err.endswith(f"free some space, then resume: {resume}\n")
    assert load_state(run_dir / "last.pt")["epoch"] == 1  # the old file, whole
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "best.pt",
        "config.json",
        "history.csv",
        "last.pt",
    ]
    if name == "last.pt":  # and it goes on from there
        monkeypatch.undo()
        code, out, err = run(capsys, "--resume", run_dir)
        assert code == 0 and f"resuming {run_dir} after epoch 1" in out, err


class Interrupted(FillsUp):
    """A file whose writing Ctrl-C interrupts after 1,000 bytes."""

    def stop(self):
        raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_ctrl_c_while_a_checkpoint_is_written_stops_cleanly_with_the_last_one_whole(
    name, tmp_path, capsys, monkeypatch
):
    writes = []

    def open_file(path, mode="r", *args, **kwargs):
        if str(path).endswith(f".{name}.tmp"):
            writes.append(path)
            if len(writes) == 2:
                return Interrupted(path, "w")
        return builtins.open(path, mode, *args, **kwargs)

    step = ft.EarlyStopping.step

    def every_epoch_is_the_best(self, val_loss, val_acc, epoch):
        self.best = None  # so that epoch 2 writes best.pt too
        return step(self, val_loss, val_acc, epoch)

    monkeypatch.setattr(ft, "open", open_file, raising=False)
    monkeypatch.setattr(ft.EarlyStopping, "step", every_epoch_is_the_best)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "saving"))
    assert code == 130 and not err, err  # not torch.save's "unexpected pos", nor a traceback
    assert "stopped: interrupted (Ctrl-C)" in out and "resume with: " in out
    tested = {"last.pt": 2, "best.pt": 1}[name]  # epoch 2's best.pt was never whole
    assert f"(the weights of epoch {tested}, the best val_loss, from best.pt" in out
    assert load_state(tmp_path / "saving" / "last.pt")["epoch"] == 1


CTRL_C_AS_TORCH_SAVE_ENDS = """
import sys
from pathlib import Path

import torch
import torch.serialization

import fine_tuning as ft


def interrupted_finish(self, *args):  # Ctrl-C before torch.save's zip writer writes its end
    raise KeyboardInterrupt


torch.serialization._open_zipfile_writer_buffer.__exit__ = interrupted_finish
path = Path(sys.argv[1])
try:
    ft.save({"weight": torch.ones(3)}, path)
except KeyboardInterrupt:
    print("interrupted; written:", path.exists())
"""


def test_ctrl_c_as_torch_save_ends_leaves_no_file_and_no_abort_as_python_exits(tmp_path):
    # The unfinished zip writer writes its end when Python frees it: to a closed file, it threw in
    # a destructor ("terminate called ...", exit 134 after the run's proper ending).
    code = [sys.executable, "-c", CTRL_C_AS_TORCH_SAVE_ENDS, tmp_path / "last.pt"]
    done = subprocess.run(code, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, done.stderr[-2000:]
    assert done.stdout == "interrupted; written: False\n"
    assert os.listdir(tmp_path) == []  # no temporary file either


def test_a_full_disk_in_the_first_epoch_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp"):
            return builtins.open("/dev/full", mode)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ft, "open", full, raising=False)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "nothing"))
    config = tmp_path / "nothing" / "config.json"  # the first file a run writes
    assert code == 1
    assert err == (
        f"error: the disk is full: could not write {config}. No epoch was saved: free some space,"
        " then run the same command again\n"
    )  # not "the files of the last completed epoch are intact": there are none
    assert not (tmp_path / "nothing").exists()


def test_every_new_run_gets_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(ft.time, "strftime", lambda *args: "1201-120000_dry-run")  # the same second
    cfg = ft.parse_settings(["--dry-run", "--output-dir", tmp_path])
    made = [ft.make_run_folder(cfg).name for _ in range(3)]
    assert made == ["1201-120000_dry-run", "1201-120000_dry-run-2", "1201-120000_dry-run-3"]


def test_an_existing_run_name_is_refused(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "taken"))
    assert code == 2
    assert (
        err
        == f"fine_tuning.py: error: --run-name: {tmp_path / 'taken'} exists; choose another name\n"
    )


def read_rows(path, **options):
    with open(path, newline="", encoding="utf-8-sig") as file:
        return list(csv.DictReader(file, **options))


def finished(name, accuracy="0.5"):
    return {"run": name, "DATASET": "CIFAR10", "best_val_acc": accuracy}


def test_runs_finishing_together_lose_no_row_of_summary_csv(tmp_path):
    threads = [
        threading.Thread(target=ft.add_to_summary, args=(tmp_path, finished(f"run-{n}")))
        for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = [row["run"] for row in read_rows(tmp_path / "summary.csv") if row["run"] != "run"]
    assert sorted(names) == [f"run-{n}" for n in range(8)]  # (a header written twice is skipped)


def test_a_summary_csv_a_spreadsheet_saved_is_read_and_kept_in_its_own_layout(tmp_path):
    # A locale with decimal commas: semicolons, a byte-order mark, percent signs, a column and a
    # notes row of the learner's own, Windows line ends and no line end after the last row.
    saved = (
        "\ufeffrun;DATASET;best_val_acc;note\r\nold;CIFAR10;85,3%;mine\r\n;;;ideas for next week"
    )
    (tmp_path / "summary.csv").write_bytes(saved.encode())
    rows = ft.add_to_summary(tmp_path, finished("new", "0.9"))
    assert [row["run"] for row in rows] == ["old", "", "new"]
    assert ft.number(rows[0]["best_val_acc"]) == pytest.approx(0.853)
    kept = read_rows(tmp_path / "summary.csv", delimiter=";")
    assert [(row["run"], row["note"]) for row in kept] == [
        ("old", "mine"),
        ("", "ideas for next week"),
        ("new", ""),
    ]


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",  # not text
        b"my notes on the runs\n",  # no delimiter to find: csv.Error
        "name;score\r\nold;0.5\r\n".encode(),  # no column of this run's
        b"run,DATASET\n",
    ],
)
def test_a_summary_csv_that_cannot_be_read_is_moved_aside_never_overwritten(
    content, tmp_path, capsys
):
    (tmp_path / "summary.csv").write_bytes(content)
    rows = ft.add_to_summary(tmp_path, finished("new"))
    assert [row["run"] for row in rows] == ["new"]
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("summary.unreadable-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    out = capsys.readouterr().out
    assert (
        out.startswith(f"note: could not read {tmp_path / 'summary.csv'} (")
        and aside[0].name in out
    )
    assert [row["run"] for row in read_rows(tmp_path / "summary.csv")] == ["new"]


def test_a_summary_csv_held_by_a_spreadsheet_costs_the_run_nothing(
    real_files, tmp_path, capsys, monkeypatch
):
    def locked(path, mode="r", *args, **kwargs):  # Excel on Windows keeps others from writing
        if str(path).endswith("summary.csv"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ft, "open", locked, raising=False)
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--epochs", "1", "--run-name", "held"))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"could not write {tmp_path / 'summary.csv'} (Permission denied: open in another" in err
    resume = shlex.split(err.split("then resume: ")[1])
    assert resume == [PYTHON, "fine_tuning.py", "--resume", str(tmp_path / "held")]
    monkeypatch.delattr(ft, "open")  # the spreadsheet is closed
    code, out, err = run(capsys, *resume[2:])
    assert code == 0 and "test accuracy" in out, err
    assert [row["run"] for row in read_rows(tmp_path / "summary.csv")] == ["held"]


@pytest.mark.parametrize(
    "error, cause",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied: open in another"),
        (OSError(errno.ENOTCONN, "Transport endpoint is not connected"), "not connected)."),
        (OSError(errno.EIO, "Input/output error"), "(Input/output error). No epoch was saved"),
    ],
)
def test_a_file_that_cannot_be_written_is_told_by_its_cause(tmp_path, error, cause):
    # Only a denied write hints at a program holding the file: Colab's Drive, disconnected, says
    # "not connected"; a failing disk or USB stick, an I/O error.
    message = str(ft.write_error(tmp_path / "history.csv", error))
    assert message.startswith(f"could not write {tmp_path / 'history.csv'} (")
    assert cause in message and message.endswith("fix that, then run the same command again")
    assert ("another program" in message) == isinstance(error, PermissionError)


def test_a_printed_command_pastes_into_windows_cmd_too(monkeypatch):
    with monkeypatch.context() as windows:  # undone before the assert: pytest's report needs os
        windows.setattr(ft.os, "name", "nt")  # cmd takes double quotes, not shlex's single ones
        windows.setattr(ft.os, "path", ntpath)
        windows.setattr(ft, "__file__", "C:\\proj\\fine_tuning.py")  # and run from its folder
        windows.setattr(ft.os, "getcwd", lambda: "C:\\proj")
        windows.setattr(ft.sys, "executable", "C:\\Python312\\python.exe")  # printed: python
        windows.setattr(ft.shutil, "which", lambda name: f"C:\\Python312\\{name}.EXE")  # PATHEXT's
        command = ft.command("--resume", "C:\\my runs\\it's", "--num-workers", 0)
        py_launcher = "C:\\Program Files\\Python312\\python.exe"  # `py fine_tuning.py`
        windows.setattr(ft.sys, "executable", py_launcher)
        windows.setattr(ft.shutil, "which", lambda name: None)  # and no python on PATH
        by_path = ft.command("--dry-run")
    assert command == 'python fine_tuning.py --resume "C:\\my runs\\it\'s" --num-workers 0'
    assert by_path == '"C:\\Program Files\\Python312\\python.exe" fine_tuning.py --dry-run'


def test_a_printed_command_from_idle_on_windows_names_the_console_python(monkeypatch):
    # IDLE's Start-menu shortcut runs pythonw.exe, which has no console: pasted into cmd, a
    # command naming it would run the script unseen
    with monkeypatch.context() as windows:
        windows.setattr(ft.os, "name", "nt")
        windows.setattr(ft.os, "path", ntpath)
        windows.setattr(ft, "__file__", "C:\\proj\\fine_tuning.py")
        windows.setattr(ft.os, "getcwd", lambda: "C:\\proj")
        windows.setattr(ft.sys, "executable", "C:\\Python312\\pythonw.exe")
        windows.setattr(ft.shutil, "which", lambda name: f"C:\\Python312\\{name}.EXE")
        on_path = ft.command("--dry-run")
        windows.setattr(ft.shutil, "which", lambda name: None)  # not on PATH: named by its path
        by_path = ft.command("--dry-run")
    assert on_path == "python fine_tuning.py --dry-run"
    assert by_path == "C:\\Python312\\python.exe fine_tuning.py --dry-run"


def test_a_printed_command_names_the_interpreter_that_runs_the_script(monkeypatch):
    monkeypatch.setattr(ft.sys, "executable", "/usr/bin/python3")  # a Mac or Ubuntu: no `python`
    monkeypatch.setattr(ft.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert ft.command("--resume", "runs/x") == "python3 fine_tuning.py --resume runs/x"
    monkeypatch.setattr(ft.sys, "executable", "")  # an embedding program may not say
    assert ft.command("--dry-run") == "python fine_tuning.py --dry-run"
    # A venv's Python run by its path, the venv not activated: `python` would run another Python,
    # without torch, so the command names the one that ran the script by its path
    monkeypatch.setattr(ft.sys, "executable", "/home/me/my project/.venv/bin/python")
    monkeypatch.setattr(ft.shutil, "which", lambda name: "/usr/bin/python")
    command = "'/home/me/my project/.venv/bin/python' fine_tuning.py --resume runs/x"
    assert ft.command("--resume", "runs/x") == command


def test_a_printed_command_run_from_another_folder_names_the_scripts_path(tmp_path, monkeypatch):
    assert shlex.split(ft.command("--dry-run")) == [PYTHON, "fine_tuning.py", "--dry-run"]
    monkeypatch.chdir(tmp_path)  # Colab: `!python drive/MyDrive/fine_tuning.py` from /content
    words = shlex.split(ft.command("--resume", "runs/x"))
    assert words == [PYTHON, ft.__file__, "--resume", "runs/x"]
    assert os.path.isabs(words[1]) and os.path.isfile(words[1])


def test_a_printed_command_of_a_script_run_as_dot_slash_names_it_plainly(monkeypatch):
    # `python ./fine_tuning.py`: Python makes __file__ absolute, "/home/me/proj/./fine_tuning.py",
    # without normalising it; the script is in the working folder all the same
    here = os.path.dirname(ft.__file__)
    monkeypatch.setattr(ft, "__file__", os.path.join(here, ".", "fine_tuning.py"))
    assert shlex.split(ft.command("--dry-run")) == [PYTHON, "fine_tuning.py", "--dry-run"]
    monkeypatch.setattr(ft, "__file__", os.path.join(here, "tests", "..", "fine_tuning.py"))
    assert shlex.split(ft.command("--dry-run")) == [PYTHON, "fine_tuning.py", "--dry-run"]
    monkeypatch.chdir(os.path.join(here, "tests"))  # from elsewhere: its path, normalised
    assert shlex.split(ft.command("--dry-run"))[1] == os.path.join(here, "fine_tuning.py")


def test_a_printed_command_under_run_in_a_notebook_is_a_run_line(monkeypatch):
    # `%run fine_tuning.py` in Jupyter or Spyder's console: the script starts in the kernel, whose
    # environment holds the matplotlib backend that ipykernel set (a cell's `!python` inherits it)
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    kernel = {"__name__": "fine_tuning_in_a_kernel", "__file__": ft.__file__}
    exec(compile((ROOT / "fine_tuning.py").read_text(), ft.__file__, "exec"), kernel)
    assert kernel["command"]("--resume", "runs/x") == "%run fine_tuning.py --resume runs/x"


def test_a_cells_shell_command_is_told_by_the_backend_its_kernel_passes_on(torch_home, tmp_path):
    # Colab's and Jupyter's `!` start a shell in the kernel's environment, where ipykernel set
    # MPLBACKEND; a terminal (Jupyter's too) has none of it
    photos = tmp_path / "photos"
    photos.mkdir()
    env = {**script_env(torch_home), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    args = [*LAUNCHER, photos, "--output-dir", tmp_path]
    done = subprocess.run([str(arg) for arg in args], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert f"a folder is given with --dataset: !{PYTHON} " in done.stderr


def test_a_summary_csv_emptied_to_its_header_gets_no_second_header(tmp_path):
    (tmp_path / "summary.csv").write_text("run;DATASET;best_val_acc\n")  # rows deleted by hand
    assert [row["run"] for row in ft.add_to_summary(tmp_path, finished("new"))] == ["new"]
    assert (tmp_path / "summary.csv").read_text() == "run;DATASET;best_val_acc\nnew;CIFAR10;0.5\n"


def test_an_empty_summary_csv_gets_a_header_and_the_row_not_a_move_aside(tmp_path, capsys):
    (tmp_path / "summary.csv").write_bytes(b"")  # made empty by hand, or by another program
    assert [row["run"] for row in ft.add_to_summary(tmp_path, finished("new"))] == ["new"]
    assert (tmp_path / "summary.csv").read_text() == "run,DATASET,best_val_acc\nnew,CIFAR10,0.5\n"
    assert capsys.readouterr().out == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.csv"]


def test_the_runs_table_reads_a_spreadsheets_figures_and_marks_a_cleared_one(capsys):
    settings = {name: ft.constant_text(name) for name in ft.SETTINGS}
    old = dict(settings, run="old", best_val_acc="85,3%", test_acc="")  # the test accuracy cleared
    old.update(epochs_run="3", minutes="1,5")  # a decimal comma
    notes = {"run": "", "best_val_acc": "", "note": "ideas for next week"}  # a row of the learner's
    new = dict(settings, run="new", best_val_acc="0.9", test_acc="0.88", epochs_run="2")
    new.update(minutes="1.0", val_images="5000")
    new.update(DATA_DIR="/elsewhere/data", NUM_WORKERS="2")  # where and how fast: no difference
    ft.print_runs([old, notes, new])
    table, comparison = capsys.readouterr().out.strip().split("\n\n")
    comparison = " ".join(comparison.split())  # as one line, however it wraps
    table = table.splitlines()
    assert table[0].startswith("the last 2 of 2 runs in summary.csv (val acc: the best epoch's")
    assert table[2].split() == ["85.3%", "?", "3", "1,5", "old:", "the", "same", "settings"]
    assert table[3].split() == ["90.0%", "88.0%", "2", "1.0", "new:", "this", "run"]
    assert comparison.startswith("vs old (the same settings): validation accuracy of the best")
    assert "epoch +4.7 points, 0.7x the minutes." in comparison  # 90.0 - 85.3; 1.0 / 1.5


def test_the_runs_table_shows_the_last_8_and_a_tie_is_compared_with_the_latest(capsys):
    settings = {name: ft.constant_text(name) for name in ft.SETTINGS}
    figures = dict(best_val_acc="0.5", test_acc="0.5", epochs_run="1", minutes="1.0")
    rows = [dict(settings, run=f"run-{n}", **figures, val_images="5000") for n in range(1, 11)]
    ft.print_runs(rows)
    table, comparison = capsys.readouterr().out.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].startswith("the last 8 of 10 runs in summary.csv")
    assert [line.split()[4] for line in lines[2:]] == [f"run-{n}:" for n in range(3, 11)]
    assert comparison.startswith("vs run-9 (the same settings): ")  # 9 runs tie: the latest
