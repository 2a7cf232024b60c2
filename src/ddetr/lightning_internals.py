"""The Lightning names ddetr uses that are not Lightning's public API, in one place.

Everything else ddetr asks of Lightning goes through its public API (hooks, ``Trainer`` properties such as
``is_last_batch``, ``WeightAveraging.state_dict``). Two things have no public API:

- ``Trainer.check_val_every_n_epoch`` and ``Trainer.val_check_batch``, the values the training loop reads after
  every batch to decide whether to validate: ``LastCheckpoint`` sets both to 1 for the final step, so the fit
  validates (and saves) its final weights (``validation_schedule``, ``set_validation_schedule``);
- ``trainer.fit_loop.epoch_loop.batch_progress.current.processed``, the training batches processed in the
  current epoch: ``DetectionDataModule.state_dict`` saves the sampler's position from it, for an exact resume in
  the middle of an epoch (``processed_batches``).

``pyproject.toml`` pins lightning to the minor releases these were tested with (``TESTED_RANGE``);
``tests/test_lightning_internals.py`` fails, naming the attribute, when one of ``PRIVATE_NAMES`` disappears, and
reading one at run time raises ``LightningInternalsError`` naming it instead of an ``AttributeError`` from deep
inside a callback. A new Lightning minor release: run those tests and the run-ending and resume tests
(``tests/test_run_endings.py``, ``tests/test_checkpointing.py``), then widen the pin.
"""

from __future__ import annotations

from typing import Any

TESTED_RANGE = ">=2.6,<2.7"

VALIDATION_SCHEDULE = ("check_val_every_n_epoch", "val_check_batch")  # attributes of the Trainer
PROCESSED_BATCHES = ("fit_loop", "epoch_loop", "batch_progress", "current", "processed")  # a path from the Trainer

# every private name, as a path from the Trainer, and who reads it
PRIVATE_NAMES: dict[str, str] = {
    **{f"Trainer.{name}": "ddetr.training.callbacks.LastCheckpoint" for name in VALIDATION_SCHEDULE},
    "Trainer." + ".".join(PROCESSED_BATCHES): "ddetr.data.DetectionDataModule.state_dict",
}


class LightningInternalsError(RuntimeError):
    """A Lightning release without an attribute ddetr reads (``PRIVATE_NAMES``)."""


def _missing(path: tuple[str, ...], user: str) -> LightningInternalsError:
    import lightning

    return LightningInternalsError(
        f"lightning {lightning.__version__} has no Trainer.{'.'.join(path)}, which {user} reads (not public API); "
        f"ddetr is tested with lightning{TESTED_RANGE}: pip install 'lightning{TESTED_RANGE}'"
    )


def read(trainer: Any, path: tuple[str, ...], user: str) -> Any:
    """``trainer.<path>``, or ``LightningInternalsError`` naming the first missing attribute's path and ``user``."""
    value = trainer
    for depth, name in enumerate(path):
        if not hasattr(value, name):
            raise _missing(path[: depth + 1], user)
        value = getattr(value, name)
    return value


def validation_schedule(trainer: Any) -> tuple[Any, Any]:
    """``(trainer.check_val_every_n_epoch, trainer.val_check_batch)``."""
    user = PRIVATE_NAMES["Trainer.val_check_batch"]
    return tuple(read(trainer, (name,), user) for name in VALIDATION_SCHEDULE)  # type: ignore[return-value]


def set_validation_schedule(trainer: Any, check_val_every_n_epoch: Any, val_check_batch: Any) -> None:
    """Sets both values the training loop reads to decide whether to validate after the current batch; both
    must exist already (a setattr of a name Lightning no longer reads would be silently ignored)."""
    validation_schedule(trainer)  # raises when either is gone
    trainer.check_val_every_n_epoch, trainer.val_check_batch = check_val_every_n_epoch, val_check_batch


def processed_batches(trainer: Any) -> int:
    """The training batches processed so far in the current epoch (counted across a resume)."""
    return int(read(trainer, PROCESSED_BATCHES, PRIVATE_NAMES["Trainer." + ".".join(PROCESSED_BATCHES)]))
