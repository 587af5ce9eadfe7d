"""Every command of the README's Experiments table runs as a dry run and shows the effect it is there for."""

import re

import pytest

import fine_tuning as ft
from conftest import ROOT, run


def experiment_commands():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Experiments") : text.index("## Results")]
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and "python fine_tuning.py" in line
    ]
    return [
        command.split()[2:]
        for row in rows
        for command in re.findall(r"`(python fine_tuning\.py[^`]*)`", row)
    ]


COMMANDS = experiment_commands()


def test_the_table_covers_the_seeds_questions_and_next_steps():
    flags = {arg for command in COMMANDS for arg in command if arg.startswith("--")}
    assert {
        "--freeze-until",
        "--backbone-lr",
        "--layer-lr-decay",
        "--train-per-class",
        "--unfreeze-schedule",
        "--weights",
        "--patience",
        "--monitor",
        "--frozen-bn",
        "--image-size",
    } <= flags
    assert len(COMMANDS) >= 12


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_an_experiment_runs_as_a_dry_run_and_shows_its_effect(command, tmp_path, capsys):
    # What a user runs: the command and --dry-run, nothing patched.
    code, out, err = run(capsys, *command, "--dry-run", "--output-dir", tmp_path)
    assert code == 0, err
    options = dict(zip(command[::2], command[1::2]))
    cfg = ft.parse_settings(command)
    blocks = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in ([[b] for b in ft.BLOCKS])
    }
    frozen = (
        ft.BLOCKS[: ft.BLOCKS.index(cfg.freeze_until) + 1] if cfg.freeze_until != "none" else []
    )
    for name in ft.BLOCKS:  # the block table: what trains, and at which rate
        expected = "-" if name in frozen else f"{ft.block_lr(name, cfg):.1e}"
        assert (
            blocks[name][1] == ("frozen" if name in frozen else "trainable")
            and blocks[name][3] == expected
        )
        bn = "-" if name == "fc" else cfg.frozen_bn if name in frozen else "train"
        assert blocks[name][4] == bn, (name, blocks[name])
    if "--train-per-class" in options:
        n = int(options["--train-per-class"])
        assert f"data: {10 * n:,} train (kept {n} per class, of 1,800)" in out
    for epoch, block in cfg.unfreeze_schedule.items():
        assert f"epoch {epoch}: unfreezing {block}" in out
    if "--patience" in options:
        assert "stopped: early stopping" in out and f"(PATIENCE = {options['--patience']})" in out
    if "--monitor" in options:
        assert f"(best {options['--monitor']})" in out
    if "--weights" in options:
        assert f"random weights (WEIGHTS = {options['--weights']})" in out
    assert ("the frozen blocks keep random weights" in out) == (
        cfg.settings["WEIGHTS"] == "none" and bool(frozen)
    )
    if "--image-size" in options:
        assert f"image size: {options['--image-size']}px" in out
    assert "test accuracy" in out and "Traceback" not in err
