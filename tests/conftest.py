"""Shared fixtures: no network, a tiny CIFAR-10 in the official layout, random weights in the hub
cache, and helpers that run fine_tuning.py in this process (fast) or as a user does (a process)."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.hub
from PIL import Image
from torchvision import datasets, models

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fine_tuning as ft  # noqa: E402
from fake_cifar10 import trusted_md5, write_cifar10  # noqa: E402

LAUNCHER = [sys.executable, str(ROOT / "tests" / "launcher.py")]
# As in an activated venv, the interpreter's folder comes first on PATH: its name runs it, and
# printed commands begin with that name (a venv run by its path: test_files.py)
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
PYTHON = os.path.basename(sys.executable)

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background by a script
    # (nohup, `&`): SIGINT ignored, and inherited by the scripts the tests start. The Ctrl-C tests
    # need Python's own handler, as in a terminal (and so does every process started from here).
    signal.signal(signal.SIGINT, signal.default_int_handler)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n auto`: a share of the cores each
    # On a 2-core AVX2 EPYC two workers of two threads each took 644 s, of one thread 252 s: these
    # tiny batches gain nothing from a second thread, which only contends.
    threads = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # and the scripts the tests start as processes


def pytest_configure(config):
    """The runs write gigabytes of checkpoints (best.pt and last.pt, 174 MB an epoch): into memory,
    a tmpfs at /dev/shm, where there is one with room, and not left on the disk after each pass.
    Where the disk is slow it is faster too: on a 2-core AVX-512 EPYC the suite took 92 s and 120 s
    there, 125 s and 139 s on the disk (on an AVX2 one, 252 s and 254 s: its disk kept up). The
    folder goes at the end. --basetemp DIR chooses another."""
    shm = Path("/dev/shm")
    if config.option.basetemp or not shm.is_dir() or shutil.disk_usage(shm).free < 8e9:
        return
    config.option.basetemp = tempfile.mkdtemp(prefix="fine-tuning-tests-", dir=shm)
    config.add_cleanup(functools.partial(shutil.rmtree, config.option.basetemp))


def no_network(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory, request):
    """No test downloads: the network is cut and the torch hub cache is empty. matplotlib is hidden
    (drawing costs seconds; `with_matplotlib` brings it back), and so is any GPU: the suite states
    what the script does on the CPU (tests/test_gpu.py aside)."""
    if request.node.path.name != "test_gpu.py":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.chdir(Path(ft.__file__).parent)  # as the README runs it: "python fine_tuning.py"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty_torch_home")))
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "matplotlib"] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(os, "fsync", lambda handle: None)  # durability is not under test here


@pytest.fixture(autouse=True, scope="session")
def the_projects_runs_folder_is_left_alone():
    """Each test writes its runs under its own temporary folder: a test that forgot --output-dir
    would add a run to the learner's runs/ at each pass of the suite."""
    runs = ROOT / "runs"
    before = set(runs.glob("*"))
    yield
    assert set(runs.glob("*")) <= before, "a test ran with the default OUTPUT_DIR, ./runs"


@pytest.fixture(autouse=True, scope="session")
def synthetic_images_once():
    """Dry runs make CIFAR-10's synthetic twin (60,000 images) once per seed for the whole suite:
    it depends on the seed alone. split_off() too, whose splits depend on its arguments alone: a
    dry run's copy of 45,000 images (0.2 s) is made once per split setting."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ft, "synthetic_cifar10", functools.cache(ft.synthetic_cifar10))
        patch.setattr(ft, "split_off", functools.cache(ft.split_off))
        yield


@pytest.fixture
def with_matplotlib(monkeypatch):
    for name in [m for m in list(sys.modules) if m.split(".")[0] == "matplotlib"]:
        if sys.modules[name] is None:
            monkeypatch.delitem(sys.modules, name)  # hidden by `offline`
    pytest.importorskip("matplotlib", reason="matplotlib is optional")


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with randomly initialised ResNet18 weights under the official file name."""
    home = tmp_path_factory.mktemp("torch_home")
    target = home / "hub" / "checkpoints" / Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), target)
    return home


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A tiny CIFAR-10 (100 training, 30 test images) for the tests that do not change it."""
    root = tmp_path_factory.mktemp("cifar")
    (root / "md5.json").write_text(json.dumps(write_cifar10(root)))
    return root


@pytest.fixture
def own_data(cifar_root, tmp_path):
    """A copy of the tiny CIFAR-10 that the test may change (real_files trusts its md5 sums)."""
    data = tmp_path / "own_data"
    shutil.copytree(cifar_root / "cifar-10-batches-py", data / "cifar-10-batches-py")
    return data


@pytest.fixture
def real_files(monkeypatch, torch_home, cifar_root):
    """In-process runs on the tiny CIFAR-10 through torchvision's real loaders, with the test
    files' md5 sums trusted (the check still runs) and random 'ImageNet' weights in the cache."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    trust(monkeypatch, cifar_root / "md5.json")
    return cifar_root


def trust(monkeypatch, md5_file):
    for name, value in trusted_md5(json.loads(Path(md5_file).read_text())).items():
        monkeypatch.setattr(datasets.CIFAR10, name, value)


def tiny(data, out, *extra):
    """Fast settings for the tiny data set: 32 px, batches of 8, 2 epochs."""
    settings = ["--data-dir", data, "--output-dir", out, "--batch-size", "8", "--epochs", "2"]
    return [str(arg) for arg in settings + list(extra)]


def run(capsys, *args):
    """fine_tuning.py's command line, in this process: (exit code, stdout, stderr)."""
    try:
        code = ft.cli([str(arg) for arg in args])
    except SystemExit as exit:  # argparse: --help, or a bad flag
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def script_env(torch_home, md5=None):
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    env.pop("PYTHONUNBUFFERED", None)  # as a user runs it: the script itself prints each line
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["FT_TEST_NO_MATPLOTLIB"] = "1"  # drawing costs seconds: tests/test_runs.py draws
    env.pop("FT_TEST_MD5", None)
    if md5:
        env["FT_TEST_MD5"] = str(md5)
    return env


def start_script(args, torch_home, md5=None, **popen):
    """Start fine_tuning.py as a user does, through tests/launcher.py (network cut)."""
    command = LAUNCHER + [str(arg) for arg in args]
    env = script_env(torch_home, md5)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def epoch_row(process, epoch):
    """Read a started script's output up to the row of `epoch`; return what was read. The row of
    epoch 2 comes after last.pt of epoch 1: from then on, a stopped run can resume."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip().startswith(f"{epoch} ") and "%" in line:
            return "".join(lines)
    raise AssertionError("no epoch row: " + "".join(lines) + process.stderr.read())


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def save_as_on_a_gpu(state, path, monkeypatch):
    """torch.save as on a CUDA machine: every storage tagged as a CUDA tensor's."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


PHOTOS = [((120, 90), "RGB", "jpg"), ((100, 100), "L", "png"), ((90, 140), "RGBA", "png"),
          ((160, 96), "P", "png"), ((96, 128), "L", "jpg")]  # fmt: skip


def write_image_folder(folder, classes=("ants", "bees", "wasps"), per_class=8):
    """Images as a learner's photos come: sizes, modes (RGB, grayscale, RGBA, palette) and formats
    of all kinds, a tint per class and noise, in torchvision's ImageFolder layout; and files that
    are not images, to be skipped: a text file, and the metadata a Mac's tar adds (._0.png)."""
    generator = torch.Generator().manual_seed(len(str(folder)))
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            size, mode, suffix = PHOTOS[i % len(PHOTOS)]
            pixels = torch.randint(0, 100, (size[1], size[0], 3), generator=generator)
            pixels[..., c % 3] += 155
            image = Image.fromarray(pixels.to(torch.uint8).numpy()).convert(mode)
            image.save(folder / name / f"{i}.{suffix}")
        (folder / name / "notes.txt").write_text("not an image")
        (folder / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    return folder
