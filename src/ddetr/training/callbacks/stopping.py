"""How a fit stops: Lightning's ``EarlyStopping`` as the config sets it (``early_stopping``), and why it stopped, in
words (``stop_reason``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason


def stop_reason(trainer: L.Trainer) -> str:
    """Why the fit stopped, in words that follow "Stopped by": early stopping (with its numbers), the time limit,
    ``max_steps`` or ``max_epochs``."""
    for callback in trainer.early_stopping_callbacks:
        if callback.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            return (
                f"early stopping: {callback.monitor} did not improve by more than {abs(callback.min_delta):g} "
                f"for {callback.patience} validations (best {float(callback.best_score):.4f})"
            )
        if callback.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            return f"early stopping: {callback.stopping_reason_message or callback.stopping_reason.name}"
    timers = [callback for callback in trainer.callbacks if isinstance(callback, Timer)]
    if any(timer.time_remaining() is not None and timer.time_remaining() <= 0 for timer in timers):
        return "the time limit (trainer.max_time)"
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return f"trainer.max_steps={trainer.max_steps}"
    if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch:
        return f"trainer.max_epochs={trainer.max_epochs}"
    return "a callback (trainer.should_stop)"


def early_stopping(patience: int | None, min_delta: float = 0.0, monitor: str = "val/AP") -> EarlyStopping | None:
    """Lightning's ``EarlyStopping`` on ``monitor`` (higher is better), counting validations; None when
    ``patience`` is None (off)."""
    if patience is None:
        return None
    if patience < 1:
        raise ValueError(
            f"early_stopping.patience must be >= 1 (validations without improvement) or null, got {patience}"
        )
    return EarlyStopping(
        monitor=monitor,
        mode="max",
        patience=int(patience),
        min_delta=float(min_delta),
        check_on_train_epoch_end=False,
        strict=True,
        verbose=True,
    )
