"""Every run leaves a lean folder of results that are easy to read, and each run is compared with the last."""
import contextlib
import csv
import re
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
    table = second[second.index("runs so far"):].split("\n\n")[0].splitlines()
    assert table[2].startswith("finetune ") and table[3].startswith("features ")
    assert table[2].endswith("FREEZE_UNTIL=layer2") or table[3].endswith("FREEZE_UNTIL=layer4")   # what differs
    assert all(len(line) <= 100 for line in table), table
    assert rows[1]["val_images"] == "10"                                  # the tiny set's validation split
    gap = 100 * (float(rows[1]["best_val_acc"]) - float(rows[0]["best_val_acc"]))
    assert " ".join(table[4:]).startswith(f"vs finetune (FREEZE_UNTIL layer2 -> layer4): best validation accuracy "
                                          f"{gap:+.1f} points, ")
    assert "one run's noise (about ±" in " ".join(table[4:]) and "test acc" not in " ".join(table[4:])
    assert "vs " not in first[first.index("runs so far"):]                # nothing to compare the first run with


def vs_line(text):
    """The comparison with the run before, as one line (it is wrapped at 100 columns)."""
    output = text.getvalue()
    return " ".join(output[output.rindex("\nvs ") + 1:].split())


def test_the_comparison_names_every_setting_that_differs_and_survives_old_rows():
    rows = [{"run": "old", "freeze_until": "layer2", "best_val_acc": "0.5", "minutes": "2"},      # an older version
            {"run": "a", **{name: "1" for name in ft.SETTINGS}, "best_val_acc": "0.85", "val_images": "5000",
             "minutes": "2"},
            {"run": "b", **{name: "1" for name in ft.SETTINGS}, "SEED": "2", "HEAD_LR": "0.01", "best_val_acc": "0.861",
             "val_images": "5000", "minutes": "4.6"},
            {"run": "c", **{name: "1" for name in ft.SETTINGS}, "best_val_acc": "0.885", "val_images": "5000",
             "minutes": "4.6"}]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows[:3])
    # Two standard errors of the difference: 2 x sqrt(0.85 x 0.15 / 5000 + 0.861 x 0.139 / 5000) = 1.4 points.
    assert vs_line(text) == ("vs a (SEED 1 -> 2, HEAD_LR 1 -> 0.01): best validation accuracy "
                                                "+1.1 points, within one run's noise (about ±1.4); 2.3x the minutes")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows[2:])
    assert vs_line(text) == ("vs b (SEED 2 -> 1, HEAD_LR 0.01 -> 1): best validation accuracy "
                                                "+2.4 points, beyond one run's noise (about ±1.3); 1.0x the minutes")
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows[:2])
    assert vs_line(text) == "vs old (settings unknown): best validation accuracy +35.0 points; 1.0x the minutes"
    assert "(settings unknown)" in text.getvalue().splitlines()[3]


def test_the_runs_table_tells_apart_runs_that_differ_in_any_setting():
    # Seven experiments of the README, each one setting away from the default, and a run name too long to align.
    default = {name: str(ft.parse_settings([]).settings[name]) for name in ft.SETTINGS}
    changes = [{}, {"FREEZE_UNTIL": "layer4"}, {"TRAIN_PER_CLASS": "100"}, {"PATIENCE": "1", "MIN_DELTA": "0.1"},
               {"EPOCHS": "30"}, {"FROZEN_BN": "train"}, {"WEIGHTS": "none", "FREEZE_UNTIL": "none"}]
    rows = [{**default, **change, "run": f"run-{i}" + "-with-a-long-name" * 3 * (i == 3), "best_val_acc": "0.8",
             "test_acc": "0.8", "epochs_run": "5", "minutes": "3"} for i, change in enumerate(changes)]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        ft.print_comparison(rows)
    lines = text.getvalue().splitlines()
    assert all(len(line) <= 100 for line in lines), lines
    for i, change in enumerate(changes):
        at = next(n for n, line in enumerate(lines) if line.startswith(rows[i]["run"] + " ") or line == rows[i]["run"])
        shown = lines[at] if lines[at] != rows[i]["run"] else lines[at + 1]   # a long name: its own line, whole
        settings = [f"{k}={v}" for k, v in change.items()]
        assert shown.split("  ")[-1].split() == settings or (not change and shown.endswith("3.0")), (change, shown)


def test_curves_and_mistakes_png_are_drawn_from_the_one_test_pass_when_matplotlib_is_present(
        with_matplotlib, real_files, tmp_path, capsys, monkeypatch):
    passes, evaluate = [], ft.evaluate
    monkeypatch.setattr(ft, "evaluate", lambda model, loader, hw, cfg, desc: passes.append(desc) or evaluate(
        model, loader, hw, cfg, desc))
    code, out, err = run(capsys, *tiny(real_files, tmp_path, "--epochs", "1", "--run-name", "plot"))
    assert code == 0, err
    assert passes == ["epoch 1 val", "test"]                                   # no second pass for the pictures
    for name in ["curves.png", "mistakes.png"]:
        assert (tmp_path / "plot" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "plot").iterdir() if p.name.startswith(".")]
    assert "no pictures" not in out and "curves.png history.csv mistakes.png" in out   # named in the files list


def test_mistakes_png_shows_the_16_most_confidently_wrong_images_and_curves_read_at_a_glance(with_matplotlib):
    from types import SimpleNamespace
    classes = ["c0", "c1", "c2"]
    labels = torch.tensor([i % 3 for i in range(30)])
    predicted = torch.tensor([(i + (i % 2)) % 3 for i in range(30)])       # every odd image is wrong
    confidence = torch.linspace(0.3, 0.99, 30)
    test_set = torch.utils.data.TensorDataset(torch.zeros(30, 3, 32, 32, dtype=torch.uint8), labels)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "train_acc": 0.1 * e, "val_acc": 0.1 * e}
               for e in range(1, 8)]
    fake_run = SimpleNamespace(history=history, dir=ft.Path("runs/demo"),
                               cfg=SimpleNamespace(unfreeze_schedule={3: "layer2", 5: "layer1"}))
    figures = ft.pictures(fake_run, 4, classes, test_set, torch.stack([predicted.float(), confidence], 1))
    titles = [axis.get_title() for axis in figures["mistakes.png"].axes]
    wrong = sorted((i for i in range(30) if i % 2), key=lambda i: -confidence[i])
    expected = [f"{classes[labels[i]]}\n-> {classes[predicted[i]]} ({confidence[i]:.0%})" for i in wrong]
    assert titles == expected + [""] * (16 - len(expected))                # 15 mistakes; the 16th cell is empty
    for axis in figures["curves.png"].axes:
        assert all(float(tick).is_integer() for tick in axis.get_xticks())  # whole epochs
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        assert legend[2:] == ["best epoch (4)", "unfreeze layer2 (before epoch 3)", "unfreeze layer1 (before epoch 5)"]
        events = [line for line in axis.get_lines() if line.get_xdata()[0] in (2.5, 4.5)]
        assert len({line.get_color() for line in events}) == 2               # each event drawn in its own colour
    accuracy = figures["curves.png"].axes[1]
    assert accuracy.get_ylabel() == "accuracy (%)" and max(accuracy.get_lines()[1].get_ydata()) == pytest.approx(70)


def test_a_log_gets_a_plain_progress_line_at_an_interval_and_a_terminal_gets_the_bar(tmp_path, capsys, monkeypatch):
    code, out, _ = run(capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path / "a")
    assert code == 0 and "  epoch 1: batch" not in out                      # a short run: nothing to add
    monkeypatch.setattr(ft, "LOG_EVERY", 0)                                 # every batch is "30 s later"
    code, out, _ = run(capsys, "--dry-run", "--epochs", "1", "--output-dir", tmp_path / "b")
    assert code == 0
    assert re.search(r"^  epoch 1: batch 1 of 2, loss \d+\.\d{3}, accuracy \d+\.\d%$", out, re.M), out
    assert re.search(r"^  test: batch 2 of 2, loss", out, re.M)


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
