"""Frozen means frozen (weights and BatchNorm statistics), and every block learns at its own rate."""
import pytest
import torch

import fine_tuning as ft
from helpers import settings, small_setup, snapshot, train_epochs


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("freeze_until", ["stem", "layer2", "layer4"])
def test_frozen_blocks_weights_and_batchnorm_statistics_do_not_change(freeze_until):
    setup = small_setup("--freeze-until", freeze_until)
    blocks = ft.block_modules(setup.model)
    before = {name: snapshot(block) for name, block in blocks.items()}
    train_epochs(setup, epochs=2, max_batches=2)
    frozen = ft.BLOCKS[:ft.BLOCKS.index(freeze_until) + 1]
    for name, block in blocks.items():
        after = snapshot(block)
        if name in frozen:
            assert not changed(before[name], after), f"{name} is frozen but changed"
        else:   # every weight of a trainable block moved, and its BatchNorm statistics too
            assert changed(before[name], after) >= {k for k in after if "running" not in k and "num_batches" not in k}
            if name != "fc":
                assert any("running_mean" in k for k in changed(before[name], after)), name


def test_frozen_batchnorm_stays_in_eval_mode_after_model_train():
    setup = small_setup("--freeze-until", "layer2")
    ft.set_train_mode(setup.model)
    modes = {name: {m.training for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)}
             for name, block in ft.block_modules(setup.model).items() if name != "fc"}
    assert modes == {"stem": {False}, "layer1": {False}, "layer2": {False}, "layer3": {True}, "layer4": {True}}
    assert not any(p.requires_grad for p in setup.model.layer2.parameters())


def test_freeze_none_trains_everything_and_layer4_is_feature_extraction():
    assert [g["name"] for g in small_setup("--freeze-until", "none").optimizer.param_groups] == ft.BLOCKS
    assert [g["name"] for g in small_setup("--freeze-until", "layer4").optimizer.param_groups] == ["fc"]


def test_each_parameter_group_gets_its_learning_rate_and_no_frozen_parameter():
    setup = small_setup("--freeze-until", "layer2", "--backbone-lr", "1e-4", "--head-lr", "1e-3")
    groups = {g["name"]: g for g in setup.optimizer.param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"layer3": 1e-4, "layer4": 1e-4, "fc": 1e-3}
    assert groups["fc"]["lr"] == pytest.approx(10 * groups["layer3"]["lr"])   # the head learns 10x faster
    in_optimizer = {id(p) for g in setup.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in setup.model.parameters() if p.requires_grad}
    for name in ["stem", "layer1", "layer2"]:
        assert not in_optimizer & {id(p) for p in ft.block_modules(setup.model)[name].parameters()}


def test_the_optimizer_step_uses_each_groups_learning_rate():
    # One Adam step moves each weight by about lr (Adam normalises the gradient's scale).
    setup = small_setup("--freeze-until", "layer2", "--backbone-lr", "1e-4", "--head-lr", "1e-3")
    before = snapshot(setup.model)
    train_epochs(setup, epochs=1, max_batches=1)
    after = snapshot(setup.model)
    assert (after["fc.weight"] - before["fc.weight"]).abs().max().item() == pytest.approx(1e-3, rel=0.05)
    assert (after["layer4.1.conv2.weight"] - before["layer4.1.conv2.weight"]).abs().max().item() == pytest.approx(
        1e-4, rel=0.05)


def test_layer_lr_decay_gives_each_earlier_block_a_smaller_rate():
    cfg = settings("--layer-lr-decay", "0.5", "--backbone-lr", "1e-4", "--head-lr", "1e-3")
    assert {name: ft.block_lr(name, cfg) for name in ft.BLOCKS} == pytest.approx(
        {"stem": 6.25e-6, "layer1": 1.25e-5, "layer2": 2.5e-5, "layer3": 5e-5, "layer4": 1e-4, "fc": 1e-3})
    default = settings()
    assert default.layer_lr_decay == 1.0
    assert {ft.block_lr(name, default) for name in ft.BLOCKS[:-1]} == {default.backbone_lr}   # today's two rates
    setup = small_setup("--freeze-until", "none", "--layer-lr-decay", "0.5")
    assert [g["lr"] for g in setup.optimizer.param_groups] == pytest.approx([6.25e-6, 1.25e-5, 2.5e-5, 5e-5, 1e-4, 1e-3])


def test_gradual_unfreezing_adds_a_group_at_the_blocks_own_rate_and_those_weights_then_learn():
    setup = small_setup("--freeze-until", "layer2", "--layer-lr-decay", "0.5")
    assert ft.unfreeze(setup.model, setup.optimizer, "layer2", setup.cfg) == ["layer2"]
    group = setup.optimizer.param_groups[-1]
    assert group["name"] == "layer2" and group["lr"] == pytest.approx(2.5e-5)   # BACKBONE_LR x decay^2
    before = snapshot(setup.model.layer2)
    train_epochs(setup, epochs=1, max_batches=2)
    after = snapshot(setup.model.layer2)
    assert not torch.equal(before["0.conv1.weight"], after["0.conv1.weight"])
    assert not torch.equal(before["0.bn1.running_mean"], after["0.bn1.running_mean"])   # its BatchNorm trains again
    ft.set_train_mode(setup.model)
    assert setup.model.layer2.training and not setup.model.layer1.training


def test_unfreezing_an_earlier_block_releases_every_frozen_block_after_it():
    setup = small_setup("--freeze-until", "layer2")
    assert ft.unfreeze(setup.model, setup.optimizer, "layer1", setup.cfg) == ["layer1", "layer2"]
    assert [g["name"] for g in setup.optimizer.param_groups] == ["layer3", "layer4", "fc", "layer1", "layer2"]


@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_frozen_bn_train_adapts_the_frozen_blocks_statistics_but_never_their_weights(frozen_bn):
    setup = small_setup("--freeze-until", "layer2", "--frozen-bn", frozen_bn)
    blocks = ft.block_modules(setup.model)
    before = {name: snapshot(blocks[name]) for name in ["stem", "layer1", "layer2"]}
    train_epochs(setup, epochs=1, max_batches=2)
    for name, old in before.items():
        moved = changed(old, snapshot(blocks[name]))
        statistics = {k for k in old if "running_" in k or "num_batches" in k}
        assert moved == (statistics if frozen_bn == "train" else set()), (name, moved)   # weights never move
        assert not any(p.requires_grad for p in blocks[name].parameters())
    modes = {m.training for name in before for m in blocks[name].modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert modes == {frozen_bn == "train"}
