"""Learning rates that follow the batch.

A recipe states the total batch its learning rates were tuned for (``model.optim.reference_batch``;
the official COCO recipe: 32 = 8 GPUs x 4). When a run's real total batch (devices x nodes x batch per
device x gradient accumulation) differs, every parameter group's base learning rate is multiplied by
``lr_factor(reference, actual, rule)`` before the optimiser is built, so whatever schedule follows
(warmup, drops) starts from the scaled values.

Rules: ``none`` (keep the recipe's), ``linear`` (Goyal et al. 2017, for SGD: lr x actual/reference),
``sqrt`` (lr x sqrt(actual/reference), the rule derived for Adam-type optimisers by Malladi et al. 2022,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"). The default is ``sqrt``: Deformable DETR
trains with AdamW, and the linear rule shrinks the official 2e-4 to 1.25e-5 at total batch 2, where
learning barely starts (the "AP stays 0 with batch 1 or 2" threads); sqrt gives 5e-5.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

RULES = ("none", "linear", "sqrt")


def lr_factor(reference_batch: int, actual_batch: int, rule: str) -> float:
    """The multiplier of every learning rate for ``actual_batch`` instead of ``reference_batch``."""
    if rule not in RULES:
        raise ValueError(f"OptimConfig.lr_scaling must be one of {RULES}, got {rule!r}")
    if reference_batch < 1 or actual_batch < 1:
        raise ValueError(f"batch sizes must be positive, got reference {reference_batch} and actual {actual_batch}")
    ratio = actual_batch / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def total_batch(trainer) -> tuple[int, str] | None:
    """The real total batch of a run and how it is made up; None without a data module's ``batch_size``."""
    batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch_size is None:
        return None
    devices, nodes, accumulation = trainer.num_devices, trainer.num_nodes, trainer.accumulate_grad_batches
    total = devices * nodes * int(batch_size) * accumulation
    return total, f"{devices} device(s) x {nodes} node(s) x {batch_size} per device x {accumulation} accumulation"


def scale_to_batch(
    groups: list[dict[str, Any]], reference_batch: int | None, rule: str, trainer
) -> list[dict[str, Any]]:
    """``groups`` (optimiser parameter groups with ``lr`` and ``name``) with their lrs scaled to the trainer's
    total batch; one WARNING line (rank zero) when they change. Unchanged without a reference batch or trainer."""
    if reference_batch is None or trainer is None:
        return groups
    actual = total_batch(trainer)
    if actual is None:
        return groups
    total, made_of = actual
    factor = lr_factor(int(reference_batch), total, rule)
    if total == reference_batch or factor == 1.0:
        return groups
    scaled = [{**group, "lr": group["lr"] * factor} for group in groups]
    if trainer.is_global_zero:
        lrs = ", ".join(f"{group.get('name', index)} {group['lr']:.3g}" for index, group in enumerate(scaled))
        log.warning(
            "learning rates follow the batch: reference total batch %d, actual %d (%s), rule %s (x%.3g): %s "
            '(lr_scaling="none" keeps the recipe\'s)',
            reference_batch,
            total,
            made_of,
            rule,
            factor,
            lrs,
        )
    return scaled
