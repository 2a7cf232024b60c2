"""Learning-rate schedules: the official per-epoch StepLR, a per-step cosine sized to the run, and a
linear warmup in optimiser steps for either. ``lr_schedulers(optimizer, optim_cfg, total_steps)``
returns them in Lightning's format (``configure_optimizers``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ddetr.models.config import OptimConfig

SCHEDULES = ("step", "cosine", "drop")


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps during the linear warmup, then 1 (no warmup for warmup_steps <= 1)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 1 else 1.0


class WarmupCosine:
    """The lr factor of optimiser step ``step``: linear warmup from ``1 / warmup_steps`` to 1 over
    ``warmup_steps`` steps, then a cosine from 1 to ``min_factor`` at ``total_steps``.

    A plain object (not a lambda), so ``LambdaLR.state_dict()`` saves it with the checkpoint."""

    def __init__(self, total_steps: int, warmup_steps: int, min_factor: float) -> None:
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        warmup = _warmup_factor(step, self.warmup_steps)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / decay_steps, 1.0)
        cosine = self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warmup * cosine


class WarmupDrop:
    """The lr factor of optimiser step ``step``: linear warmup over ``warmup_steps`` steps, constant,
    then x ``gamma`` from ``drop_fraction`` of ``total_steps`` on (the official recipe's late drop,
    sized in steps to the run). A plain object, saved with the scheduler's state."""

    def __init__(self, total_steps: int, warmup_steps: int, drop_fraction: float, gamma: float) -> None:
        self.warmup_steps = max(int(warmup_steps), 0)
        self.drop_step = int(round(max(int(total_steps), 1) * float(drop_fraction)))
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        return _warmup_factor(step, self.warmup_steps) * (self.gamma if step >= self.drop_step else 1.0)


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LinearLR:
    """lr x (k + 1) / warmup_steps at optimiser step k < warmup_steps, then x1 (chains with StepLR)."""
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1
    )


def lr_schedulers(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | None) -> list[dict[str, Any]]:
    """The schedulers of ``cfg.schedule`` as Lightning scheduler dicts (``interval`` step or epoch).

    ``step`` without warmup is exactly the official recipe: one StepLR stepped every epoch.
    ``total_steps`` (optimiser steps of the whole run) sizes the cosine; ``cfg.total_steps`` wins."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    warmup = int(cfg.warmup_steps or 0)
    if cfg.schedule in ("cosine", "drop"):
        total = cfg.total_steps or total_steps
        if not total or not math.isfinite(total):
            raise ValueError(
                f"optim.schedule={cfg.schedule} needs the run's length: set optim.total_steps or trainer.max_epochs"
            )
        if cfg.schedule == "cosine":
            factor = WarmupCosine(int(total), warmup, cfg.min_lr_factor)
        else:
            factor = WarmupDrop(int(total), warmup, cfg.lr_drop_fraction, cfg.lr_drop_gamma)
        return [{"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step", "name": "lr"}]
    schedulers = []
    if warmup > 1:  # built first: StepLR then chains on the warmed-up lr
        schedulers.append({"scheduler": linear_warmup(optimizer, warmup), "interval": "step", "name": "lr_warmup"})
    step_lr = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=cfg.lr_drop_gamma)
    schedulers.append({"scheduler": step_lr, "interval": "epoch", "name": "lr"})
    return schedulers
