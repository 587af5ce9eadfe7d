"""Shared fixtures: no network, a tiny CIFAR-10 in the official layout, random weights in the hub cache,
and helpers that run fine_tuning.py in this process (fast) or as a user does (a real process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import datasets, models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fine_tuning as ft  # noqa: E402
from fake_cifar10 import trusted_md5, write_cifar10  # noqa: E402

LAUNCHER = [sys.executable, str(ROOT / "tests" / "launcher.py")]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory, request):
    """No test downloads: in-process calls see no network and an empty torch hub cache. matplotlib is
    hidden too (drawing costs seconds); the tests of curves.png bring it back with `with_matplotlib`.
    The suite states what the script does on the CPU, so a GPU is hidden too, except from tests/test_gpu.py."""
    import urllib.error
    import urllib.request
    import torch.hub
    if request.node.path.name != "test_gpu.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "matplotlib"] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)   # `import matplotlib` now raises ImportError
    monkeypatch.setattr(os, "fsync", lambda handle: None)   # durability is not under test; the disk's speed is


@pytest.fixture
def with_matplotlib(monkeypatch):
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "matplotlib" and sys.modules[m] is None]:
        monkeypatch.delitem(sys.modules, name)   # hidden by `offline`
    pytest.importorskip("matplotlib", reason="matplotlib is optional")


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with randomly initialised ResNet18 weights under the official file name."""
    home = tmp_path_factory.mktemp("torch_home")
    target = home / "hub" / "checkpoints" / Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None).state_dict(), target)
    return home


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A tiny CIFAR-10 (100 training, 30 test images) shared by the tests that do not modify it."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "md5.json").write_text(json.dumps(write_cifar10(root)))
    return root


@pytest.fixture
def own_cifar(tmp_path):
    """A tiny CIFAR-10 that the test may damage: (data folder, md5.json)."""
    root = tmp_path / "data"
    (tmp_path / "md5.json").write_text(json.dumps(write_cifar10(root)))
    return root, tmp_path / "md5.json"


@pytest.fixture
def real_files(monkeypatch, torch_home, cifar_root):
    """In-process runs on the tiny CIFAR-10 through torchvision's real loaders, with the test files' md5
    sums trusted (verification still runs) and the random 'ImageNet' weights in the hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    trust(monkeypatch, cifar_root / "md5.json")
    return cifar_root


def trust(monkeypatch, md5_file):
    for name, value in trusted_md5(json.loads(Path(md5_file).read_text())).items():
        monkeypatch.setattr(datasets.CIFAR10, name, value)


def tiny(data, out, *extra):
    """Fast settings for the tiny data set: 32 px, batches of 8, 2 epochs."""
    return ["--data-dir", str(data), "--output-dir", str(out), "--batch-size", "8", "--image-size", "32",
            "--epochs", "2", *map(str, extra)]


def run(capsys, *args):
    """fine_tuning.py's command line, in this process: (exit code, stdout, stderr)."""
    code = ft.cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def script_env(torch_home, md5=None):
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("FT_TEST_MD5", None)
    if md5:
        env["FT_TEST_MD5"] = str(md5)
    return env


def start_script(args, torch_home, md5=None, **popen):
    """Start fine_tuning.py as a user does, through tests/launcher.py (network cut, test md5 sums trusted)."""
    return subprocess.Popen(LAUNCHER + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=script_env(torch_home, md5), **popen)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)
