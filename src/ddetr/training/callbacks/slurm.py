"""SLURM: the id of the batch job this process runs in, and its requeue (``scontrol requeue``)."""

from __future__ import annotations

import logging
import os
import re
import subprocess

log = logging.getLogger(__name__)


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
