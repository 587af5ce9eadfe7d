"""The script runs as a user runs it: real torchvision loaders, real files, real output."""
import csv
import json

from conftest import common_args, load_model_state, run_script
import fine_tuning as ft


def test_full_run_on_tiny_cifar10_through_the_real_loaders(cifar_root, torch_home, tmp_path):
    out = tmp_path / "runs"
    result = run_script(common_args(cifar_root, out, "--epochs", "2", "--run-name", "e2e"),
                        torch_home, md5=cifar_root / "md5.json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The default freezing, learning rates and ImageNet weights path were used.
    assert "layer2  frozen" in result.stdout and "layer3  trainable" in result.stdout
    assert "180 train / 20 validation / 50 test images" in result.stdout
    assert "test accuracy" in result.stdout
    run_dir = out / "e2e"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["WEIGHTS"] == "IMAGENET1K_V1"
    state = load_model_state(run_dir / "best.pt")
    assert state["fc.weight"].shape == (10, 512)
    results = json.loads((run_dir / "results.json").read_text())
    assert f"test accuracy {results['test_acc']:.2%}" in result.stdout
    with open(run_dir / "history.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["1", "2"]


def test_pretrained_backbone_weights_are_loaded_from_the_hub_cache(torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cached = load_model_state(next((torch_home / "hub" / "checkpoints").iterdir()))
    model = ft.build_model("IMAGENET1K_V1")
    assert all((model.state_dict()[k] == v).all() for k, v in cached.items() if not k.startswith("fc."))
    assert model.fc.out_features == 10


def test_dry_run_works_offline_with_synthetic_data(torch_home, tmp_path):
    result = run_script(["--dry-run", "--output-dir", tmp_path / "runs"], torch_home)
    assert result.returncode == 0, result.stderr
    assert "dry run: synthetic data, random weights" in result.stdout
    assert "stopped: all epochs ran (EPOCHS = 2)" in result.stdout
    run_dir = next((tmp_path / "runs").iterdir())
    for name in ["config.json", "history.csv", "best.pt", "last.pt", "results.json"]:
        assert (run_dir / name).is_file(), name
    assert not (tmp_path / "runs" / "summary.csv").exists()   # dry runs stay out of the comparison
