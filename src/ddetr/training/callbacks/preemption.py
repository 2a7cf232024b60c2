"""``PreemptionCheckpoint``: a checkpoint and a clean exit on the signal a scheduler sends before preempting a
job (``Preempted``), and the SLURM requeue."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L

from ddetr.training.callbacks.slurm import requeue_slurm_job, slurm_job_id

log = logging.getLogger(__name__)


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
