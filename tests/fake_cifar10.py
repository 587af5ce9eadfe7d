"""A small CIFAR-10 written in the official cifar-10-batches-py layout, for tests and the benchmark.

Imports nothing from fine_tuning.py, so tests/launcher.py can use it before running the script.
"""

import hashlib
import pickle
from pathlib import Path

import numpy as np


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_images(n, rng, labels):
    """Noise plus a colour per class, so a few steps of training can learn something."""
    tints = np.random.default_rng(123).integers(0, 256, size=(10, 3, 1, 1))
    noise = rng.integers(0, 256, size=(n, 3, 32, 32))
    return ((tints[labels] + noise) // 2).astype(np.uint8).reshape(n, 3072)


def write_cifar10(root, per_batch=20, n_test=30, test_labels=None):
    """Write a small CIFAR-10 in the official cifar-10-batches-py pickle layout; return md5 sums.
    The default: 100 training images (10 per class) and 30 test images."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for i in range(1, 6):
        labels = np.arange(per_batch) % 10
        files[f"data_batch_{i}"] = {
            "batch_label": f"training batch {i} of 5",
            "labels": labels.tolist(),
            "data": tiny_images(per_batch, rng, labels),
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
    labels = np.arange(n_test) % 10 if test_labels is None else np.asarray(test_labels)
    files["test_batch"] = {
        "batch_label": "testing batch 1 of 1",
        "labels": labels.tolist(),
        "data": tiny_images(len(labels), rng, labels),
        "filenames": [f"test_{j}.png" for j in range(len(labels))],
    }
    files["batches.meta"] = {
        "label_names": CLASSES,
        "num_cases_per_batch": per_batch,
        "num_vis": 3072,
    }
    sums = {}
    for name, content in files.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return sums


def trusted_md5(sums):
    """CIFAR-10's lists of md5 sums, with the sums of the files we wrote for the official ones."""
    from torchvision import datasets

    return dict(
        train_list=[[name, sums[name]] for name, _ in datasets.CIFAR10.train_list],
        test_list=[[name, sums[name]] for name, _ in datasets.CIFAR10.test_list],
        meta={**datasets.CIFAR10.meta, "md5": sums[datasets.CIFAR10.meta["filename"]]},
    )


def trust_test_md5(sums):
    """Replace CIFAR-10's expected md5 sums by those of files we wrote (verification still runs)."""
    from torchvision import datasets

    for name, value in trusted_md5(sums).items():
        setattr(datasets.CIFAR10, name, value)
