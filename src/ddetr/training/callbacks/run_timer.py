"""``RunTimer``: the wall time of the fit, in total, in validation and per training step."""

from __future__ import annotations

import time

import lightning as L
import torch

from ddetr.training.callbacks.stopping import stop_reason


class RunTimer(L.Callback):
    """Measures the wall time of the fit: in total, in validation, and per training step.

    ``summary()`` is the line the run prints under its final metrics table, so a run on a slower or
    busier machine than planned still says how long it took."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.validation_s = 0.0
        self._validation_start: float | None = None
        self.steps = 0
        self.epochs = 0
        self.validated_at_step: int | None = None  # the global step of the last validation
        self.stop_reason: str | None = None  # why the fit stopped (``stop_reason``), in words

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start, self.validation_s = time.monotonic(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._validation_start is not None:
            self.validation_s += time.monotonic() - self._validation_start
            self._validation_start = None
        self.validated_at_step = trainer.global_step

    def on_fit_end(self, trainer, pl_module) -> None:
        self.stop()
        self.steps, self.epochs = trainer.global_step, trainer.current_epoch
        self.stop_reason = stop_reason(trainer)

    def stop(self) -> None:
        """Ends the measured time (again, after a validation that follows the fit)."""
        self.end = time.monotonic()

    @property
    def total_s(self) -> float:
        if self.start is None:
            return 0.0
        return (self.end or time.monotonic()) - self.start

    def summary(self) -> str:
        total = self.total_s
        training = total - self.validation_s
        per_step = f", {training / self.steps:.3f} s per training step" if self.steps else ""
        return (
            f"Training and validation took {_minutes(total)} ({self.epochs} epochs, {self.steps} steps; "
            f"validation {_minutes(self.validation_s)}{per_step}), on {torch.get_num_threads()} threads."
            + (f" Stopped by {self.stop_reason}." if self.stop_reason else "")
        )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"
