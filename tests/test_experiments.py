"""Every command of the README's Experiments table runs as a dry run and shows its effect."""

import re

import pytest

import fine_tuning as ft
from conftest import ROOT, run


def experiment_commands():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Experiments") : text.index("## Results")]
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and "fine_tuning.py" in line
    ]
    commands = []
    for row in rows:
        for command in re.findall(r"`(python fine_tuning\.py[^`]*)`", row):
            commands.append(command.split()[2:])
    return commands


COMMANDS = experiment_commands()


def test_the_table_covers_the_seeds_questions_and_next_steps():
    flags = {arg for command in COMMANDS for arg in command if arg.startswith("--")}
    assert {"--freeze-until", "--backbone-lr", "--layer-lr-decay", "--train-per-class"} <= flags
    assert {"--unfreeze-schedule", "--weights", "--patience", "--monitor", "--frozen-bn"} <= flags
    assert ["--freeze-until", "layer4", "--unfreeze-schedule", "2:layer3"] in COMMANDS  # head first
    assert ["--weights", "none", "--freeze-until", "none", "--backbone-lr", "1e-3"] in COMMANDS


def is_block_row(line):
    return bool(line.split()) and line.split()[0] in ft.BLOCKS


def expected_block_table(cfg):
    """{block: (status, lr, BatchNorm)}: what trains, at which rate, with which BatchNorm."""
    lrs = ft.block_lrs(cfg.backbone_lr, cfg.layer_lr_decay, cfg.head_lr)
    frozen = []
    if cfg.freeze_until != "none":
        frozen = ft.BLOCKS[: ft.BLOCKS.index(cfg.freeze_until) + 1]
    table = {}
    for name in ft.BLOCKS:
        status, rate, norm = "trainable", f"{lrs[name]:.1e}", "train"
        if name in frozen:
            status, rate, norm = "frozen", "-", cfg.frozen_bn
        if name == "fc":
            norm = "-"
        table[name] = (status, rate, norm)
    return table


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_an_experiment_runs_as_a_dry_run_and_shows_its_effect(command, tmp_path, capsys):
    # What a user runs: the command and --dry-run, nothing patched.
    code, out, err = run(capsys, *command, "--dry-run", "--output-dir", tmp_path)
    assert code == 0, err
    options = dict(zip(command[::2], command[1::2], strict=True))
    cfg = ft.parse_settings(command + ["--dry-run"])
    capsys.readouterr()
    table = {line.split()[0]: line.split() for line in out.splitlines() if is_block_row(line)}
    for name, (status, rate, norm) in expected_block_table(cfg).items():
        assert table[name][1:2] + table[name][3:] == [status, rate, norm], table[name]
    if "--train-per-class" in options:
        n = int(options["--train-per-class"])
        assert f"data: {10 * n:,} train ({n} per class) / 5,000 validation" in out
    released = [line for line in out.splitlines() if line.startswith("unfreezing ")]
    assert len(released) == len(cfg.unfreeze_schedule)
    if "--patience" in options:
        assert "stopped: early stopping" in out and f"(PATIENCE = {options['--patience']})" in out
    if "--monitor" in options:
        assert f"the best {options['--monitor']}, from best.pt" in out
    if "--image-size" in options:
        seen = f"32 px, the model sees {options['--image-size']} px\n"
        if options["--image-size"] == "32":
            seen = " classes, 32 px\n"
        assert seen in out
    assert "test accuracy" in out and "Traceback" not in err
