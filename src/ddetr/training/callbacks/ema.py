"""``WeightEMA``: an exponential moving average of the weights, on Lightning's ``WeightAveraging``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import WeightAveraging


class WeightEMA(WeightAveraging):
    """An exponential moving average (EMA) of the weights and buffers, on Lightning's ``WeightAveraging``.

    After every ``update_every_n_steps``-th optimiser step: ``average = d * average + (1 - d) * weights``
    with ``d = decay * (1 - exp(-num_updates / warmup_steps))`` (``d = decay`` when ``warmup_steps`` is 0), so
    the first updates follow the weights closely instead of keeping the random initialisation for thousands
    of steps. Integer buffers (batch norm's ``num_batches_tracked``) are copied, not averaged.

    What Lightning's callback does with it: validation runs on the average (the parameters are swapped in and
    back out), checkpoints hold the average as ``state_dict`` (so ``ddetr.eval``, ``ddetr.predict`` and
    ``ddetr.export`` use what was validated) and the raw weights as ``current_model_state``; resuming restores
    both; at the end of the fit the module is left holding the average.

    Under DDP the parameters are the same on every rank, and so is their average; buffers (batch norm
    statistics) are updated by each rank's own batches, so once the average is swapped (or copied) into the
    module for validation (or at the end), the module's buffers are broadcast from rank 0 (whose checkpoints
    are written); swapped back, the average keeps rank 0's.

    Only public API of ``WeightAveraging``: its hooks, and ``state_dict()["latest_update_step"]`` to count the
    updates.
    """

    def __init__(self, decay: float, update_every_n_steps: int = 1, warmup_steps: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), e.g. 0.9998, or null (off), got {decay}")
        if update_every_n_steps < 1 or warmup_steps < 0:
            raise ValueError(
                f"ema.update_every_n_steps must be >= 1 and ema.warmup_steps >= 0, got "
                f"{update_every_n_steps} and {warmup_steps}"
            )
        super().__init__(use_buffers=True, multi_avg_fn=self._update_average)
        self.decay = float(decay)
        self.update_every_n_steps = int(update_every_n_steps)
        self.warmup_steps = int(warmup_steps)
        self.num_updates = 0  # the averages taken so far (the first one copies the weights)
        self._swapped = False  # whether the average is swapped in for the running validation

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    def current_decay(self) -> float:
        """The decay of the next update."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.num_updates / self.warmup_steps))

    @torch.no_grad()
    def _update_average(self, averages: list[torch.Tensor], currents: list[torch.Tensor], _num_averaged) -> None:
        """``AveragedModel``'s update of one group of tensors (same device and dtype)."""
        if torch.is_floating_point(averages[0]):
            torch._foreach_lerp_(averages, currents, 1.0 - self.current_decay())
        else:
            torch._foreach_copy_(averages, currents)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        latest = super().state_dict()["latest_update_step"]  # the step of the last update
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if super().state_dict()["latest_update_step"] != latest:
            self.num_updates += 1

    # Before the first update the average is still the initial weights: validation and checkpoints then use
    # the weights themselves.
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self.num_updates > 0
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)  # the module now holds the average
            _broadcast_buffers(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.num_updates > 0:
            super().on_train_end(trainer, pl_module)  # the module now holds the average
            _broadcast_buffers(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.num_updates > 0:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = int(state_dict.get("num_updates", 0))


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch norm statistics) into every rank's ``module``, under DDP; nothing otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
