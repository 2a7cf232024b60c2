"""Precision: the matmul-precision setting, bf16-mixed training end to end on the CPU, and the
detector through torch.compile."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from _batches import random_targets
from omegaconf import OmegaConf

from ddetr.app import apply_matmul_precision
from ddetr.training.module import DeformableDETRModule

# the tiny model with frozen batch norm, 2 levels and no dropout, so the two precisions see the same network
OVERRIDES = dict(backbone={"name": "resnet18", "norm": "frozen"}, num_feature_levels=2, dropout=0.0)


def batches(num_batches: int = 3) -> list:
    generator = torch.Generator().manual_seed(0)
    result = []
    for _ in range(num_batches):
        images = torch.randn(2, 3, 64, 80, generator=generator)
        mask = torch.zeros(2, 64, 80, dtype=torch.bool)
        mask[1, 48:, :] = True
        targets = random_targets(generator, (2, 3))
        result.append((images, mask, targets))
    return result


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit_losses(options: dict, precision: str) -> list[float]:
    torch.manual_seed(0)
    module = DeformableDETRModule(num_classes=3, **options)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    loader = torch.utils.data.DataLoader(batches(), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return recorder.losses


def test_bf16_mixed_trains_close_to_float32(micro_options):
    reference = fit_losses(micro_options(**OVERRIDES), "32-true")
    mixed = fit_losses(micro_options(**OVERRIDES), "bf16-mixed")
    assert len(mixed) == len(reference) == 3
    assert all(torch.isfinite(torch.tensor(mixed)))
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per product), but the matcher and the
    # losses run in float32 and the rounding errors of ~20 layers largely average out: measured 6e-4 at
    # most over the three steps. 1% leaves room for other CPUs while catching a broken path (bf16
    # sampling locations or losses give errors of several percent).
    torch.testing.assert_close(torch.tensor(mixed), torch.tensor(reference), rtol=1e-2, atol=0.0)


def test_matmul_precision_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    apply_matmul_precision(OmegaConf.create({"matmul_precision": "highest"}))
    assert calls == ["highest"] and torch.backends.cudnn.allow_tf32 is False
    apply_matmul_precision(OmegaConf.create({"matmul_precision": "high"}))
    assert calls == ["highest", "high"] and torch.backends.cudnn.allow_tf32 is True
    apply_matmul_precision(OmegaConf.create({}))
    assert len(calls) == 2
    with pytest.raises(ValueError, match="matmul_precision"):
        apply_matmul_precision(OmegaConf.create({"matmul_precision": "tf32"}))


def test_configs_set_matmul_precision():
    from ddetr.app import compose

    for name in ("train", "eval", "predict"):
        overrides = (
            ["ckpt_path=x"] if name == "eval" else (["ckpt_path=x", "input=x", "output=x"] if name == "predict" else [])
        )
        assert compose(overrides, config_name=name).matmul_precision == "high"
