"""torchrun: every rank resolves the same run directory (``ddetr.training.run_directory.torchrun_run_name``),
before the process group exists; 2 CPU processes under ``torchrun --standalone`` and gloo, a few steps."""

from __future__ import annotations

import json

import pytest
from _runs import run_entry

from ddetr.training.run_directory import torchrun_run_name


def test_outside_torchrun_there_is_no_shared_name(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_run_name() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/42")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # several nodes: the run id alone (their agents start apart)
    assert torchrun_run_name() == "torchrun_job_42"


@pytest.mark.slow
def test_two_ranks_under_torchrun_share_one_run_directory(tmp_path, debug_overrides):
    logs = tmp_path / "logs"
    overrides = [o for o in debug_overrides(tmp_path, tmp_path / "data") if not o.startswith("paths.output_dir")]
    overrides += [
        f"paths.log_dir={logs}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
    ]
    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ddetr.train", *overrides]
    result = run_entry(torchrun[0], torchrun[1:], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1 and "_torchrun_" in runs[0].name, [run.name for run in runs]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["stopped"] == "trainer.max_steps=2"
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
