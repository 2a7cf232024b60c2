"""SLURM auto-requeue: SIGUSR1 in a batch job writes the preemption checkpoint, requeues the job with
``scontrol requeue`` (a stand-in on PATH here) and the requeued job resumes without ``ckpt_path=``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _runs import entry_env, run_entry


@pytest.mark.slow
def test_sigusr1_requeues_and_the_requeued_job_resumes(tmp_path, debug_overrides):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ddetr",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    overrides = [o for o in debug_overrides(tmp_path, tmp_path / "data") if not o.startswith("paths.output_dir")]
    overrides += [f"paths.log_dir={tmp_path}/logs"]
    run_dir = tmp_path / "logs" / "train" / "runs" / "slurm_4242"  # named by the job: the requeued job finds it

    first = subprocess.Popen(
        [sys.executable, "-m", "ddetr.train", *overrides, "trainer.max_epochs=1000"],
        cwd=tmp_path,
        env=entry_env(slurm),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (run_dir / "csv" / "metrics.csv").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read()
    first.send_signal(signal.SIGUSR1)
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output[-3000:]
    ckpt = run_dir / "checkpoints" / "preempted.ckpt"
    assert ckpt.is_file() and calls.read_text().split() == ["requeue", "4242"]
    assert "requeued SLURM job 4242" in output
    stopped = torch.load(ckpt, map_location="cpu", weights_only=True)

    # the requeued job: the same command, no ckpt_path, a few more epochs to finish
    more = f"trainer.max_epochs={stopped['epoch'] + 2}"
    second = run_entry("ddetr.train", [*overrides, more], cwd=tmp_path, env=slurm)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"ckpt_path=auto: resuming from {ckpt}" in second.stdout + second.stderr
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] > stopped["global_step"]
    assert calls.read_text().split() == ["requeue", "4242"]  # a normal end requeues nothing


def test_ckpt_path_auto_picks_the_newest(tmp_path, debug_overrides, monkeypatch):
    from ddetr.app import compose
    from ddetr.training.run import resume_path

    cfg = compose(debug_overrides(tmp_path, tmp_path / "data") + ["ckpt_path=auto"])
    assert resume_path(cfg) is None  # nothing yet: start from the beginning
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"x")
    os.utime(folder / "last.ckpt", (1, 1))
    (folder / "preempted.ckpt").write_bytes(b"x")
    assert resume_path(cfg) == str(folder / "preempted.ckpt")
    cfg = compose(debug_overrides(tmp_path, tmp_path / "data"))
    assert resume_path(cfg) is None  # ckpt_path=null outside SLURM: a fresh run
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    assert resume_path(cfg) == str(folder / "preempted.ckpt")  # null acts as auto in a SLURM batch job
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    assert resume_path(cfg) is None
