"""Shared fixtures: a tiny CIFAR-10 in the official layout, random weights in the hub cache,
and a helper that runs fine_tuning.py as a user would (through tests/launcher.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fine_tuning as ft  # noqa: E402,F401
from fake_cifar10 import write_cifar10  # noqa: E402

@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test downloads: in-process calls see no network and an empty torch hub cache."""
    import urllib.error
    import urllib.request
    import torch.hub

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with randomly initialised ResNet18 weights under the official file name."""
    home = tmp_path_factory.mktemp("torch_home")
    url = models.ResNet18_Weights.IMAGENET1K_V1.url
    target = home / "hub" / "checkpoints" / Path(url).name
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.resnet18(weights=None).state_dict(), target)
    return home


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A read-only-by-convention tiny CIFAR-10 shared by tests that do not modify it."""
    root = tmp_path_factory.mktemp("cifar")
    sums = write_cifar10(root)
    (root / "md5.json").write_text(json.dumps(sums))
    return root


@pytest.fixture
def own_cifar(tmp_path):
    """A tiny CIFAR-10 that the test may damage."""
    root = tmp_path / "data"
    sums = write_cifar10(root)
    (tmp_path / "md5.json").write_text(json.dumps(sums))
    return root, tmp_path / "md5.json"


def script_env(torch_home, md5=None, no_matplotlib=False):
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONUNBUFFERED": "1"}
    env.pop("FT_TEST_MD5", None)
    if md5:
        env["FT_TEST_MD5"] = str(md5)
    if no_matplotlib:
        env["FT_TEST_NO_MATPLOTLIB"] = "1"
    return env


LAUNCHER = [sys.executable, str(ROOT / "tests" / "launcher.py")]


def run_script(args, torch_home, md5=None, no_matplotlib=False, timeout=300):
    """Run fine_tuning.py through the launcher and wait; returns the CompletedProcess."""
    return subprocess.run(LAUNCHER + [str(a) for a in args], capture_output=True, text=True,
                          env=script_env(torch_home, md5, no_matplotlib), timeout=timeout)


def start_script(args, torch_home, md5=None):
    """Start fine_tuning.py through the launcher; returns the running Popen (for Ctrl-C tests)."""
    return subprocess.Popen(LAUNCHER + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=script_env(torch_home, md5))


def common_args(cifar, out, *extra):
    """Fast settings for the tiny data set: CIFAR's native 32 px, small batches."""
    return ["--data-dir", cifar, "--output-dir", out, "--batch-size", "16", "--image-size", "32", *extra]


def load_model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)
