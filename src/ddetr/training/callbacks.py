"""Lightning callbacks and plugins for long, interruptible, inspectable runs, and for how a run ends:
``LastCheckpoint`` (the final weights, validated, in ``last.ckpt``), ``WeightEMA`` (a moving average of the
weights) and ``stop_reason`` (why the fit stopped)."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer, WeightAveraging
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from ddetr.image_list import valid_extent
from ddetr.pictures.drawing import denormalize, draw_detections

log = logging.getLogger(__name__)


class RNGStateCallback(L.Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) random states in every checkpoint and restores
    them on resume, so a resumed run draws the same random numbers as an uninterrupted one.

    The states are stored as tensors and plain Python values, so checkpoints stay loadable with
    ``torch.load(..., weights_only=True)``."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": [
                kind,
                torch.from_numpy(keys.astype(np.int64)),
                int(position),
                int(has_gauss),
                float(cached_gaussian),
            ],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            log.warning("the checkpoint holds no random states; the resumed run will draw other random numbers")
            return
        random.setstate(states["python"])
        kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(states["torch"])
        if torch.cuda.is_available() and states["cuda"]:
            torch.cuda.set_rng_state_all(states["cuda"])


def slurm_job_id() -> str | None:
    """The id of the SLURM batch job this process runs in (``ARRAYID_TASKID`` for array jobs); None outside
    SLURM and in interactive allocations (job name ``bash`` or ``interactive``), which are not requeued."""
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    return job_id if re.fullmatch(r"[0-9_]+", job_id) else None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue JOB_ID`` (what Lightning's SLURM environment runs); True when it succeeded."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        log.warning("cannot requeue SLURM job %s: scontrol is not on PATH", job_id)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
    return result.returncode == 0


class Preempted(SystemExit):
    """Raised after a preemption signal was handled and a checkpoint written (exit status 0)."""

    def __init__(self, checkpoint: str, signal_name: str, requeued_job: str | None = None) -> None:
        super().__init__(0)
        self.checkpoint = checkpoint
        self.signal_name = signal_name
        self.requeued_job = requeued_job

    def __str__(self) -> str:
        if self.requeued_job:
            return (
                f"stopped by {self.signal_name}; requeued SLURM job {self.requeued_job}, which resumes from "
                f"{self.checkpoint} (or rerun with ckpt_path={self.checkpoint})"
            )
        return f"stopped by {self.signal_name}; resume with ckpt_path={self.checkpoint}"


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 (what schedulers send before preempting a job), finishes the current step,
    writes ``<dirpath>/<filename>.ckpt`` on every rank's agreement and exits cleanly with status 0.

    Under SLURM (a batch job; ``requeue=None``) rank zero then requeues the job with ``scontrol requeue``,
    as Lightning's SLURM environment would (this handler replaces Lightning's); the requeued job runs the
    same command in the same run directory and resumes from the checkpoint by itself (``ckpt_path=auto``,
    the default under SLURM). Elsewhere, run the same command again with ``ckpt_path=`` that file.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "preempted",
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        requeue: bool | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.signals = [getattr(signal, name) for name in signals]
        self.requeue = requeue
        self.received: signal.Signals | None = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer, pl_module) -> None:
        # installed after Lightning's own SIGTERM handler, which this one replaces for the run; Lightning's
        # teardown puts back the handlers the process had before the fit (restoring ours would reinstall
        # Lightning's), so there is no teardown here
        for sig in self.signals:
            signal.signal(sig, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        name = self.received.name if self.received is not None else "a signal on another rank"
        trainer.save_checkpoint(self.ckpt_path)
        log.warning("received %s: wrote %s at global step %d", name, self.ckpt_path, trainer.global_step)
        job_id = slurm_job_id() if self.requeue is not False else None
        requeued = None
        if job_id and trainer.is_global_zero and requeue_slurm_job(job_id):
            requeued = job_id
            log.warning("requeued SLURM job %s", job_id)
        raise Preempted(str(self.ckpt_path), name, requeued)


class ValidationImages(L.Callback):
    """Draws the predicted boxes of the first ``num_images`` validation images at every validation and
    saves them as PNG under ``<dirpath>/epoch_XXX/``; also sends them to a Weights & Biases or
    TensorBoard logger when one is attached."""

    def __init__(self, dirpath: str, num_images: int = 4, score_threshold: float = 0.3) -> None:
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.score_threshold = score_threshold

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero or not outputs:
            return
        images, mask, targets = batch
        heights, widths = valid_extent(mask)
        pictures = []
        for image, valid_height, valid_width, target, detection in list(
            zip(images, heights.tolist(), widths.tolist(), targets, outputs["detections"])
        )[: self.num_images]:
            pixels = denormalize(image[:, :valid_height, :valid_width])
            keep = detection["scores"] >= self.score_threshold
            # detections are in original-image coordinates; draw them on the resized image
            orig_height, orig_width = (int(v) for v in target["orig_size"])
            scale = torch.tensor([valid_width / orig_width, valid_height / orig_height] * 2)
            boxes = detection["boxes"][keep].cpu() * scale
            pictures.append(
                draw_detections(
                    pixels,
                    boxes,
                    detection["labels"][keep].tolist(),
                    detection["scores"][keep].tolist(),
                    pl_module.category_names,
                )
            )
        folder = self.dirpath / f"epoch_{trainer.current_epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for target, picture in zip(targets, pictures):
            picture.save(folder / f"{int(target['image_id'])}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image("val/predictions", [np.asarray(p) for p in pictures], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
                for index, picture in enumerate(pictures):
                    logger.experiment.add_image(
                        f"val/predictions_{index}", np.asarray(picture), trainer.global_step, dataformats="HWC"
                    )


class SkipReportCallback(L.Callback):
    """At the end of each train and val epoch, log the datamodule's skip report.

    Logs one warning line per rank that skipped images and the metric `{stage}/skipped_images`
    (summed over ranks). Needs a datamodule with `pop_skip_report()` (`DetectionDataModule`).
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    @staticmethod
    def _report(trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "pop_skip_report"):
            return
        report = datamodule.pop_skip_report(stage)
        if len(report):
            log.warning(
                "rank %d, %s epoch %d: %s",
                trainer.global_rank,
                stage,
                trainer.current_epoch,
                report.summary(),
            )
        if not trainer.sanity_checking:
            pl_module.log(
                f"{stage}/skipped_images",
                float(len(report)),
                reduce_fx="sum",
                sync_dist=True,
            )


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


# ---------------------------------------------------------------------------------------------- run endings
def ends_after_this_step(trainer: L.Trainer) -> bool:
    """Whether the fit stops after the training step that just ended: ``max_steps`` reached, the last batch of
    the last epoch (``max_epochs``), or a stop requested during the step (``trainer.should_stop``, e.g. by the
    time limit ``max_time``, which Lightning's ``Timer`` checks after every step)."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
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

    To validate at that step, it sets ``trainer.check_val_every_n_epoch`` and ``trainer.val_check_batch`` to 1
    for that one step (the values the training loop reads to decide) and puts them back when the validation
    starts. Lightning runs checkpoint callbacks after all other callbacks, so ``Timer`` has already decided
    about the time limit when this one looks at ``trainer.should_stop``.
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
            self._scheduled = (trainer.check_val_every_n_epoch, trainer.val_check_batch)
            trainer.check_val_every_n_epoch = 1 if trainer.check_val_every_n_epoch is not None else None
            trainer.val_check_batch = 1  # validate after this batch (the loop asks right after this hook)
        elif not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._restore_schedule(trainer)

    def _restore_schedule(self, trainer) -> None:
        if self._scheduled is not None:
            trainer.check_val_every_n_epoch, trainer.val_check_batch = self._scheduled
            self._scheduled = None


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
    statistics) are updated by each rank's own batches, so before the average is validated or copied into
    the module its buffers are broadcast from rank 0 (whose checkpoints are written).
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
        latest = self._latest_update_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._latest_update_step != latest:
            self.num_updates += 1

    # Before the first update the average is still the initial weights: validation and checkpoints then use
    # the weights themselves.
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swapped = self.num_updates > 0
        if self._swapped:
            self._broadcast_buffers()
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if getattr(self, "_swapped", False):
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_train_end(self, trainer, pl_module) -> None:
        if self.num_updates > 0:
            self._broadcast_buffers()
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.num_updates > 0:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def _broadcast_buffers(self) -> None:
        if self._average_model is None or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() > 1:
            for buffer in self._average_model.module.buffers():
                dist.broadcast(buffer.data, src=0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_updates = int(state_dict.get("num_updates", 0))
