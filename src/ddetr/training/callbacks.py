"""Lightning callbacks and plugins for long, interruptible, inspectable runs."""

from __future__ import annotations

import logging
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
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
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
            return (f"stopped by {self.signal_name}; requeued SLURM job {self.requeued_job}, which resumes from "
                    f"{self.checkpoint} (or rerun with ckpt_path={self.checkpoint})")  # fmt: skip
        return f"stopped by {self.signal_name}; resume with ckpt_path={self.checkpoint}"


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 (what schedulers send before preempting a job), finishes the current step,
    writes ``<dirpath>/<filename>.ckpt`` on every rank's agreement and exits cleanly with status 0.

    Under SLURM (a batch job; ``requeue=None``) rank zero then requeues the job with ``scontrol requeue``,
    as Lightning's SLURM environment would (this handler replaces Lightning's); the requeued job runs the
    same command in the same run directory and resumes from the checkpoint by itself (``ckpt_path=auto``,
    the default under SLURM). Elsewhere, run the same command again with ``ckpt_path=`` that file.
    """

    def __init__(self, dirpath: str, filename: str = "preempted", signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
                 requeue: bool | None = None) -> None:  # fmt: skip
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
        pictures = []
        for image, image_mask, target, detection in list(zip(images, mask, targets, outputs["detections"]))[: self.num_images]:
            valid_height = int((~image_mask[:, 0]).sum())
            valid_width = int((~image_mask[0, :]).sum())
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

    def on_validation_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
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
        )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"
