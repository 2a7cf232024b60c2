"""``LastCheckpoint``: ``last.ckpt``, the validated weights of the final step, whatever ends the fit
(``ends_after_this_step``)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from ddetr.lightning_internals import set_validation_schedule, validation_schedule


def ends_after_this_step(trainer: L.Trainer) -> bool:
    """Whether the fit stops after the training step that just ended: ``max_steps`` reached, the last batch of
    the last epoch (``max_epochs``), or a stop requested during the step (``trainer.should_stop``, e.g. by the
    time limit ``max_time``, which Lightning's ``Timer`` checks after every step)."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    last_batch = trainer.is_last_batch
    max_epochs = trainer.max_epochs
    if last_batch and max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1:
        return True
    return bool(trainer.should_stop)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/<filename>.ckpt`` (``last.ckpt``): the weights of the final step, whatever ends the fit.

    Saved after every validation of the fit. Lightning validates only at the end of every
    ``check_val_every_n_epoch``-th epoch; this callback also makes the fit validate right after its final
    training step (``max_epochs``, ``max_steps``, the time limit ``max_time``; early stopping stops right after
    a validation anyway). So the final metrics, ``last.ckpt`` and the best checkpoint (the other
    ``ModelCheckpoint``, on ``val/AP``) all follow the final weights, and are written inside ``fit``, where a
    checkpoint holds the whole training state to resume from (with ``WeightEMA``: the raw weights and the
    average). Without validation (``limit_val_batches=0``) it saves right after the final step.

    To validate at that step, it sets the trainer's ``check_val_every_n_epoch`` and ``val_check_batch`` to 1
    for that one step (the values the training loop reads to decide; not public API: ``ddetr.lightning_internals``)
    and puts them back when the validation starts. Without validation it saves through ``ModelCheckpoint``'s own
    public hook ``on_validation_end`` (what saves after a validation: the same checks, the same file). Lightning
    runs checkpoint callbacks after all other callbacks, so ``Timer`` has already decided about the time limit
    when this one looks at ``trainer.should_stop``.
    """

    def __init__(self, dirpath: str, filename: str = "last") -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            every_n_epochs=1,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self._scheduled: tuple[Any, Any] | None = None  # (check_val_every_n_epoch, val_check_batch) to put back

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._restore_schedule(trainer)  # the fit went on after all (should_stop before min_epochs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not ends_after_this_step(trainer):
            return
        if trainer.enable_validation:
            self._scheduled = validation_schedule(trainer)
            every_n_epochs = 1 if self._scheduled[0] is not None else None
            set_validation_schedule(trainer, every_n_epochs, 1)  # validate after this batch (the loop asks next)
        else:
            self.on_validation_end(trainer, pl_module)  # saves as after a validation (skips a step saved already)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._restore_schedule(trainer)

    def _restore_schedule(self, trainer) -> None:
        if self._scheduled is not None:
            set_validation_schedule(trainer, *self._scheduled)
            self._scheduled = None
