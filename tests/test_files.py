"""Files: writes are atomic, a full disk gets one line, every run gets a folder of its own, a folder
in use is refused, and summary.csv keeps one row per finished run."""

import builtins
import csv
import threading

from filelock import FileLock

import fine_tuning as ft
from conftest import load_state, run


def dry(out, *extra):
    return ["--dry-run", "--epochs", "2", "--patience", "5", "--output-dir", out, *extra]


def test_a_full_disk_gets_one_line_and_the_last_completed_epoch_stays_intact(
    tmp_path, capsys, monkeypatch
):
    writes = []

    def full_at_epoch_2(path, mode="r", *args, **kwargs):  # the kernel's own ENOSPC, from /dev/full
        if str(path).endswith(".last.pt.tmp"):
            writes.append(path)
            if len(writes) == 2:
                return builtins.open("/dev/full", mode)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ft, "open", full_at_epoch_2, raising=False)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "full"))
    run_dir = tmp_path / "full"
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(f"error: the disk is full: could not write {run_dir / 'last.pt'}.")
    assert err.endswith(f"free some space, then resume: python fine_tuning.py --resume {run_dir}\n")
    assert load_state(run_dir / "last.pt")["epoch"] == 1  # the old file, whole
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "best.pt",
        "config.json",
        "history.csv",
        "last.pt",
    ]
    monkeypatch.undo()
    code, out, err = run(capsys, "--resume", run_dir)
    assert code == 0 and f"resuming {run_dir} after epoch 1" in out, err


def test_a_full_disk_in_the_first_epoch_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp"):
            return builtins.open("/dev/full", mode)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(ft, "open", full, raising=False)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "nothing"))
    assert code == 1 and "the disk is full" in err and "then run the same command again" in err
    assert not (tmp_path / "nothing").exists()


def test_every_new_run_gets_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft.time, "strftime", lambda *args: "1201-120000_dry-run")  # the same second
    for _ in range(3):
        assert run(capsys, *dry(tmp_path, "--epochs", "1"))[0] == 0
    names = sorted(path.name for path in tmp_path.iterdir() if path.is_dir())
    assert names == ["1201-120000_dry-run", "1201-120000_dry-run-2", "1201-120000_dry-run-3"]


def test_an_existing_run_name_is_refused_with_the_resume_command_where_it_can_resume(
    tmp_path, capsys
):
    (tmp_path / "taken").mkdir()
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "taken"))
    assert code == 2 and err.endswith(
        f"--run-name: {tmp_path / 'taken'} already exists; choose another name\n"
    )
    (tmp_path / "taken" / "last.pt").write_bytes(b"")
    code, _, err = run(capsys, *dry(tmp_path, "--run-name", "taken"))
    assert code == 2 and err.endswith(
        f", or continue it: python fine_tuning.py --resume {tmp_path / 'taken'}\n"
    )


def test_a_run_folder_that_another_process_is_resuming_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft.Run, "finish", lambda self, *args: ft.stopped_message())  # keeps last.pt
    assert run(capsys, *dry(tmp_path, "--run-name", "busy"))[0] == 130
    with FileLock(tmp_path / "busy" / ".lock"):  # held as a resuming process holds it
        code, _, err = run(capsys, "--resume", tmp_path / "busy")
    assert code == 2 and err.endswith(
        f"--resume: another process is training in {tmp_path / 'busy'} now\n"
    )


def test_summary_csv_keeps_one_row_per_finished_run_and_runs_finishing_together_lose_none(tmp_path):
    def finish(number):
        ft.add_to_summary(tmp_path, {"run": f"run-{number}", "best_val_acc": 0.5})

    threads = [threading.Thread(target=finish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finish(3)  # the same run again (a resumed run that had finished): still one row
    with open(tmp_path / "summary.csv", newline="") as file:
        names = [row["run"] for row in csv.DictReader(file)]
    assert sorted(names) == [f"run-{n}" for n in range(8)]


def test_summary_csv_saved_by_excel_is_read_with_its_byte_order_mark(tmp_path):
    (tmp_path / "summary.csv").write_bytes(
        "\ufeffrun,best_val_acc,note\r\nold,0.4,mine\r\n".encode()
    )
    ft.add_to_summary(tmp_path, {"run": "new", "best_val_acc": 0.5})
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8-sig") as file:
        rows = [(row["run"], row["note"]) for row in csv.DictReader(file)]
    assert rows == [("old", "mine"), ("new", "")]  # the column you added is kept
