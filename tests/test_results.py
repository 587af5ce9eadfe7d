"""Every run leaves a folder of results that are easy to read and to compare."""
import csv
import json

import pytest
import torch

import fine_tuning as ft
from conftest import common_args, run_script
from fake_cifar10 import write_cifar10


@pytest.fixture(scope="module")
def two_runs(cifar_root, torch_home, tmp_path_factory):
    """A default-style run, then feature extraction, into the same runs/ folder."""
    out = tmp_path_factory.mktemp("results") / "runs"
    first = run_script(common_args(cifar_root, out, "--epochs", "2", "--run-name", "finetune"),
                       torch_home, cifar_root / "md5.json")
    second = run_script(common_args(cifar_root, out, "--epochs", "2", "--freeze-until", "layer4",
                                    "--run-name", "features"), torch_home, cifar_root / "md5.json")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return out, first, second


def test_config_json_round_trips_the_settings(two_runs):
    out, _, _ = two_runs
    config = json.loads((out / "features" / "config.json").read_text())
    assert ft.check_settings(config["settings"]) == {**config["settings"], "UNFREEZE_SCHEDULE": {}}
    assert config["settings"]["FREEZE_UNTIL"] == "layer4" and config["settings"]["BATCH_SIZE"] == 16
    assert config["device"] == "cpu" and config["torch"] == torch.__version__ and config["image_size_used"] == 32
    assert config["settings"]["SEED"] == 0


def test_history_csv_has_one_row_per_epoch_with_group_learning_rates(two_runs):
    out, _, _ = two_runs
    with open(out / "finetune" / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0]["lr_layer3"] == "0.0001" and rows[0]["lr_fc"] == "0.001" and rows[0]["lr_layer2"] == ""
    assert rows[0]["trainable"] == "layer3 layer4 fc"
    assert all(0 <= float(row["val_acc"]) <= 1 and float(row["seconds"]) > 0 for row in rows)


def test_results_json_per_class_accuracy_agrees_with_the_confusion_matrix(two_runs):
    out, first, _ = two_runs
    results = json.loads((out / "finetune" / "results.json").read_text())
    confusion = torch.tensor(results["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 50
    for c, name in enumerate(results["classes"]):
        assert results["per_class_acc"][name] == pytest.approx(confusion[c, c].item() / confusion[c].sum().item())
    assert results["test_acc"] == pytest.approx(confusion.trace().item() / 50)
    assert results["epochs_run"] == 2 and results["best_epoch"] in (1, 2)
    assert results["stop_reason"] == "all epochs ran (EPOCHS = 2)" and results["wall_time_s"] > 0
    assert "confusion matrix (rows: true class, columns: predicted)" in first.stdout
    report = first.stdout[first.stdout.index("test loss"):first.stdout.index("runs so far")]
    assert all(len(line) <= 80 for line in report.splitlines()), report


def test_summary_gains_a_row_per_run_and_the_comparison_shows_earlier_runs(two_runs):
    out, first, second = two_runs
    with open(out / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["run"] for row in rows] == ["finetune", "features"]
    assert [row["freeze_until"] for row in rows] == ["layer2", "layer4"]
    assert rows[1]["backbone_lr"] == "0.0001" and rows[1]["weights"] == "IMAGENET1K_V1"
    table = second.stdout[second.stdout.index("runs so far"):]
    assert "finetune" in table and "features" in table
    assert all(len(line) <= 80 for line in table.splitlines()[:4]), table


def test_curves_png_is_a_valid_png_when_matplotlib_is_present(two_runs):
    pytest.importorskip("matplotlib")
    out, _, _ = two_runs
    assert (out / "finetune" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_run_still_succeeds_and_says_how_to_get_the_plot(cifar_root, torch_home, tmp_path):
    result = run_script(common_args(cifar_root, tmp_path, "--epochs", "1", "--run-name", "plain"),
                        torch_home, cifar_root / "md5.json", no_matplotlib=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pip install matplotlib") == 1
    assert not (tmp_path / "plain" / "curves.png").exists()
    assert (tmp_path / "plain" / "results.json").exists() and (tmp_path / "summary.csv").exists()


def test_a_class_with_no_test_images_does_not_break_the_report(tmp_path, torch_home):
    data = tmp_path / "data"
    sums = write_cifar10(data, test_labels=[c for c in range(9) for _ in range(4)])   # no trucks
    (tmp_path / "md5.json").write_text(json.dumps(sums))
    result = run_script(common_args(data, tmp_path / "runs", "--epochs", "1", "--run-name", "gap"),
                        torch_home, tmp_path / "md5.json")
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("truck") and "n/a" in line for line in result.stdout.splitlines())
    results = json.loads((tmp_path / "runs" / "gap" / "results.json").read_text())
    assert results["per_class_acc"]["truck"] is None


def test_most_confused_pairs_are_named():
    confusion = torch.eye(3, dtype=torch.int64) * 10
    confusion[0, 1], confusion[2, 1], confusion[1, 0] = 7, 3, 1
    import contextlib
    import io
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        ft.print_report(confusion, ["cat", "dog", "frog"])
    assert "most confused: cat -> dog: 7, frog -> dog: 3, dog -> cat: 1" in buffer.getvalue()
