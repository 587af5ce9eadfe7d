"""Early stopping stops after `patience` epochs without improvement, and the best epoch's weights come back."""
import json

import pytest
import torch

import fine_tuning as ft
from conftest import load_state, run
from helpers import snapshot


def test_stops_after_patience_epochs_without_an_improvement_of_min_delta():
    stopper = ft.EarlyStopping(patience=3, min_delta=0.01, mode="min")
    assert stopper.step(1.0, 1) and stopper.step(0.9, 2)
    assert not stopper.step(0.895, 3)          # better, but by less than min_delta: not an improvement
    assert not stopper.should_stop
    assert not stopper.step(0.95, 4) and not stopper.should_stop
    assert not stopper.step(0.90, 5)
    assert stopper.should_stop and stopper.best_epoch == 2 and stopper.best == 0.9


def test_an_improvement_resets_the_count_and_accuracy_is_maximised():
    stopper = ft.EarlyStopping(patience=2, min_delta=0.0, mode="max")
    stopper.step(0.5, 1)
    stopper.step(0.4, 2)
    assert stopper.step(0.6, 3) and stopper.bad_epochs == 0 and not stopper.should_stop
    stopper.step(0.6, 4)
    stopper.step(0.55, 5)
    assert stopper.should_stop and stopper.best_epoch == 3


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    stopper = ft.EarlyStopping(patience=0, min_delta=0.0)
    stopper.step(1.0, 1)
    assert not stopper.should_stop
    stopper.step(1.1, 2)
    assert stopper.should_stop


def test_run_stops_early_and_tests_the_best_epochs_weights(monkeypatch, tmp_path, capsys):
    val_losses = iter([1.0, 0.5, 0.6, 0.55, 0.7, 0.4, 0.3])   # best at epoch 2; 3 bad epochs follow
    states, real_evaluate = {}, ft.evaluate

    def scripted_evaluate(model, loader, hw, cfg, desc):
        loss, confusion, predictions = real_evaluate(model, loader, hw, cfg, desc)
        if desc == "test":
            states["tested"] = snapshot(model)
            return loss, confusion, predictions
        states[len(states) + 1] = snapshot(model)      # the weights at the end of this epoch
        return next(val_losses), confusion, predictions

    monkeypatch.setattr(ft, "evaluate", scripted_evaluate)
    monkeypatch.setattr(ft, "DRY_RUN_BATCHES", 1)
    code, out, err = run(capsys, "--dry-run", "--epochs", "7", "--patience", "3", "--output-dir", tmp_path,
                         "--run-name", "es")
    assert code == 0, err
    assert ("stopped: early stopping: val_loss did not improve on epoch 2 by at least 0.001 "
            "for 3 epoch(s) (PATIENCE = 3)") in out
    assert sorted(k for k in states if k != "tested") == [1, 2, 3, 4, 5]    # epochs 6 and 7 never ran
    best = load_state(tmp_path / "es" / "best.pt")
    for name, value in states[2].items():
        assert torch.equal(best[name], value), name
        assert torch.equal(states["tested"][name], value), name
    assert not all(torch.equal(states[5][k], v) for k, v in states[2].items())
    results = json.loads((tmp_path / "es" / "results.json").read_text())
    assert results["best_epoch"] == 2 and results["epochs_run"] == 5
    assert "restored the weights of epoch 2" in out


@pytest.mark.parametrize("monitor,values,best", [("val_acc", [0.3, 0.5, 0.4], 2), ("val_loss", [0.5, 0.4, 0.6], 2)])
def test_monitor_setting_chooses_what_early_stopping_watches(monitor, values, best):
    stopper = ft.EarlyStopping(5, 0.0, "min" if monitor == "val_loss" else "max")
    for epoch, value in enumerate(values, 1):
        stopper.step(value, epoch)
    assert stopper.best_epoch == best
