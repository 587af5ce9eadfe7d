"""Every write is atomic; a full disk, a diverging loss or two runs at once never lose work or mislead."""
import csv
import errno
import json
import multiprocessing
import signal

import pytest
import torch

import fine_tuning as ft
from conftest import load_state, run


def dry(tmp_path, *extra):
    return ["--dry-run", "--epochs", "3", "--patience", "9", "--output-dir", tmp_path, *extra]


@pytest.fixture(autouse=True)
def one_batch_per_phase(monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)


class FailingFile:
    """A file opened for writing whose write() writes 10 bytes and then fails as `failure` says."""

    def __init__(self, file, failure):
        self.file, self.failure = file, failure

    def write(self, data):
        self.file.write(bytes(data)[:10])
        raise self.failure

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def fail_writes(monkeypatch, failure, victim=lambda path: True):
    """From now on, ft.save()'s writes into files for which victim(path) holds fail with `failure`."""
    monkeypatch.setattr(ft, "open", lambda path, mode="r": FailingFile(open(path, mode), failure) if victim(
        ft.Path(path)) else open(path, mode), raising=False)


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    ft.save(path, {"w": torch.ones(3)})
    fail_writes(monkeypatch, OSError(errno.EIO, "Input/output error"))   # half-written, then the crash
    with pytest.raises(ft.RunError, match="could not write .*best.pt: Input/output error"):
        ft.save(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_state(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]   # no temporary file left behind


NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
TOO_LARGE = OSError(errno.EFBIG, "File too large")            # a file-size limit (ulimit -f)
DISK_FULL_LINE = "error: the disk is full: could not write {victim} in {run_dir}; files saved before are intact. " \
                 "Free some space, then run again (or --resume RUN_DIR)"


@pytest.mark.parametrize("victim,failure,code,message", [
    ("last.pt", NO_SPACE, 1, DISK_FULL_LINE),
    ("best.pt", TOO_LARGE, 1, "error: could not write {run_dir}/best.pt: the file is larger than a file-size limit"),
    ("history.csv", NO_SPACE, 1, DISK_FULL_LINE),
    ("last.pt", KeyboardInterrupt(), 130, ""),                  # a second Ctrl-C during the write: stop at once
])
def test_a_failed_write_is_named_by_its_cause_keeps_the_last_completed_epoch_and_the_run_resumes(
        victim, failure, code, message, tmp_path, capsys, monkeypatch):
    real_save, writes = ft.save, []

    def fails_in_epoch_2(path, content):
        writes.append(path.name)
        with monkeypatch.context() as patch:
            if path.name == victim and writes.count("last.pt") == 2:       # epoch 2's save
                fail_writes(patch, failure)
            return real_save(path, content)

    with monkeypatch.context() as patch:
        patch.setattr(ft, "save", fails_in_epoch_2)
        got, out, err = run(capsys, *dry(tmp_path, "--run-name", "full"))
    run_dir = tmp_path / "full"
    assert got == code and "Traceback" not in err, err
    assert err.strip().startswith(message.format(victim=victim, run_dir=run_dir)), err
    if code == 130:
        assert f"resume with: python fine_tuning.py --resume {run_dir}" in out
    assert not list(run_dir.glob(".*"))                                  # no temporary file, no lock left
    saved = load_state(run_dir / "last.pt")["epoch"]
    assert saved == (1 if victim == "last.pt" else 2)                   # a completed epoch is never lost
    got, out, err = run(capsys, "--resume", run_dir)
    assert got == 0 and f"after epoch {saved}" in out, err
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    best = json.loads((run_dir / "results.json").read_text())["best_epoch"]
    assert load_state(run_dir / "best.pt").keys() and best in (1, 2, 3)


def test_a_real_file_size_limit_is_named_as_such(tmp_path):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # then write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(ft.RunError, match="best.pt: the file is larger than a file-size limit allows"):
            ft.save(tmp_path / "best.pt", {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_when_the_run_folder_is_made_or_summary_csv_is_written_is_named(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(ft.Path, "mkdir", lambda *args, **kwargs: (_ for _ in ()).throw(NO_SPACE))
        code, _, err = run(capsys, *dry(tmp_path / "new", "--run-name", "x"))
    assert code == 1 and err.startswith(f"error: the disk is full: could not write x in {tmp_path / 'new'}")
    monkeypatch.setattr(torch, "save", lambda *args: None)
    monkeypatch.setattr(ft.os, "fsync", lambda handle: (_ for _ in ()).throw(NO_SPACE))
    with pytest.raises(ft.RunError, match=f"the disk is full: could not write summary.csv in {tmp_path}"):
        ft.add_to_summary(tmp_path, {"run": "a"})
    assert not list(tmp_path.glob(".summary.csv*"))


def diverge_on_validation(monkeypatch):
    """A model that is fine while it trains and gives nan when evaluated (a validation pass runs in inference mode)."""
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: forward(self, x) * (
        float("nan") if torch.is_inference_mode_enabled() else 1.0))


def test_a_non_finite_validation_loss_is_divergence_not_a_best_epoch(tmp_path, capsys, monkeypatch):
    diverge_on_validation(monkeypatch)
    code, out, err = run(capsys, *dry(tmp_path, "--run-name", "nan"))
    assert code == 1 and "Traceback" not in err
    assert "training diverged: the loss became nan at epoch 1 val, batch 1" in err
    assert "* best" not in out and not (tmp_path / "nan" / "best.pt").exists()
    assert not (tmp_path / "summary.csv").exists() and not (tmp_path / "nan" / "results.json").exists()


def test_the_epoch_table_keeps_its_columns_for_any_loss(tmp_path, capsys):
    # A learning rate of 1 (the largest allowed) sends the losses far past what the columns were made for.
    code, out, err = run(capsys, *dry(tmp_path, "--head-lr", "1", "--backbone-lr", "1", "--freeze-until", "none"))
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("epoch  train loss"))
    rows = lines[lines.index(header) + 1:lines.index(header) + 4]
    assert any("e+" in row for row in rows), rows                          # a loss of 10,000 or more
    for row in rows:
        assert len(row[:len(header)].split()) == 6 and row[len(header):] in ("", "  * best"), (header, row)


def test_nan_is_reported_at_the_exact_batch_even_between_device_syncs(monkeypatch):
    from helpers import small_setup
    setup = small_setup("--batch-size", "4", n_train=60)     # 13 batches: all inside one SYNC_EVERY window
    calls, forward = {"n": 0}, setup.model.forward

    def poisoned(x):
        calls["n"] += 1
        return forward(x) * float("nan") if calls["n"] == 7 else forward(x)

    monkeypatch.setattr(setup.model, "forward", poisoned)
    with pytest.raises(ft.RunError, match="the loss became nan at epoch 3, batch 7"):
        ft.train_one_epoch(setup.model, setup.loader, setup.optimizer, setup.hw, 3, setup.cfg)
    assert ft.SYNC_EVERY > 7


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)")])
def test_gpu_out_of_memory_suggests_a_smaller_batch_or_image(error, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ft, "train_one_epoch", lambda *args: (_ for _ in ()).throw(error))
    code, _, err = run(capsys, *dry(tmp_path))
    assert code == 1 and "ran out of memory" in err and "--batch-size" in err and "--image-size" in err


def test_a_gpu_that_fails_says_how_to_train_on_the_cpu(monkeypatch, tmp_path, capsys):
    error = RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors "
                         "might be asynchronously reported at some other API call")   # e.g. a GPU too old for torch
    monkeypatch.setattr(ft, "train_one_epoch", lambda *args: (_ for _ in ()).throw(error))
    code, _, err = run(capsys, *dry(tmp_path))
    assert code == 1 and "Traceback" not in err
    assert err.splitlines() == ["error: the GPU failed (CUDA error: no kernel image is available for execution on the "
                                "device).", "  To train on the CPU instead, run: CUDA_VISIBLE_DEVICES= python "
                                "fine_tuning.py ..."]


def test_other_runtime_errors_are_bugs_and_keep_their_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(ft, "train_one_epoch", lambda *args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        ft.cli([str(a) for a in dry(tmp_path)])


def add_rows(output_dir, worker, count):
    for i in range(count):
        ft.add_to_summary(output_dir, {"run": f"{worker}-{i}", "test_acc": 0.5, "minutes": 1})


def test_concurrent_runs_never_lose_a_summary_row(tmp_path):
    processes = [multiprocessing.get_context("fork").Process(target=add_rows, args=(tmp_path, w, 150)) for w in "ab"]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(row["run"] for row in rows) == sorted(f"{w}-{i}" for w in "ab" for i in range(150))


def make_folder(queue, cfg):
    queue.put(str(ft.claim_run_folder(cfg)))


def test_two_runs_started_in_the_same_second_both_get_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(ft.time, "strftime", lambda text: "1128-093012_")   # the same second for everyone
    cfg = ft.parse_settings(["--output-dir", str(tmp_path)])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=make_folder, args=(queue, cfg)) for _ in range(4)]
    for process in processes:
        process.start()
    folders = sorted(queue.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(60)
    stem = "1128-093012_layer2_1e-04_1e-03_32px"
    assert [ft.Path(f).name for f in folders] == [stem, f"{stem}-2", f"{stem}-3", f"{stem}-4"]


def test_a_run_name_that_is_a_file_the_script_writes_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "--run-name", "summary.csv", "--output-dir", tmp_path)
    assert code == 2 and "not summary.csv" in err


def test_sigterm_outside_training_stops_at_once_with_exit_143(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "load_data", lambda cfg, hw: ft.on_stop_signal(signal.SIGTERM, None))
    code, out, err = run(capsys, *dry(tmp_path))
    assert code == 143 and "no epoch was completed" in out and "Traceback" not in err
    assert not list(tmp_path.iterdir())                               # the run folder made at start is gone
