"""Learning-rate schedules: the official StepLR per epoch is unchanged, a linear warmup in steps
works for every recipe, and the per-step cosine is sized to the run."""

from __future__ import annotations

import math

import pytest
import torch

from ddetr.app import compose
from ddetr.models.config import OptimConfig
from ddetr.training.schedules import WarmupCosine, lr_schedulers


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def run(schedulers, steps_per_epoch: int, epochs: int) -> list[float]:
    """The lr of every optimiser step, stepping each scheduler at its interval as Lightning does."""
    opt = schedulers[0]["scheduler"].optimizer
    lrs = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            for entry in schedulers:
                if entry["interval"] == "step":
                    entry["scheduler"].step()
        for entry in schedulers:
            if entry["interval"] == "epoch":
                entry["scheduler"].step()
    return lrs


@pytest.mark.parametrize("experiment", ["coco_recipe", "single_scale", "multi_scale", "two_stage"])
def test_the_coco_experiments_keep_the_official_steplr_at_epoch_40(experiment):
    cfg = compose([f"experiment={experiment}"])
    optim = OptimConfig.from_dict(cfg.model.optim)
    (entry,) = lr_schedulers(optimizer(2e-4), optim, total_steps=50 * 100)
    scheduler = entry["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and entry["interval"] == "epoch"
    assert (scheduler.step_size, scheduler.gamma) == (40, pytest.approx(0.1))
    lrs = run([entry], steps_per_epoch=2, epochs=50)
    assert lrs[: 40 * 2] == [pytest.approx(2e-4)] * 80  # no warmup, constant for 40 epochs
    assert lrs[40 * 2 :] == [pytest.approx(2e-5)] * 20


def test_warmup_then_steplr():
    cfg = OptimConfig(warmup_steps=4, lr_drop=2)
    schedulers = lr_schedulers(optimizer(1.0), cfg, total_steps=None)
    assert [entry["interval"] for entry in schedulers] == ["step", "epoch"]
    lrs = run(schedulers, steps_per_epoch=3, epochs=3)
    expected = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1]
    assert lrs == [pytest.approx(value) for value in expected]


def test_warmup_then_cosine_sized_to_the_run():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_factor=0.01)
    (entry,) = lr_schedulers(optimizer(1.0), cfg, total_steps=110)
    assert entry["interval"] == "step"
    lrs = run([entry], steps_per_epoch=11, epochs=10)
    assert lrs[:10] == [pytest.approx((k + 1) / 10) for k in range(10)]
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the decay
    assert lrs[-1] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_then_a_late_drop_sized_to_the_run():
    cfg = OptimConfig(schedule="drop", warmup_steps=2, lr_drop_fraction=0.75, lr_drop_gamma=0.1)
    (entry,) = lr_schedulers(optimizer(1.0), cfg, total_steps=8)
    assert entry["interval"] == "step"
    lrs = run([entry], steps_per_epoch=4, epochs=2)
    assert lrs == [pytest.approx(value) for value in (0.5, 1, 1, 1, 1, 1, 0.1, 0.1)]


def test_cosine_needs_the_length_of_the_run_and_the_schedule_name_is_checked():
    with pytest.raises(ValueError, match="total_steps"):
        lr_schedulers(optimizer(), OptimConfig(schedule="cosine"), total_steps=None)
    (entry,) = lr_schedulers(optimizer(), OptimConfig(schedule="cosine", total_steps=7), total_steps=None)
    assert entry["scheduler"].lr_lambdas[0].total_steps == 7
    with pytest.raises(ValueError, match="schedule"):
        lr_schedulers(optimizer(), OptimConfig(schedule="linear"), total_steps=10)


def test_the_cosine_state_resumes():
    cfg = OptimConfig(schedule="cosine", warmup_steps=3)
    (first,) = lr_schedulers(optimizer(1.0), cfg, total_steps=20)
    run([first], steps_per_epoch=7, epochs=1)
    state = first["scheduler"].state_dict()
    (second,) = lr_schedulers(optimizer(1.0), cfg, total_steps=20)
    second["scheduler"].load_state_dict(state)
    assert second["scheduler"].get_last_lr() == pytest.approx(first["scheduler"].get_last_lr())
    assert WarmupCosine(20, 3, OptimConfig().min_lr_factor)(7) == pytest.approx(second["scheduler"].get_last_lr()[0])


def test_the_default_run_is_sized_in_epochs_and_validates_its_last_epoch():
    cfg = compose([])
    optim = cfg.model.optim
    assert (optim.schedule, optim.warmup_steps, optim.fused) == ("drop", 200, True)
    assert cfg.trainer.max_epochs % cfg.trainer.check_val_every_n_epoch == 0
    assert compose(["experiment=multi_scale"]).trainer.check_val_every_n_epoch == 1
