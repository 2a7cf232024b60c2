"""Learning rates that follow the total batch (devices x nodes x batch x accumulation)."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import lightning as L
import pytest

from ddetr.app import compose
from ddetr.training.lr_scaling import lr_factor, scale_to_batch
from ddetr.training.run import train

GROUPS = [{"name": "backbone", "lr": 2e-5}, {"name": "linear_proj", "lr": 2e-5}, {"name": "rest", "lr": 2e-4}]


def fake_trainer(devices: int, nodes: int, batch: int, accumulation: int = 1):
    return SimpleNamespace(
        num_devices=devices,
        num_nodes=nodes,
        accumulate_grad_batches=accumulation,
        datamodule=SimpleNamespace(batch_size=batch),
        is_global_zero=True,
    )


def test_rules_hand_values():
    assert lr_factor(32, 4, "linear") == pytest.approx(1 / 8)
    assert lr_factor(32, 8, "sqrt") == pytest.approx(0.5)
    assert lr_factor(32, 2, "sqrt") == pytest.approx(0.25)
    assert lr_factor(32, 64, "linear") == pytest.approx(2.0)
    assert lr_factor(32, 2, "none") == 1.0
    for rule in ("none", "linear", "sqrt"):
        assert lr_factor(32, 32, rule) == 1.0
    with pytest.raises(ValueError, match="lr_scaling"):
        lr_factor(32, 2, "cubic")


def test_official_recipe_at_its_batch_is_unchanged(caplog):
    cfg = compose(["experiment=multi_scale"])
    assert cfg.model.optim.reference_batch == 32 and cfg.model.optim.lr_scaling == "sqrt"
    assert cfg.data.batch_size == 4
    with caplog.at_level(logging.WARNING):
        groups = scale_to_batch(GROUPS, 32, "sqrt", fake_trainer(devices=8, nodes=1, batch=4))
    assert groups == GROUPS and not caplog.records
    # 2 nodes x 4 GPUs x 2 images x 2 accumulation is 32 too
    assert scale_to_batch(GROUPS, 32, "linear", fake_trainer(4, 2, 2, 2)) == GROUPS


def test_one_gpu_scales_every_group_and_says_so_once(caplog):
    with caplog.at_level(logging.WARNING):
        groups = scale_to_batch(GROUPS, 32, "sqrt", fake_trainer(devices=1, nodes=1, batch=2))
    assert [g["lr"] for g in groups] == pytest.approx([0.5e-5, 0.5e-5, 0.5e-4])  # x sqrt(2/32) = x 1/4
    assert [g["name"] for g in groups] == ["backbone", "linear_proj", "rest"]
    (record,) = caplog.records
    message = record.getMessage()
    for part in ("reference total batch 32", "actual 2", "rule sqrt", "rest 5e-05", "backbone 5e-06"):
        assert part in message, message


def test_training_builds_the_optimiser_with_scaled_lrs(tmp_path, debug_overrides, caplog):
    """Through the real configs: batch 2 x accumulation 2 = 4 against a stated reference of 16, linear: x 1/4."""
    seen = {}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    cfg = compose(
        debug_overrides(tmp_path, tmp_path / "data")
        + [
            "model.optim.reference_batch=16",
            "model.optim.lr_scaling=linear",
            "data.batch_size=2",
            "+trainer.accumulate_grad_batches=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="ddetr.training.lr_scaling"):
        train(cfg, extra_callbacks=[Record()])
    optim = cfg.model.optim
    assert seen["rest"] == pytest.approx(optim.lr / 4)
    assert seen["backbone"] == pytest.approx(optim.lr_backbone / 4)
    assert seen["linear_proj"] == pytest.approx(optim.lr * optim.lr_linear_proj_mult / 4)
    lines = [r.getMessage() for r in caplog.records if "follow the batch" in r.getMessage()]
    assert len(lines) == 1 and "actual 4 (1 device(s) x 1 node(s) x 2 per device x 2 accumulation)" in lines[0]
    assert math.isclose(float(lines[0].split("(x")[1].split(")")[0]), 0.25)
