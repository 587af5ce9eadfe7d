"""Offline, a failed or damaged download, or a damaged CIFAR-10 file: one line saying what to do,
exit 1. A complete copy in a read-only folder is used as it is."""

import email.message
import errno
import http.client
import io
import os
import ssl
import urllib.error
import urllib.request

import pytest
import torch.hub
from torchvision import datasets

import fine_tuning as ft
from conftest import PYTHON, run, tiny, trust


def test_offline_the_cifar10_download_says_what_failed_and_where_to_put_a_copy(tmp_path, capsys):
    code, out, err = run(capsys, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "runs")
    assert code == 1
    assert err.startswith("error: could not download CIFAR-10 (network disabled in tests).")
    assert (
        "put cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html)"
        f" in {tmp_path / 'data'}" in err
    )
    assert f"`{PYTHON} fine_tuning.py --dry-run` works offline." in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_offline_the_weights_download_says_where_to_put_the_file(
    cifar_root, monkeypatch, tmp_path, capsys
):
    trust(monkeypatch, cifar_root / "md5.json")  # the data is there; the weights are not
    code, out, err = run(capsys, *tiny(cifar_root, tmp_path))
    errors = [line for line in err.splitlines() if "error" in line]  # torch < 2.6 also says
    assert code == 1 and len(errors) == 1  # "Downloading: ..." on stderr
    assert errors[0].startswith("error: could not download the ImageNet weights (")
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    assert (
        "put resnet18-f37072fd.pth (https://download.pytorch.org/models/resnet18-f37072fd.pth)"
        f" in {checkpoints}" in err
    )
    assert "or pass its path: --weights PATH" in err
    assert errors[0].endswith(f"`{PYTHON} fine_tuning.py --dry-run` works offline.")


class Download(io.BytesIO):
    """What urlopen() gives: a file of x's, whose connection, if `cut`, resets after the first read
    (and again on torchvision's retry)."""

    url = None  # no redirect (torchvision)

    def __init__(self, size, cut=False):
        super().__init__(b"x" * size)
        self.length = size  # torchvision's bar
        self.cut = cut

    def info(self):  # torch.hub's bar
        return email.message.Message()

    def read(self, size=-1):
        if self.cut and self.tell() > 0:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return super().read(size)


def closed_without_response(*args, **kwargs):  # a ConnectionResetError without an errno
    raise http.client.RemoteDisconnected("Remote end closed connection without response")


def test_offline_a_damaged_copy_put_in_data_dir_is_named_as_damaged(tmp_path, capsys):
    # The copy the line above asks for, downloaded by a browser that was cut off: torchvision
    # finds it, its md5 sum is wrong, and it tries to download a new one. "Put a copy there" again
    # would send the learner round in a circle.
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"\x1f\x8b\x08\x00 the first bytes of a gzip, cut short")
    code, out, err = run(capsys, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "runs")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: could not download CIFAR-10 (network disabled in tests).")
    assert f" The copy {archive} is damaged (its md5 sum is wrong): replace it, whole." in err
    assert "Without internet" not in err


@pytest.mark.parametrize(
    "urlopen, reason",
    [
        (lambda *args, **kwargs: Download(10**5, True), "Connection reset by peer"),
        (closed_without_response, "Remote end closed connection without response"),
    ],
)
def test_a_connection_cut_during_the_cifar10_download_gets_the_same_line(
    urlopen, reason, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    code, out, err = run(capsys, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if "error" in line]  # after torchvision's bar
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: could not download CIFAR-10 ({reason}).")
    assert errors[0].endswith(f"`{PYTHON} fine_tuning.py --dry-run` works offline.")


@pytest.mark.parametrize(
    "cut, reason",
    [(True, "Connection reset by peer"), (False, "the file arrived damaged: its hash is wrong")],
)
def test_a_weights_download_cut_short_or_damaged_gets_the_offline_line(
    cut, reason, cifar_root, monkeypatch, tmp_path, capsys
):
    trust(monkeypatch, cifar_root / "md5.json")  # the data is there; the weights are not
    monkeypatch.setattr(torch.hub, "urlopen", lambda *args, **kwargs: Download(10**5, cut))
    code, out, err = run(capsys, *tiny(cifar_root, tmp_path))
    errors = [line for line in err.splitlines() if "error" in line]  # after torch's bar
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: could not download the ImageNet weights ({reason}).")
    assert "or pass its path: --weights PATH" in errors[0]
    assert not os.listdir(os.path.join(torch.hub.get_dir(), "checkpoints"))  # the next run: anew
    assert not list(tmp_path.iterdir()), "no run folder"


@pytest.mark.parametrize("copy", ["cut", "web page", "empty"])
def test_a_damaged_copy_of_the_weights_put_in_the_cache_is_named_as_damaged(
    copy, torch_home, cifar_root, monkeypatch, tmp_path, capsys
):
    # The copy the weights' line asks for, cut short by a browser, an error page saved under its
    # name, an empty file: each is read by torch.load(), which would end in a traceback.
    trust(monkeypatch, cifar_root / "md5.json")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = ft.cached_weights()
    cached.parent.mkdir(parents=True)
    whole = next((torch_home / "hub" / "checkpoints").iterdir()).read_bytes()
    damaged = {"cut": whole[: len(whole) // 2], "web page": b"<!DOCTYPE html>", "empty": b""}
    cached.write_bytes(damaged[copy])
    code, out, err = run(capsys, *tiny(cifar_root, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot read the ImageNet weights {cached}: the copy is damaged")
    assert f"Replace it, whole ({ft.IMAGENET.url}), or delete it" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "download, python_org",
    [("CIFAR-10", True), ("the ImageNet weights", True), ("CIFAR-10", False)],
)
def test_a_certificate_python_cannot_check_names_python_orgs_fix_where_it_is_the_cause(
    download, python_org, cifar_root, monkeypatch, tmp_path, capsys
):
    certificate = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer"
        " certificate (_ssl.c:1006)",
    )

    def refuse(*args, **kwargs):  # as urllib says it
        raise urllib.error.URLError(certificate)

    fix = tmp_path / "Applications" / "Python 3.12" / "Install Certificates.command"
    if python_org:  # Python from python.org on a Mac: its certificates come by this command
        fix.parent.mkdir(parents=True)
        fix.touch()
    monkeypatch.setattr(ft, "MAC_CERTIFICATES", fix)
    data = tmp_path / "data"
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    if download == "the ImageNet weights":
        trust(monkeypatch, cifar_root / "md5.json")  # the data is there; the weights are not
        monkeypatch.setattr(torch.hub, "urlopen", refuse)
        data = cifar_root
    code, out, err = run(capsys, "--data-dir", data, "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    reason = f"could not download {download} ({certificate}"
    hint = f"; Python from python.org needs its certificates installed: run '{fix}')."
    assert errors[0].startswith(f"error: {reason}{hint if python_org else ').'} Without internet")


def test_a_connection_error_once_training_began_keeps_its_traceback(
    real_files, monkeypatch, tmp_path
):
    def reset(*args, **kwargs):  # a DataLoader worker's pipe, say: no download of ours
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(ft, "train_one_epoch", reset)
    with pytest.raises(ConnectionResetError):
        ft.cli(tiny(real_files, tmp_path / "runs"))
    assert not list((tmp_path / "runs").iterdir()), "the new run's folder is removed"


def test_a_damaged_cifar10_file_offline_gets_one_line(own_data, real_files, tmp_path, capsys):
    data = own_data
    (data / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    code, out, err = run(capsys, *tiny(data, tmp_path / "runs"))
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith(
        "error: could not download CIFAR-10"
    )  # the damaged copy needs a fresh one


def test_a_download_that_fails_its_md5_check_gets_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: Download(1000))
    code, out, err = run(capsys, "--data-dir", tmp_path / "data", "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if "error" in line]  # after torchvision's bar
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith("error: the download of CIFAR-10 failed its check (")
    assert errors[0].endswith(f"delete {tmp_path / 'data' / 'cifar-10-python.tar.gz'}, run again")


def test_a_complete_copy_in_a_read_only_folder_is_used_as_it_is(
    own_data, real_files, tmp_path, capsys
):
    data = own_data
    before = {path: path.stat().st_mtime_ns for path in data.rglob("*")}
    for path in [data, *data.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        code, out, err = run(capsys, *tiny(data, tmp_path / "runs", "--epochs", "1"))
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert code == 0, err
    assert {path: path.stat().st_mtime_ns for path in data.rglob("*")} == before  # nothing written


def test_a_data_dir_that_cannot_be_made_gets_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file where DATA_DIR wants a folder")
    data = tmp_path / "notes.txt" / "data"
    code, out, err = run(capsys, "--data-dir", data, "--output-dir", tmp_path / "runs")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == f"fine_tuning.py: error: DATA_DIR (--data-dir): Not a directory: {data}\n"


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("download", ["CIFAR-10", "the ImageNet weights"])
def test_a_disk_that_fills_during_a_download_gets_one_line(
    download, cifar_root, monkeypatch, tmp_path, capsys
):
    data = tmp_path / "data"
    if download == "CIFAR-10":
        monkeypatch.setattr(datasets.CIFAR10, "download", disk_full)
    else:
        trust(monkeypatch, cifar_root / "md5.json")  # the data is there; the weights are not
        monkeypatch.setattr(torch.hub, "download_url_to_file", disk_full)
        data = cifar_root
    code, out, err = run(capsys, "--data-dir", data, "--output-dir", tmp_path / "runs")
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1, err
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    assert errors[0] == (
        "error: the disk is full (No space left on device): CIFAR-10 takes about 355 MB in"
        f" DATA_DIR, the ImageNet weights 45 MB in {checkpoints}. Free some space, then run the"
        " same command again"
    )
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
