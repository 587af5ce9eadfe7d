"""Shared fixtures: a tiny CIFAR-10 in the official layout, random weights in the hub cache,
and a helper that runs fine_tuning.py as a user would (through tests/launcher.py)."""
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fine_tuning as ft  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 40        # 5 training files x 40 = 200 training images, 20 per class
N_TEST = 50           # 5 per class


def tiny_images(n, rng, labels):
    """Noise plus a colour per class, so a few steps of training can learn something."""
    tints = np.random.default_rng(123).integers(0, 256, size=(10, 3, 1, 1))
    noise = rng.integers(0, 256, size=(n, 3, 32, 32))
    return ((tints[labels] + noise) // 2).astype(np.uint8).reshape(n, 3072)


def write_cifar10(root, per_batch=PER_BATCH, n_test=N_TEST, test_labels=None):
    """Write a small CIFAR-10 in the official cifar-10-batches-py pickle layout; return md5 sums."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(1, 6):
        labels = np.arange(per_batch) % 10
        files[f"data_batch_{i}"] = {"batch_label": f"training batch {i} of 5", "labels": labels.tolist(),
                                    "data": tiny_images(per_batch, rng, labels),
                                    "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
    labels = np.arange(n_test) % 10 if test_labels is None else np.asarray(test_labels)
    files["test_batch"] = {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                           "data": tiny_images(len(labels), rng, labels),
                           "filenames": [f"test_{j}.png" for j in range(len(labels))]}
    files["batches.meta"] = {"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    sums = {}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return sums


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
