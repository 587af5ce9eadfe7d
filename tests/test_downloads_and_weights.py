"""Downloads, data files and weights files: every failure is named for what it is, with a way out."""
import builtins
import errno
import os

import pytest
import torch
from torchvision import models

import fine_tuning as ft
from conftest import run, tiny, trust


def assert_run_error(code, err, *phrases):
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def test_cifar10_download_failure_says_what_failed_and_where_to_put_a_copy(tmp_path, capsys):
    code, _, err = run(capsys, *tiny(tmp_path / "empty", tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "could not download CIFAR-10 from https://www.cs.toronto.edu/", "URLError",
                     f"put cifar-10-python.tar.gz in {tmp_path / 'empty'}", "cifar-10-batches-py", "--dry-run")


def test_a_truncated_archive_offline_is_reported_as_failing_its_check(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + b"0" * 1000)     # an interrupted download
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, f"{data / 'cifar-10-python.tar.gz'} fails its md5 check", "Delete it")
    assert "put cifar-10-python.tar.gz" not in err


def test_weights_download_failure_says_where_to_put_the_file(real_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "fresh_torch_home"))
    code, _, err = run(capsys, *tiny(real_files, tmp_path / "runs"))
    assert_run_error(code, err, "could not download the ImageNet weights from "
                     "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                     str(tmp_path / "fresh_torch_home" / "hub" / "checkpoints"), "--weights PATH", "--dry-run")


def test_a_full_disk_or_a_folder_we_may_not_write_during_a_download_is_named_as_such(real_files, tmp_path, capsys,
                                                                                     monkeypatch):
    def full_disk(*args, **kwargs):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")   # what was written before
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ft.datasets.CIFAR10, "download", full_disk)
    code, _, err = run(capsys, *tiny(tmp_path / "data", tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "could not download CIFAR-10: the disk is full", "DATA_DIR (--data-dir)")
    assert "md5" not in err and "Without internet" not in err

    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(models.WeightsEnum, "get_state_dict", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(hub))))
    code, _, err = run(capsys, *tiny(real_files, tmp_path / "runs"))
    assert_run_error(code, err, f"could not download the ImageNet weights: permission denied for {hub}", "TORCH_HOME")


def test_a_cifar10_download_that_fails_its_md5_check_says_so(tmp_path, capsys, monkeypatch):
    def truncated(*args, **kwargs):   # what torchvision raises when the downloaded archive fails its md5
        raise RuntimeError("File not found or corrupted.")
    monkeypatch.setattr(ft.datasets.CIFAR10, "download", truncated)
    code, _, err = run(capsys, *tiny(tmp_path / "data", tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "the download of https://www.cs.toronto.edu/", "failed its md5 check", "run again")
    assert "Delete" not in err


@pytest.mark.parametrize("ours", [True, False])   # False: a shared or read-only folder we may not change
def test_a_corrupted_cifar10_file_names_the_folder_to_delete_and_is_not_downloaded_again(ours, own_cifar, tmp_path,
                                                                                          capsys, monkeypatch):
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    damaged = data / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    real_access = os.access   # tests run as root, for whom permissions never deny: ask as a normal user would
    monkeypatch.setattr(os, "access", lambda path, mode: (ours or not str(path).startswith(str(data))) and real_access(
        path, mode))
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "data_batch_3 fails its md5 check", *[
        f"Delete {data / 'cifar-10-batches-py'}"] if ours else ["may not be changed (shared or read-only)",
                                                                 "set DATA_DIR (--data-dir) to a folder of your own"])
    assert "could not download" not in err and ("Delete" in err) == ours


def test_a_missing_cifar10_file_is_named(own_cifar, tmp_path, capsys, monkeypatch):
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    (data / "cifar-10-batches-py" / "test_batch").unlink()
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "incomplete", "test_batch is missing", f"Delete {data / 'cifar-10-batches-py'}")


def test_unreadable_cifar10_pickle_that_passes_the_check_is_reported_as_unreadable(own_cifar, tmp_path, capsys,
                                                                                   monkeypatch):
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    monkeypatch.setattr(ft, "check_integrity", lambda path, md5=None: True)   # suppose the check had passed
    monkeypatch.setattr(ft.datasets.CIFAR10, "_check_integrity", lambda self: True)
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "cannot be read (UnpicklingError)", "Delete")


def test_a_data_folder_without_read_permission_is_named_as_a_permission_problem(own_cifar, tmp_path, capsys,
                                                                                monkeypatch):
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    real_open = builtins.open

    def no_permission(path, *args, **kwargs):   # what open() does for a non-root user on a folder without 'r'
        if str(path).startswith(str(data)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_permission)
    code, _, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none"))
    assert_run_error(code, err, "permission denied", str(data / "cifar-10-batches-py"), "--data-dir")
    assert "Delete" not in err and "corrupted" not in err


def test_a_complete_cifar10_copy_in_a_read_only_folder_is_used(own_cifar, tmp_path, capsys, monkeypatch):
    data, md5 = own_cifar
    trust(monkeypatch, md5)
    real_open, real_mkdir = builtins.open, os.mkdir

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(data)) and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "ro", str(path)))
                        if str(path).startswith(str(data)) else real_mkdir(path, *a, **k))
    before = sorted(p.name for p in data.rglob("*"))
    code, out, err = run(capsys, *tiny(data, tmp_path / "runs", "--weights", "none", "--epochs", "1"))
    assert code == 0, err
    assert sorted(p.name for p in data.rglob("*")) == before


class Evil:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint looks like."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_that_would_run_code_is_refused_and_the_code_never_runs(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil(marker)}, evil)
    code, _, err = run(capsys, "--weights", evil, "--output-dir", tmp_path / "runs")
    assert code == 2 and "was refused" in err and "could run code" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_poisoned_hub_cache_is_refused_and_named(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Evil(marker)}, cached)
    with pytest.raises(ft.RunError, match="posix.system") as caught:
        ft.build_model("IMAGENET1K_V1")
    assert str(cached) in str(caught.value) and "Delete that file" in str(caught.value)
    assert not marker.exists()


def resnet_state(**changes):
    state = models.resnet18().state_dict()
    state.update(changes)
    return state


@pytest.mark.parametrize("content,message", [
    (torch.zeros(3), "is not a state dict"),
    ({}, "is not a state dict"),
    ({"epoch": 3, "model": resnet_state()}, "is not a state dict (a dict of parameter names to ordinary tensors); it holds "
                                            "one under 'model': save that alone, or pass a run's best.pt"),
    (resnet_state(**{"conv1.weight": torch.zeros(64, 3, 3, 3)}), "does not fit ResNet18 (conv1.weight"),
    ({"encoder.weight": torch.zeros(3)}, "is not a ResNet18 state dict"),
    (resnet_state(**{"layer4.0.bn1.running_var": torch.full((512,), float("nan"))}),
     "holds nan or inf values in layer4.0.bn1.running_var"),
    (resnet_state(**{"layer2.1.conv2.weight": torch.full((128, 128, 3, 3), float("inf"))}),
     "holds nan or inf values in layer2.1.conv2.weight"),
    (models.resnet18(), "holds a whole pickled model (torchvision.models.resnet.ResNet), not a state dict"),
])
def test_a_weights_file_that_is_not_a_good_resnet18_state_dict_is_refused(content, message, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    code, _, err = run(capsys, "--weights", path, "--output-dir", tmp_path / "runs")
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith(f"fine_tuning.py: error: WEIGHTS (--weights) = '{path}' is not allowed") and message in err


@pytest.mark.parametrize("write,message", [
    (lambda path: path.write_bytes(b""), "is corrupt"),
    (lambda path: path.write_bytes(os.urandom(2000)), "is corrupt"),
    (lambda path: path.write_bytes(b"PK\x03\x04" + os.urandom(2000)), "is corrupt"),
    (lambda path: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path)), "is a TorchScript archive"),
])
@pytest.mark.filterwarnings("ignore::FutureWarning", "error::UserWarning")   # no warning may reach the user
def test_a_file_that_is_not_a_state_dict_gets_one_line_saying_what_it_is(write, message, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    write(path)
    code, _, err = run(capsys, "--weights", path, "--output-dir", tmp_path / "runs")
    assert code == 2 and message in err and "could run code" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_nan_in_the_cached_imagenet_weights_is_refused_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(resnet_state(**{"bn1.running_mean": torch.full((64,), float("inf"))}), cached)
    with pytest.raises(ft.RunError, match="nan or inf values in bn1.running_mean"):
        ft.build_model("IMAGENET1K_V1")


def test_a_copied_imagenet_file_given_by_path_is_used(torch_home):
    path = next((torch_home / "hub" / "checkpoints").iterdir())
    assert torch.equal(ft.build_model(str(path)).conv1.weight, torch.load(path, weights_only=True)["conv1.weight"])

