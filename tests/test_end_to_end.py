"""The script runs as a user runs it: real torchvision loaders, real files, real output."""
import json

import fine_tuning as ft
from conftest import ROOT, load_state, run, tiny


def test_full_run_on_tiny_cifar10_through_the_real_loaders(real_files, tmp_path, capsys):
    code, out, err = run(capsys, *tiny(real_files, tmp_path / "runs", "--run-name", "e2e"))
    assert code == 0, err
    assert "model: ResNet18 with ImageNet weights, new head" in out       # the (random) file in the hub cache
    assert "layer2  frozen" in out and "layer3  trainable" in out
    assert "data: 90 train / 10 validation / 30 test images, 10 classes" in out
    assert "stopped: all epochs ran (EPOCHS = 2)" in out and "test accuracy" in out
    config = json.loads((tmp_path / "runs" / "e2e" / "config.json").read_text())
    assert config["settings"]["WEIGHTS"] == "IMAGENET1K_V1"
    assert load_state(tmp_path / "runs" / "e2e" / "best.pt")["fc.weight"].shape == (10, 512)


def test_pretrained_backbone_weights_are_loaded_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cached = load_state(next((torch_home / "hub" / "checkpoints").iterdir()))
    model = ft.build_model("IMAGENET1K_V1")
    assert all((model.state_dict()[k] == v).all() for k, v in cached.items() if not k.startswith("fc."))
    assert model.fc.out_features == 10


def test_dry_run_works_offline_and_keeps_every_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    code, out, err = run(capsys, "--dry-run", "--freeze-until", "layer3", "--patience", "0", "--output-dir", tmp_path)
    assert code == 0, err
    assert ("dry run: synthetic data instead of CIFAR-10, random weights (WEIGHTS = IMAGENET1K_V1), 1 batches "
            "per phase, EPOCHS = 3 unless --epochs is given; every other setting as given") in out
    assert "layer3  frozen" in out and "(PATIENCE = 0)" in out or "stopped: all epochs ran (EPOCHS = 3)" in out
    run_dir = next(tmp_path.iterdir())
    assert run_dir.name.endswith("_dry-run")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "history.csv", "results.json"]
    assert not (tmp_path / "summary.csv").exists()   # dry runs stay out of the comparison


def test_a_dry_run_accepts_what_cifar10_allows_and_says_where_the_synthetic_set_has_less(tmp_path, capsys):
    code, out, err = run(capsys, "--dry-run", "--epochs", "1", "--train-per-class", "500", "--output-dir", tmp_path)
    assert code == 0, err
    assert ("every other setting as given, but the synthetic set has fewer images: 180 training images per class, "
            "not 500") in out
    code, out, err = run(capsys, "--dry-run", "--epochs", "1", "--val-fraction", "0.001", "--output-dir", tmp_path)
    assert code == 0 and "fewer images: VAL_FRACTION 0.005, not 0.001" in out and "/ 10 validation /" in out, err
    code, _, err = run(capsys, "--dry-run", "--train-per-class", "5000", "--output-dir", tmp_path)
    assert code == 2 and "only 4500 training images per class remain" in err   # what CIFAR-10 itself cannot give


def test_the_recipe_is_in_plain_sight_in_the_lesson():
    # What the README lists as best practice is above the banner, where the learner reads; the checks are below.
    source = (ROOT / "fine_tuning.py").read_text()
    lesson = source[:source.index("# The lesson ends here")]
    for visible in ["def imagenet_normalization(", "ResNet18_Weights.IMAGENET1K_V1.transforms()",
                    "model.load_state_dict(backbone, strict=False)", "nn.Linear(model.fc.in_features, NUM_CLASSES)",
                    "requires_grad_(False)", "def set_train_mode(", '"params"', "class EarlyStopping"]:
        assert visible in lesson, visible
    step = lesson[lesson.index("def train_one_epoch("):lesson.index("# === Evaluation")]
    order = [step.index(call) for call in ["logits = model(x)", "F.cross_entropy(", "optimizer.zero_grad(",
                                           "loss.backward()", "optimizer.step()", "hw.scaler.scale("]]
    assert order == sorted(order)                     # the classic loop first; the GPU's scaler after it, apart
    assert "autocast" not in step
