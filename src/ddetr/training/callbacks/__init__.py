"""Lightning callbacks for long, interruptible, inspectable runs and for how a run ends, one concern per module
(the configs name them here, e.g. ``ddetr.training.callbacks.LastCheckpoint``):

- ``last_checkpoint``: ``LastCheckpoint``, the final weights, validated, in ``last.ckpt`` (``ends_after_this_step``);
- ``stopping``: ``early_stopping`` (Lightning's ``EarlyStopping`` on val/AP) and ``stop_reason`` (why the fit stopped);
- ``ema``: ``WeightEMA``, a moving average of the weights;
- ``preemption``: ``PreemptionCheckpoint`` (a checkpoint and a clean exit on SIGTERM / SIGUSR1) and ``Preempted``;
- ``slurm``: ``slurm_job_id`` and ``requeue_slurm_job``;
- ``rng_state``: ``RNGStateCallback``, the random states in every checkpoint;
- ``run_timer``: ``RunTimer``, the wall time of the fit;
- ``validation_images``: ``ValidationImages``, predicted boxes drawn at every validation;
- ``skip_report``: ``SkipReportCallback``, the images the data module skipped.

What they read of Lightning that is not its public API is named in ``ddetr.lightning_internals``.
"""

from ddetr.training.callbacks.ema import WeightEMA
from ddetr.training.callbacks.last_checkpoint import LastCheckpoint, ends_after_this_step
from ddetr.training.callbacks.preemption import Preempted, PreemptionCheckpoint
from ddetr.training.callbacks.rng_state import RNGStateCallback
from ddetr.training.callbacks.run_timer import RunTimer
from ddetr.training.callbacks.skip_report import SkipReportCallback
from ddetr.training.callbacks.slurm import requeue_slurm_job, slurm_job_id
from ddetr.training.callbacks.stopping import early_stopping, stop_reason
from ddetr.training.callbacks.validation_images import ValidationImages

__all__ = [
    "LastCheckpoint",
    "Preempted",
    "PreemptionCheckpoint",
    "RNGStateCallback",
    "RunTimer",
    "SkipReportCallback",
    "ValidationImages",
    "WeightEMA",
    "early_stopping",
    "ends_after_this_step",
    "requeue_slurm_job",
    "slurm_job_id",
    "stop_reason",
]
