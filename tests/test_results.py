"""Every run leaves a lean folder of results that are easy to read, and each run is compared with the last."""
import contextlib
import csv
import io
import json

import pytest
import torch

import fine_tuning as ft
from conftest import load_state, run, tiny, trust
from fake_cifar10 import write_cifar10


@pytest.fixture(scope="module")
def two_runs(cifar_root, torch_home, tmp_path_factory):
    """A default-style run, then feature extraction, into the same OUTPUT_DIR, through the real loaders."""
    out = tmp_path_factory.mktemp("results") / "runs"
    outputs = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TORCH_HOME", str(torch_home))
        monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
        trust(monkeypatch, cifar_root / "md5.json")
        for extra in [["--run-name", "finetune"], ["--run-name", "features", "--freeze-until", "layer4"]]:
            with contextlib.redirect_stdout(io.StringIO()) as text:
                assert ft.cli(tiny(cifar_root, out, *extra)) == 0
            outputs.append(text.getvalue())
    return out, *outputs


def test_a_finished_run_keeps_its_results_and_best_weights_but_not_last_pt(two_runs):
    out, first, _ = two_runs
    assert sorted(p.name for p in (out / "finetune").iterdir()) == [
        "best.pt", "config.json", "history.csv", "results.json"]
    assert load_state(out / "finetune" / "best.pt")["fc.weight"].shape == (10, 512)
    assert f"files in {out / 'finetune'}: best.pt config.json history.csv results.json" in first


def test_config_json_holds_every_setting_as_used_with_absolute_folders(two_runs, cifar_root):
    out, _, _ = two_runs
    config = json.loads((out / "features" / "config.json").read_text())
    assert list(config["settings"]) == ft.SETTINGS
    assert config["settings"]["FREEZE_UNTIL"] == "layer4" and config["settings"]["BATCH_SIZE"] == 8
    assert config["settings"]["DATA_DIR"] == str(cifar_root) and config["settings"]["OUTPUT_DIR"] == str(out)
    assert config["device"] == "cpu" and config["torch"] == torch.__version__ and config["dry_run"] is False


def test_history_csv_has_one_row_per_epoch_with_each_blocks_learning_rate(two_runs):
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
    assert confusion.shape == (10, 10) and confusion.sum() == 30
    for c, name in enumerate(results["classes"]):
        assert results["per_class_acc"][name] == pytest.approx(confusion[c, c].item() / confusion[c].sum().item())
    assert results["test_acc"] == pytest.approx(confusion.trace().item() / 30)
    assert results["epochs_run"] == 2 and results["best_epoch"] in (1, 2)
    assert results["stop_reason"] == "all epochs ran (EPOCHS = 2)" and results["wall_time_s"] > 0
    assert f"test accuracy {results['test_acc']:.2%}" in first
    report = first[first.index("test loss"):first.index("runs so far")]
    assert "confusion matrix (rows: true class, columns: predicted)" in report
    assert all(len(line) <= 80 for line in report.splitlines()), report


def test_summary_gains_a_row_per_run_and_the_second_run_is_compared_with_the_first(two_runs):
    out, first, second = two_runs
    with open(out / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["run"] for row in rows] == ["finetune", "features"]
    assert [row["FREEZE_UNTIL"] for row in rows] == ["layer2", "layer4"]
    assert set(ft.SETTINGS) <= set(rows[0]) and rows[1]["WEIGHTS"] == "IMAGENET1K_V1"
    table = second[second.index("runs so far"):].splitlines()
    assert "finetune" in table[2] and "features" in table[3]
    assert all(len(line) <= 80 for line in table[:4]), table
    accuracy = 100 * (float(rows[1]["test_acc"]) - float(rows[0]["test_acc"]))
    ratio = float(rows[1]["minutes"]) / float(rows[0]["minutes"])
    assert table[4] == (f"vs finetune (FREEZE_UNTIL layer2 -> layer4): test accuracy {accuracy:+.1f} points, "
                        f"{ratio:.1f}x the minutes")
    assert "vs " not in first[first.index("runs so far"):]                # nothing to compare the first run with


def test_the_comparison_names_every_setting_that_differs_and_survives_old_rows():
    rows = [{"run": "old", "freeze_until": "layer2", "test_acc": "0.5", "minutes": "2"},      # an older version
            {"run": "a", **{name: "1" for name in ft.SETTINGS}, "test_acc": "0.5", "minutes": "2"},
            {"run": "b", **{name: "1" for name in ft.SETTINGS}, "SEED": "2", "HEAD_LR": "0.01", "test_acc": "0.561",
             "minutes": "4.6"}]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows)
    assert text.getvalue().splitlines()[-1] == ("vs a (SEED 1 -> 2, HEAD_LR 1 -> 0.01): test accuracy +6.1 points, "
                                                "2.3x the minutes")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows[:2])
    assert text.getvalue().splitlines()[-1] == "vs old (settings unknown): test accuracy +0.0 points, 1.0x the minutes"


def test_curves_png_is_written_atomically_when_matplotlib_is_present(with_matplotlib, real_files, tmp_path, capsys):
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--epochs", "1", "--run-name", "plot"))
    assert code == 0, err
    assert (tmp_path / "plot" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "plot").iterdir() if p.name.startswith(".")]
    assert "no curves.png" not in out


def test_without_matplotlib_the_run_still_succeeds_and_says_how_to_get_the_plot(real_files, tmp_path, capsys):
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--epochs", "1", "--run-name", "plain"))
    assert code == 0, err
    assert out.count("pip install matplotlib") == 1
    assert not (tmp_path / "plain" / "curves.png").exists() and (tmp_path / "summary.csv").exists()


def test_a_class_with_no_test_images_does_not_break_the_report(monkeypatch, torch_home, tmp_path, capsys):
    sums = write_cifar10(tmp_path / "data", test_labels=[c for c in range(9) for _ in range(3)])   # no trucks
    (tmp_path / "md5.json").write_text(json.dumps(sums))
    trust(monkeypatch, tmp_path / "md5.json")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    code, out, err = run(capsys, *tiny(tmp_path / "data", tmp_path / "runs", "--epochs", "1", "--run-name", "gap"))
    assert code == 0, err
    assert any(line.startswith("truck") and "n/a" in line for line in out.splitlines())
    assert json.loads((tmp_path / "runs" / "gap" / "results.json").read_text())["per_class_acc"]["truck"] is None


def test_most_confused_pairs_are_named():
    confusion = torch.eye(3, dtype=torch.int64) * 10
    confusion[0, 1], confusion[2, 1], confusion[1, 0] = 7, 3, 1
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_report(confusion, ["cat", "dog", "frog"])
    assert "most confused: cat -> dog: 7, frog -> dog: 3, dog -> cat: 1" in text.getvalue()
